"""Tests of mini.cogo.kernel (closed form, Triton under the interpreter) and mini.cogo.trainer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mini.cogo.kernel import fused_loss_and_grads, loss_and_grads_reference
from mini.cogo.trainer import TrainConfig, init_weights, make_masks, train, train_per_seed_autograd
from mini.kernels import HAS_TRITON, check_against_reference

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    """The trainer's "auto" must mean the closed form on CPU here, whatever $MINI_BACKEND says."""
    monkeypatch.delenv("MINI_BACKEND", raising=False)


def _weights(S, q, d, gen, dtype=torch.float32):
    Wa = (torch.rand(S, q, d, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
    Wb = (torch.rand(S, q, d, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
    Wc = (torch.rand(S, d, q, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
    mask = (torch.rand(S, d, d, generator=gen) < 0.8).to(dtype)
    mask[:, 0, 0] = 1.0  # every seed has a training pair
    return Wa, Wb, Wc, mask


def _autograd(Wa, Wb, Wc, mask):
    """Σ_s L_s through autograd on the plain convention, float64, one-hot inputs."""
    S, q, d = Wa.shape
    Wa, Wb, Wc = (w.detach().double().requires_grad_() for w in (Wa, Wb, Wc))
    E = torch.eye(d, dtype=torch.float64)
    P = E - 1.0 / d
    a, b = torch.meshgrid(torch.arange(d), torch.arange(d), indexing="ij")
    a, b = a.flatten(), b.flatten()
    losses = []
    for s in range(S):
        o = ((E[a] @ Wa[s].T + E[b] @ Wb[s].T) ** 2) @ Wc[s].T  # (d², d)
        per = ((o - E[(a + b) % d]) @ P).pow(2).sum(1)
        m = mask[s].flatten().double()
        losses.append((per * m).sum() / m.sum())
    total = torch.stack(losses).sum()
    total.backward()
    return torch.stack(losses).detach(), Wa.grad, Wb.grad, Wc.grad


@pytest.mark.parametrize("q,d", [(8, 5), (13, 7)])
def test_reference_matches_autograd(q, d):
    gen = torch.Generator().manual_seed(q * d)
    args = _weights(3, q, d, gen, torch.float64)
    for got, want in zip(loss_and_grads_reference(*args), _autograd(*args)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@needs_triton
# (20, 37): several tiles of b, g and j in both kernels, none of them full
@pytest.mark.parametrize("q,d", [(8, 5), (13, 7), (40, 3), (20, 37)])
def test_kernel_under_interpreter_matches_autograd(q, d):
    gen = torch.Generator().manual_seed(100 + q * d)
    args = _weights(2, q, d, gen)
    got = fused_loss_and_grads(*args, backend="interpret")
    for g, w in zip(got, _autograd(*args)):
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-4)


@needs_triton
def test_kernel_against_reference_poisoned():
    def make(size, gen):
        S, q, d = size
        return _weights(S, q, d, gen)

    check_against_reference(fused_loss_and_grads, loss_and_grads_reference, make,
                            sizes=[(2, 8, 5), (1, 13, 7), (2, 70, 2), (1, 16, 17)], atol=2e-5, rtol=1e-4)


def test_kernel_input_errors():
    gen = torch.Generator().manual_seed(0)
    Wa, Wb, Wc, mask = _weights(2, 8, 5, gen)
    if HAS_TRITON:  # the kernel is float32-only
        with pytest.raises(TypeError, match="Wb must have dtype torch.float32, got torch.float64"):
            fused_loss_and_grads(Wa, Wb.double(), Wc, mask, backend="interpret")
    with pytest.raises(TypeError, match="Wb must have dtype torch.float32 or torch.float64, got torch.float16"):
        fused_loss_and_grads(Wa, Wb.half(), Wc, mask, backend="reference")
    with pytest.raises(TypeError, match="must share one dtype"):
        fused_loss_and_grads(Wa, Wb.double(), Wc, mask, backend="reference")
    with pytest.raises(ValueError, match=r"Wc must have shape \(2, 5, 8\)"):
        fused_loss_and_grads(Wa, Wb, Wc.transpose(1, 2).contiguous(), mask)
    with pytest.raises(ValueError, match="Wa on cpu, Wb on cpu, Wc on cpu, mask on meta"):
        fused_loss_and_grads(Wa, Wb, Wc, mask.to("meta"))
    with pytest.raises(ValueError, match="only 0 .* and 1"):
        fused_loss_and_grads(Wa, Wb, Wc, mask * 0.5)
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"seed\(s\) \[1\] has no training pair"):
        fused_loss_and_grads(Wa, Wb, Wc, empty)
    if HAS_TRITON:
        with pytest.raises(ValueError, match="CUDA-only path"):
            fused_loss_and_grads(Wa, Wb, Wc, mask, backend="triton")


def test_seed_gradient_independent_of_batch_size():
    """Summing the seeds' losses: seed 0's gradient is the same alone and in a batch of 3."""
    gen = torch.Generator().manual_seed(5)
    Wa, Wb, Wc, mask = _weights(3, 12, 7, gen, torch.float64)
    alone = loss_and_grads_reference(Wa[:1], Wb[:1], Wc[:1], mask[:1])
    batch = loss_and_grads_reference(Wa, Wb, Wc, mask)
    for x, y in zip(alone, batch):
        torch.testing.assert_close(x[0], y[0], atol=0, rtol=0)


@pytest.fixture
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_reference_workspace_reused_and_resized():
    """A kept workspace gives the same bits as none, keeps its buffers, and follows new shapes."""
    gen = torch.Generator().manual_seed(11)
    args = _weights(3, 12, 7, gen)
    ws: dict = {}
    fresh = loss_and_grads_reference(*args)
    first = [t.clone() for t in loss_and_grads_reference(*args, workspace=ws)]
    ptrs = {k: v.data_ptr() for k, v in ws.items()}
    again = loss_and_grads_reference(*args, workspace=ws)
    assert {k: v.data_ptr() for k, v in ws.items()} == ptrs  # nothing allocated the second time
    for x, y, z in zip(fresh, first, again):
        assert torch.equal(x, y) and torch.equal(x, z)
    other = _weights(2, 9, 5, gen, torch.float64)  # another shape and dtype: buffers follow
    for got, want in zip(loss_and_grads_reference(*other, workspace=ws), _autograd(*other)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    assert ws["h"].dtype == torch.float64
    with pytest.raises(TypeError, match="workspace must be a dict kept between calls, or None; got list"):
        loss_and_grads_reference(*args, workspace=[])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_elems", [1, 2 * 7 * 7 * 12, 1 << 18])
def test_seed_alone_equals_seed_in_batch_bitwise(monkeypatch, one_thread, dtype, chunk_elems):
    """One thread: whatever the chunks (1, 2 or all 5 seeds), seed s alone gives the same bits."""
    import mini.cogo.kernel as K

    monkeypatch.setattr(K, "REFERENCE_CPU_CHUNK_ELEMS", chunk_elems)
    gen = torch.Generator().manual_seed(12)
    Wa, Wb, Wc, mask = _weights(5, 12, 7, gen, dtype)
    batch = loss_and_grads_reference(Wa, Wb, Wc, mask, workspace={})
    for s in (0, 3, 4):
        alone = loss_and_grads_reference(Wa[s:s + 1], Wb[s:s + 1], Wc[s:s + 1], mask[s:s + 1])
        for x, y in zip(alone, batch):
            assert torch.equal(x[0], y[s])


def test_bench_threads_argument_errors():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "cogo_step.py"
    spec = importlib.util.spec_from_file_location("cogo_step_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for bad in ("0", "1,x", ""):
        with pytest.raises(SystemExit):
            mod.main(["--threads", bad])


# ------------------------------------------------------------------------------- trainer
def test_trainer_matches_per_seed_autograd():
    cfg = TrainConfig(d=7, q=16, seeds=2, steps=20, dtype=torch.float64, progress=False, log_every=5,
                      weight_decay=1e-3)
    fast, slow = train(cfg), train_per_seed_autograd(cfg)
    for x, y in zip((fast.Wa, fast.Wb, fast.Wc), (slow.Wa, slow.Wb, slow.Wc)):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-8)
    np.testing.assert_allclose(fast.history["train_loss"], slow.history["train_loss"], rtol=1e-8, atol=1e-12)
    assert list(fast.history["step"]) == [0, 5, 10, 15, 20]


def test_trainer_float32_matches_per_seed_autograd():
    """The CPU path (reused buffers, fused Adam) in float32 against the paper's loop."""
    cfg = TrainConfig(d=7, q=16, seeds=2, steps=20, progress=False, log_every=5, weight_decay=1e-3)
    fast, slow = train(cfg), train_per_seed_autograd(cfg)
    for x, y in zip((fast.Wa, fast.Wb, fast.Wc), (slow.Wa, slow.Wb, slow.Wc)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(fast.history["train_loss"], slow.history["train_loss"], rtol=1e-4)


def test_trainer_reduces_loss_and_shapes():
    res = train(TrainConfig(d=7, q=64, seeds=2, steps=300, progress=False, log_every=100))
    loss = res.history["train_loss"]  # (T, S)
    assert loss.shape == (4, 2)
    assert np.all(loss[-1] < 0.05 * loss[0]), loss
    assert np.all(res.history["train_acc"][-1] == 1.0)
    assert res.Wa.shape == (2, 64, 7) and res.Wc.shape == (2, 7, 64) and res.Wa.dtype == torch.float64
    assert res.mask.shape == (2, 7, 7) and int((~res.mask[0]).sum()) == int(0.1 * 49)
    assert res.elapsed_s > 0


def test_single_seed_equals_seed_in_batch(one_thread):
    """Init, split and trajectory of seed base+1 do not depend on the batch around it: on one
    thread bit for bit (on two, MKL splits a lone seed's products differently; see the kernel)."""
    kw = dict(d=7, q=16, steps=30, progress=False, log_every=10, weight_decay=1e-2)
    batch = train(TrainConfig(seeds=3, seed=4, **kw))
    single = train(TrainConfig(seeds=1, seed=5, **kw))
    for x, y in zip((single.Wa, single.Wb, single.Wc), (batch.Wa, batch.Wb, batch.Wc)):
        assert torch.equal(x[0], y[1])
    assert torch.equal(single.mask[0], batch.mask[1])
    assert not torch.equal(batch.mask[0], batch.mask[1])  # each seed its own split


def test_init_and_split_reproducible():
    cfg = TrainConfig(d=5, q=8, seeds=2, progress=False)
    a, b = init_weights(cfg), init_weights(cfg)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert float(a[0].abs().max()) <= 1 / 5**0.5 and float(a[2].abs().max()) <= 1 / 8**0.5
    assert torch.equal(make_masks(cfg), make_masks(cfg))


@pytest.mark.parametrize(
    "field,value,exc,msg",
    [
        ("d", 1, ValueError, "TrainConfig.d must be an integer >= 2"),
        ("d", 7.0, TypeError, "TrainConfig.d must be an integer"),
        ("q", 0, ValueError, "TrainConfig.q"),
        ("seeds", 0, ValueError, "TrainConfig.seeds"),
        ("steps", -1, ValueError, "TrainConfig.steps"),
        ("lr", 0.0, ValueError, "TrainConfig.lr must be > 0"),
        ("weight_decay", -1e-5, ValueError, "TrainConfig.weight_decay must be >= 0"),
        ("test_fraction", 1.0, ValueError, "0 <= test_fraction < 1"),
        ("test_fraction", -0.1, ValueError, "0 <= test_fraction < 1"),
        ("dtype", torch.float16, TypeError, "TrainConfig.dtype"),
        ("backend", "gpu", ValueError, "TrainConfig.backend"),
    ],
)
def test_config_errors(field, value, exc, msg):
    with pytest.raises(exc, match=msg):
        TrainConfig(**{field: value})


def test_zero_steps_and_no_test_pairs():
    res = train(d=5, q=8, seeds=1, steps=0, test_fraction=0.0, progress=False)
    assert list(res.history["step"]) == [0]
    assert np.isnan(res.history["test_acc"][0, 0])


# Compiling for CUDA without a GPU, and spills measured by ptxas: tests/test_cogo_kernel_stats.py
