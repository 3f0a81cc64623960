"""Tests of mini.lm: configs and parameter counts, corpus and tokenizer, trainer with exact
resume, and the memory estimator against the GaLore digest's figures and galore-torch's state."""
from __future__ import annotations

import hashlib
import math
import re

import pytest
import torch
from transformers import LlamaConfig

from mini.lm import (
    DEFAULT_RANKS,
    METHODS,
    PAPER_CONFIGS,
    BatchStream,
    CharTokenizer,
    History,
    LMData,
    TrainerConfig,
    build_model,
    count_parameters,
    estimate_memory,
    eval_batches,
    format_memory_table,
    generate_corpus,
    linear_parameter_names,
    load_checkpoint,
    load_hf_dataset,
    load_text_file,
    memory_table,
    paper_config,
    parameter_shapes,
    sample_batch,
    split_documents,
    synthetic_lm_data,
    tensor_breakdown,
    tiny_llama_config,
    train_lm,
)

FAST = dict(batch_size=4, seq_len=32, eval_every=5, eval_batches=2, progress=False)


@pytest.fixture(scope="module")
def data() -> LMData:
    return synthetic_lm_data(300, seed=0)


@pytest.fixture(scope="module")
def cfg(data) -> LlamaConfig:
    return tiny_llama_config(vocab_size=data.tokenizer.vocab_size)


# --------------------------------------------------------------------------- config


def test_tiny_config_count_matches_model(cfg):
    model = build_model(cfg, seed=0)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == parameter_shapes(cfg)
    assert count_parameters(cfg) == count_parameters(model)
    assert 0.5e6 < count_parameters(cfg) < 1.5e6  # "about 1M"
    assert not cfg.tie_word_embeddings


@pytest.mark.parametrize("overrides", [
    dict(num_key_value_heads=2),  # grouped-query attention
    dict(attention_bias=True, mlp_bias=True),
    dict(tie_word_embeddings=True),
])
def test_analytic_count_variants(overrides):
    c = tiny_llama_config(vocab_size=50, num_hidden_layers=1, **overrides)
    model = build_model(c, seed=0)
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == parameter_shapes(c)
    assert count_parameters(c) == count_parameters(model)


def test_paper_configs_counts():
    assert set(PAPER_CONFIGS) == {"llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_7b"}
    c = paper_config("llama_60m")
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers,
            c.vocab_size, c.tie_word_embeddings) == (512, 1376, 8, 8, 32000, False)
    # formula of the config module docstring: 2Vh + L(4h² + 3hf + 2h) + h
    assert count_parameters("llama_60m") == 2 * 32000 * 512 + 8 * (4 * 512**2 + 3 * 512 * 1376 + 2 * 512) + 512
    assert round(count_parameters("llama_60m") / 1e6, 1) == 58.1
    linear = sum(math.prod(parameter_shapes("llama_60m")[n]) for n in linear_parameter_names("llama_60m"))
    assert round(linear / 1e6, 1) == 25.3
    assert round(count_parameters("llama_1b") / 1e6) == 1339
    assert round(count_parameters("llama_7b") / 1e9, 2) == 6.74


def test_unknown_config_name():
    with pytest.raises(ValueError, match="llama_60m"):
        paper_config("llama_13b")
    with pytest.raises(ValueError, match="name"):
        estimate_memory("gpt2", "adam")
    with pytest.raises(TypeError, match="config"):
        count_parameters(42)
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_llama_config(vocab_size=0)


def test_build_model_seeded(cfg):
    before = torch.get_rng_state()
    a, b, c = build_model(cfg, 3), build_model(cfg, 3), build_model(cfg, 4)
    assert torch.equal(torch.get_rng_state(), before)  # global generator untouched
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_linear_parameter_names(cfg):
    model = build_model(cfg, 0)
    names = linear_parameter_names(model)
    assert names == linear_parameter_names(cfg)
    assert len(names) == 7 * cfg.num_hidden_layers
    assert {n.split(".")[-2] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                  "gate_proj", "up_proj", "down_proj"}
    params = dict(model.named_parameters())
    assert all(params[n].dim() == 2 for n in names)


# --------------------------------------------------------------------------- data


def test_corpus_deterministic_and_pinned():
    a, b = generate_corpus(50, seed=0), generate_corpus(50, seed=0)
    assert a == b and a != generate_corpus(50, seed=1)
    digest = hashlib.sha256("\n".join(a).encode()).hexdigest()
    assert digest == "412bfed7a99bc21ca08727a75fdce049dc506aafa2b2e8c5d72ee7d04ac516b0"


def test_corpus_structure():
    text = " ".join(generate_corpus(200, seed=5))
    facts = re.findall(r"(\d+) ([+*-]) (\d+) = (\d+) \.", text)
    assert len(facts) > 100
    ops = {"+": lambda a, b: a + b, "*": lambda a, b: a * b, "-": lambda a, b: a - b}
    assert all(ops[o](int(a), int(b)) == int(c) for a, o, b, c in facts)
    for s in re.findall(r"brackets (.*?) \.", text):
        stack = []
        for ch in s.split():
            if ch in "([{<":
                stack.append(ch)
            else:
                assert stack and "([{<"[")]}>".index(ch)] == stack.pop()
        assert not stack
    assert " a cats " not in text and " two cat " not in text
    # a sentence-initial plural subject takes a plural verb (not so after a PP: "near the cats")
    assert re.search(r"(?:^|\. )the cats (sleep|run|sing|wait) \.", text)
    assert not re.search(r"(?:^|\. )the cats (sleeps|runs|sings|waits) \.", text)


def test_tokenizer_round_trip(data):
    tok = data.tokenizer
    text = generate_corpus(3, seed=9)[0]
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.encode(tok.decode(ids)) == ids
    assert tok.decode(torch.tensor(ids)) == text
    assert 0 not in ids and max(ids) < tok.vocab_size
    assert tok.encode("é") == [0] and tok.decode([0]) == CharTokenizer.UNK
    assert CharTokenizer.from_state_dict(tok.state_dict()).chars == tok.chars
    with pytest.raises(ValueError, match="ids"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="alphabet"):
        CharTokenizer("aa")


def test_split_and_data(data):
    docs = generate_corpus(40, seed=1)
    tr, va = split_documents(docs, 0.25, seed=3)
    assert (tr, va) == split_documents(docs, 0.25, seed=3)
    assert len(va) == 10 and sorted(tr + va) == sorted(docs)
    assert split_documents(docs, 0.25, seed=4) != (tr, va)
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, 1.0)
    with pytest.raises(ValueError, match="documents"):
        split_documents(docs[:1])
    assert data.train_ids.dtype == torch.long and data.val_ids.numel() > 1000


def test_batches(data):
    s1 = BatchStream(data.train_ids, 3, 16, seed=7)
    seq = [next(s1) for _ in range(5)]
    s2 = BatchStream(data.train_ids, 3, 16, seed=7)
    s2.load_state_dict({**s1.state_dict(), "position": 3})
    x, y = next(s2)
    assert torch.equal(x, seq[3][0]) and torch.equal(y, seq[3][1])
    assert x.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="seq_len"):
        s2.load_state_dict({**s1.state_dict(), "seq_len": 8})
    with pytest.raises(ValueError, match="seq_len"):
        sample_batch(torch.arange(10), 2, 10, torch.Generator())
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(data.train_ids, 0, 16)
    ev = eval_batches(data.val_ids, 4, 32, 3)
    assert len(ev) == 3 and all(x.shape == (4, 32) for x, _ in ev)
    assert torch.equal(ev[0][0][0], data.val_ids[:32])


def test_load_text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello world\nsecond line\n", encoding="utf-8")
    text = load_text_file(p)
    d = LMData.from_text(text, val_fraction=0.5, seed=0)
    assert d.tokenizer.decode(d.train_ids) + d.tokenizer.decode(d.val_ids) in (
        "hello world\nsecond line\n", "second line\nhello world\n")
    with pytest.raises(FileNotFoundError, match="path"):
        load_text_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no text"):
        load_text_file(tmp_path / "empty.txt")


def test_load_hf_dataset_local(tmp_path):
    p = tmp_path / "corpus.txt"
    docs = generate_corpus(20, seed=2)
    p.write_text("\n".join(docs) + "\n\n", encoding="utf-8")
    got = load_hf_dataset("text", data_files=str(p), cache_dir=str(tmp_path / "cache"))
    assert got == docs
    with pytest.raises(FileNotFoundError, match="data_files"):
        load_hf_dataset("text", data_files=str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="columns are"):
        load_hf_dataset("text", data_files=str(p), text_field="content",
                        cache_dir=str(tmp_path / "cache"))


# --------------------------------------------------------------------------- trainer


def _cosine(total: int):
    return lambda k: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(k, total) / total))


def _make(cfg, seed):
    model = build_model(cfg, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(20))
    return model, opt, sched


def test_loss_decreases(cfg, data):
    model = build_model(cfg, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    h = train_lm(model, opt, data, TrainerConfig(steps=30, **{**FAST, "eval_every": 10}))
    assert h.step == list(range(1, 31)) and len(h.lr) == len(h.step_time) == 30
    assert h.val_step == [10, 20, 30]
    assert h.val_ppl[-1] < 0.6 * cfg.vocab_size  # far below uniform guessing
    assert h.val_ppl[-1] < h.val_ppl[0]
    assert sum(h.train_loss[-5:]) / 5 < h.train_loss[0] - 0.8


def test_exact_resume_bitwise(cfg, data, tmp_path):
    m1, o1, s1 = _make(cfg, 0)
    h1 = train_lm(m1, o1, data, TrainerConfig(steps=20, **FAST), s1)

    m2, o2, s2 = _make(cfg, 0)
    train_lm(m2, o2, data, TrainerConfig(steps=10, checkpoint_dir=str(tmp_path),
                                         checkpoint_every=10, **FAST), s2)
    path = tmp_path / "step_000010.pt"
    ckpt = torch.load(path, weights_only=True)  # loadable without pickle
    assert ckpt["step"] == 10 and ckpt["data"]["position"] == 10

    torch.manual_seed(1234)  # disturb every generator: the checkpoint must restore them
    m3, o3, s3 = _make(cfg, 99)  # new objects, different init
    h3 = train_lm(m3, o3, data, TrainerConfig(steps=20, **FAST), s3, resume_from=path)

    for (n, a), b in zip(m1.named_parameters(), m3.parameters()):
        assert torch.equal(a, b), n
    sd1, sd3 = o1.state_dict(), o3.state_dict()
    for k in sd1["state"]:
        for key in sd1["state"][k]:
            assert torch.equal(sd1["state"][k][key], sd3["state"][k][key])
    assert s1.state_dict()["last_epoch"] == s3.state_dict()["last_epoch"] == 20
    assert h1.train_loss == h3.train_loss and h1.val_ppl == h3.val_ppl and h1.lr == h3.lr


def test_resume_missing_file(cfg, data, tmp_path):
    m, o, s = _make(cfg, 0)
    with pytest.raises(FileNotFoundError, match="resume_from"):
        train_lm(m, o, data, TrainerConfig(steps=2, **FAST), s, resume_from=tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "x.pt")


class _SignSGD(torch.optim.Optimizer):
    """A custom optimizer: p -= lr · sign(g)."""

    def __init__(self, params, lr=1e-3):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-g["lr"])
                    self.state[p]["n"] = self.state[p].get("n", 0) + 1


def test_custom_optimizer(cfg, data):
    model = build_model(cfg, 0)
    opt = _SignSGD(model.parameters(), lr=1e-3)
    h = train_lm(model, opt, data, TrainerConfig(steps=6, **FAST))
    assert h.train_loss[-1] < h.train_loss[0]
    assert all(s["n"] == 6 for s in opt.state.values())


def test_hook_updates_match_optimizer(cfg, data):
    """optimizer=None with SGD inside post-accumulate-grad hooks == torch.optim.SGD."""
    tc = TrainerConfig(steps=5, grad_clip=None, **FAST)
    ref = build_model(cfg, 0)
    train_lm(ref, torch.optim.SGD(ref.parameters(), lr=0.1), data, tc)

    model = build_model(cfg, 0)

    def hook(p):
        with torch.no_grad():
            p.add_(p.grad, alpha=-0.1)
        p.grad = None

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(hook)
    h = train_lm(model, None, data, tc)
    assert math.isnan(h.lr[0])
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)


def _per_layer(cfg, seed):
    """A model whose parameters are updated by per-parameter AdamW inside gradient hooks."""
    model = build_model(cfg, seed)
    opts = {}
    for name, p in model.named_parameters():
        opts[name] = opt = torch.optim.AdamW([p], lr=3e-3)

        def hook(p, opt=opt):
            opt.step()
            opt.zero_grad(set_to_none=True)

        p.register_post_accumulate_grad_hook(hook)
    return model, opts


def test_per_layer_hooks_exact_resume(cfg, data, tmp_path):
    tc = dict(grad_clip=None, **FAST)
    m1, o1 = _per_layer(cfg, 0)
    h1 = train_lm(m1, None, data, TrainerConfig(steps=8, **tc), extra_state=o1)
    m2, o2 = _per_layer(cfg, 0)
    train_lm(m2, None, data, TrainerConfig(steps=4, checkpoint_dir=str(tmp_path),
                                           checkpoint_every=4, **tc), extra_state=o2)
    m3, o3 = _per_layer(cfg, 5)
    h3 = train_lm(m3, None, data, TrainerConfig(steps=8, **tc), extra_state=o3,
                  resume_from=tmp_path / "step_000004.pt")
    assert h1.train_loss == h3.train_loss and h1.train_loss[-1] < h1.train_loss[0]
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)
    m4, o4 = _per_layer(cfg, 5)
    with pytest.raises(ValueError, match="extra_state"):
        train_lm(m4, None, data, TrainerConfig(steps=8, **tc), extra_state={"other": o4["lm_head.weight"]},
                 resume_from=tmp_path / "step_000004.pt")


def test_trainer_errors(cfg, data):
    model = build_model(cfg, 0)
    with pytest.raises(ValueError, match="grad_clip"):
        train_lm(model, None, data, TrainerConfig(steps=1, grad_clip=1.0, **FAST))
    with pytest.raises(TypeError, match="optimizer"):
        train_lm(model, "adam", data, TrainerConfig(steps=1, **FAST))
    with pytest.raises(TypeError, match="data"):
        train_lm(model, None, data.train_ids, TrainerConfig(steps=1, grad_clip=None, **FAST))
    with pytest.raises(ValueError, match="steps"):
        TrainerConfig(steps=0)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        TrainerConfig(checkpoint_every=5)
    assert History.from_dict(History(step=[1]).to_dict()).step == [1]


# --------------------------------------------------------------------------- memory


def test_memory_digest_figures():
    adam = estimate_memory("llama_60m", "adam")
    galore = estimate_memory("llama_60m", "galore", rank=128)
    assert round(adam.n_params / 1e6, 1) == 58.1 and round(adam.n_projected / 1e6, 1) == 25.3
    assert adam.state_bytes == 2 * adam.n_params * 2
    assert round(adam.states_gb, 3) == 0.232
    assert round(galore.states_gb, 3) == 0.156 and round(galore.projectors_gb, 3) == 0.007
    adam1b = estimate_memory("llama_1b", "adam")
    galore1b = estimate_memory("llama_1b", "galore", rank=512)
    assert round(adam1b.n_params / 1e6) == 1339
    assert round(adam1b.states_gb, 3) == 5.356
    assert round(galore1b.states_gb, 3) == 1.733 and round(galore1b.projectors_gb, 3) == 0.352
    # 7B: BF16 weight gradients are the paper's 13.5G
    assert round(estimate_memory("llama_7b", "adam").grads_gb, 1) == 13.5


@pytest.mark.parametrize("rank", [128, 64, 600])
def test_galore_state_ratio_per_matrix(rank):
    adam = {t.name: t for t in tensor_breakdown("llama_60m", "adam")}
    for t in tensor_breakdown("llama_60m", "galore", rank=rank):
        if t.projected:
            m, n = t.shape
            assert t.states / adam[t.name].states == pytest.approx(min(rank, m, n) / min(m, n), rel=1e-12)
            assert t.projector == min(rank, m, n) * min(m, n) * 2
        else:
            assert t.states == adam[t.name].states


def test_galore_state_matches_galore_torch(cfg, data):
    """Element counts of the estimator == what galore-torch's GaLoreAdamW actually stores."""
    galore_torch = pytest.importorskip("galore_torch")
    model = build_model(cfg, 0)
    names = set(linear_parameter_names(model))
    proj = [p for n, p in model.named_parameters() if n in names]
    rest = [p for n, p in model.named_parameters() if n not in names]
    opt = galore_torch.GaLoreAdamW([{"params": rest}, {"params": proj, "rank": 16,
                                   "update_proj_gap": 10, "scale": 0.25, "proj_type": "std"}],
                                   no_deprecation_warning=True)
    x, y = sample_batch(data.train_ids, 2, 16, torch.Generator().manual_seed(0))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    n_state = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in opt.state.values())
    n_proj = sum(s["projector"].ortho_matrix.numel() for s in opt.state.values() if "projector" in s)
    rep = estimate_memory(cfg, "galore", rank=16, state_bytes=4, weight_bytes=4, proj_bits=32)
    assert rep.n_state == n_state
    assert rep.state_bytes == 4 * n_state and rep.projector_bytes == 4 * n_proj
    assert rep.n_params == count_parameters(model)


def test_other_methods_accounting(cfg):
    n = count_parameters(cfg)
    V, h = cfg.vocab_size, cfg.hidden_size
    # 8-bit: 1 byte + a float32 absmax per 256 for tensors >= 4096 elements, float32 below
    a8 = tensor_breakdown(cfg, "adam8bit")
    for t in a8:
        k = math.prod(t.shape)
        assert t.states == (2 * (k + math.ceil(k / 256) * 4) if k >= 4096 else 2 * 4 * k)
    # LoRA: frozen base + adapters r(m + n) on the 7·L projected matrices
    lora = estimate_memory(cfg, "lora", rank=4)
    adapters = sum(4 * sum(parameter_shapes(cfg)[nm]) for nm in linear_parameter_names(cfg))
    other = n - sum(math.prod(parameter_shapes(cfg)[nm]) for nm in linear_parameter_names(cfg))
    assert lora.n_trainable == adapters + other
    assert lora.weight_bytes == 2 * (n + adapters) and lora.state_bytes == 2 * 2 * (adapters + other)
    # per-layer updates: one gradient alive, the largest tensor (embedding or head, V×h)
    pl = estimate_memory(cfg, "galore", rank=8, per_layer_updates=True)
    assert pl.grad_bytes == 2 * max(V * h, max(math.prod(s) for s in parameter_shapes(cfg).values()))
    assert pl.grad_bytes < estimate_memory(cfg, "galore", rank=8).grad_bytes
    # Q-GaLore: INT8 projected weights with a scale and zero point (2 B each) per 256
    q = estimate_memory("llama_60m", "qgalore")
    lin = q.n_projected
    n_groups = sum(math.ceil(math.prod(parameter_shapes("llama_60m")[nm]) / 256)
                   for nm in linear_parameter_names("llama_60m"))
    assert q.weight_bytes == lin + 4 * n_groups + 2 * (q.n_params - lin)
    assert q.rank == 128 and q.total_bytes < estimate_memory("llama_60m", "galore8bit").total_bytes
    # the 7B ordering of the papers: Q-GaLore < 8-bit GaLore < 8-bit Adam < Adam
    tot = {m: estimate_memory("llama_7b", m, per_layer_updates=m != "adam").total_gb
           for m in ("adam", "adam8bit", "galore8bit", "qgalore")}
    assert tot["qgalore"] < tot["galore8bit"] < tot["adam8bit"] < tot["adam"]
    assert tot["qgalore"] < 16  # weights + grads + states; activations not counted


def test_memory_table():
    rows = memory_table()
    assert len(rows) == len(PAPER_CONFIGS) * len(METHODS)
    for r in rows:
        if r["method"] in ("galore", "lora", "qgalore"):
            assert r["rank"] == DEFAULT_RANKS[r["config"]]
        else:
            assert r["method"] not in ("adam", "adam8bit") or r["rank"] is None
        assert r["total_GB"] == pytest.approx(r["weights_GB"] + r["grads_GB"] + r["states_GB"] + r["projectors_GB"])
    text = format_memory_table(memory_table(["adam"], ["llama_60m"]))
    assert "| llama_60m | adam |  | 58.1 |" in text


@pytest.mark.parametrize("rank", [0, -3, 1.5, True, "8"])
@pytest.mark.parametrize("method", ["galore", "galore8bit", "qgalore", "lora"])
def test_bad_rank(method, rank):
    with pytest.raises(ValueError, match="rank"):
        estimate_memory("llama_60m", method, rank=rank)


def test_memory_errors(cfg):
    with pytest.raises(ValueError, match=r"method must be one of .*'adam'.*'qgalore'"):
        estimate_memory("llama_60m", "sgd")
    with pytest.raises(ValueError, match="rank must be given"):
        estimate_memory(cfg, "galore")
    with pytest.raises(ValueError, match="methods"):
        memory_table(["sgd"])
    with pytest.raises(ValueError, match="configs"):
        memory_table(["adam"], ["llama_13b"])
    with pytest.raises(ValueError, match="weight_bits"):
        estimate_memory("llama_60m", "qgalore", weight_bits=6)
    with pytest.raises(ValueError, match="weight_bytes"):
        estimate_memory("llama_60m", "adam", weight_bytes=0)
