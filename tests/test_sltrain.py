"""Tests of mini.sltrain: the SLTrain layer against autograd on its dense weight (float64), its
kernels under the Triton interpreter against their references, the converter, checkpoints with
their support checks, every promised error, and the memory estimator's SLTrain method."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from mini.kernels import HAS_TRITON, check_against_reference
from mini.lm import build_model, count_parameters, estimate_memory, tensor_breakdown, tiny_llama_config
from mini.lm.config import is_projected_name, parameter_shapes
from mini.sltrain import (
    PAPER_RECIPES,
    SLTrainReport,
    SparseLowRankLinear,
    check_support,
    convert_to_sltrain,
    gather_support,
    gather_support_reference,
    load_sltrain_state_dict,
    n_nonzeros,
    random_support,
    sltrain_layers,
    sparse_lowrank_linear,
    sparse_lowrank_weight,
    sparse_lowrank_weight_reference,
    tile_offsets,
    top_magnitude_index,
)
from mini.sltrain.kernel import BLOCK_M, BLOCK_N, gather_work, weight_work

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the Triton interpreter needs triton")
F64 = torch.float64


def _layer(n_in=20, n_out=30, rank=4, density=0.1, bias=True, dtype=F64, seed=0, **kw):
    """A layer with B made non-zero (B = 0 at init would hide every term that goes through B)."""
    layer = SparseLowRankLinear(n_in, n_out, rank, density=density, bias=bias, dtype=dtype, seed=seed, **kw)
    with torch.no_grad():
        layer.B.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return layer


# ---------------------------------------------------------------------------------------------
# Initialisation and support
# ---------------------------------------------------------------------------------------------
def test_init_as_the_paper_code():
    m, n, r, d = 48, 40, 6, 0.03
    layer = SparseLowRankLinear(n, m, r, density=d, alpha=16.0, seed=3)
    assert layer.A.shape == (r, n) and layer.B.shape == (m, r) and layer.bias.shape == (m,)
    assert layer.nnz == math.floor(d * m * n) == layer.values.shape[0] == layer.index.shape[0] == 57
    assert layer.index.dtype == torch.int64 and bool((layer.index[1:] > layer.index[:-1]).all())
    assert 0 <= int(layer.index.min()) and int(layer.index.max()) < m * n
    assert bool((layer.B == 0).all())
    assert float(layer.A.detach().abs().max()) <= 1 / math.sqrt(n)
    assert float(layer.values.detach().abs().max()) <= 1 / math.sqrt(n)
    assert float(layer.bias.detach().abs().max()) <= 1 / math.sqrt(m)
    assert layer.scale == 16.0 / r
    # B = 0: the layer starts as its sparse part
    torch.testing.assert_close(layer.dense_weight(), layer.sparse_weight(), rtol=0, atol=0)
    assert int((layer.sparse_weight() != 0).sum()) == layer.nnz
    names = dict(layer.named_parameters())
    assert set(names) == {"A", "B", "values", "bias"} and "index" in dict(layer.named_buffers())
    assert "rank=6" in repr(layer) and "nnz=57" in repr(layer)


def test_draws_follow_the_official_order_from_the_global_generator():
    """bias, A (Kaiming, a = √5), randperm support, values: as SpLoRaLinear draws them."""
    m, n, r, d = 30, 40, 4, 0.1
    torch.manual_seed(7)
    layer = SparseLowRankLinear(n, m, r, density=d)
    torch.manual_seed(7)
    bias = torch.zeros(m)
    nn.init.uniform_(bias, -1 / math.sqrt(m), 1 / math.sqrt(m))
    A = torch.empty(r, n)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    idx = torch.sort(torch.randperm(m * n)[: int(d * m * n)]).values
    vals = torch.empty(idx.numel())
    nn.init.uniform_(vals, -1 / math.sqrt(n), 1 / math.sqrt(n))
    for got, want in ((layer.bias, bias), (layer.A, A), (layer.index, idx), (layer.values, vals)):
        assert torch.equal(got.detach(), want)


def test_support_is_seeded():
    a = SparseLowRankLinear(50, 40, 4, seed=1)
    b = SparseLowRankLinear(50, 40, 4, generator=torch.Generator().manual_seed(1))
    c = SparseLowRankLinear(50, 40, 4, seed=2)
    assert torch.equal(a.index, b.index) and torch.equal(a.A, b.A)
    assert not torch.equal(a.index, c.index)
    s1, s2 = (random_support(40, 50, 0.03, torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(s1, s2) and s1.numel() == 60


def test_random_support_is_uniform_over_rows_and_columns():
    m, n = 64, 80
    counts = torch.zeros(m * n)
    for s in range(200):
        counts[random_support(m, n, 0.05, torch.Generator().manual_seed(s))] += 1
    # each position is in the support with probability ⌊δmn⌋/(mn) = 0.05; 200 draws -> mean 10
    rows, cols = counts.view(m, n).sum(1) / n, counts.view(m, n).sum(0) / m
    assert abs(float(counts.mean()) - 10.0) < 1e-9
    assert float(rows.max() - rows.min()) < 3.0 and float(cols.max() - cols.min()) < 3.0


def test_top_magnitude_index():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 10, generator=g, dtype=F64)
    idx = top_magnitude_index(w, 0.2)
    assert idx.numel() == 24 and bool((idx[1:] > idx[:-1]).all())
    want = torch.sort(torch.argsort(w.abs().reshape(-1), descending=True)[:24]).values
    assert torch.equal(idx, want)
    # of the residual after the best rank-2 approximation
    U, s, Vh = torch.linalg.svd(w)
    res = w - (U[:, :2] * s[:2]) @ Vh[:2]
    want = torch.sort(torch.argsort(res.abs().reshape(-1), descending=True)[:24]).values
    assert torch.equal(top_magnitude_index(w, 0.2, rank=2), want)
    # a layer on it
    layer = SparseLowRankLinear(10, 12, 2, density=0.2, support=idx, dtype=F64)
    assert torch.equal(layer.index, idx)
    assert torch.equal(SparseLowRankLinear(10, 12, 2, density=None, support=idx).index, idx)


# ---------------------------------------------------------------------------------------------
# Forward and backward against autograd on the dense weight
# ---------------------------------------------------------------------------------------------
def _dense_reference(layer, x):
    return x @ layer.dense_weight().t() + (layer.bias if layer.bias is not None else 0)


@pytest.mark.parametrize("lead", [(), (5,), (2, 3), (2, 1, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_autograd_on_dense_w(lead, bias):
    layer = _layer(bias=bias)
    x = torch.randn(*lead, 20, dtype=F64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    y = layer(x)
    assert y.shape == (*lead, 30)
    gy = torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(6))
    params = [p for p in (layer.A, layer.B, layer.values, layer.bias) if p is not None]
    got = torch.autograd.grad(y, [x] + params, gy)
    y_ref = _dense_reference(layer, x)
    want = torch.autograd.grad(y_ref, [x] + params, gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-11)


def test_gradcheck():
    layer = _layer(n_in=7, n_out=9, rank=3, density=0.2)
    x = torch.randn(2, 3, 7, dtype=F64, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def f(x, A, B, values, bias):
        return sparse_lowrank_linear(x, A, B, values, layer.index, bias, layer.scale)

    assert torch.autograd.gradcheck(f, (x, layer.A, layer.B, layer.values, layer.bias))


def test_partial_requires_grad():
    layer = _layer()
    layer.A.requires_grad_(False)
    layer.bias.requires_grad_(False)
    x = torch.randn(4, 20, dtype=F64)  # no grad for x
    layer(x).sum().backward()
    assert layer.A.grad is None and layer.bias.grad is None
    assert layer.B.grad is not None and layer.values.grad is not None
    B_grad, v_grad = layer.B.grad.clone(), layer.values.grad.clone()
    layer.zero_grad()
    _dense_reference(layer, x).sum().backward()
    torch.testing.assert_close(B_grad, layer.B.grad)
    torch.testing.assert_close(v_grad, layer.values.grad)


def test_dense_weight_is_never_saved():
    """The autograd graph holds x and the factors, never an (out, in) tensor."""
    layer = _layer(n_in=20, n_out=30)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    x = torch.randn(6, 20, dtype=F64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert (30, 20) not in shapes and (20, 30) not in shapes
    assert (6, 20) in shapes and (layer.nnz,) in shapes
    y.sum().backward()


def test_low_rank_and_sparse_parts():
    layer = _layer()
    torch.testing.assert_close(layer.low_rank_weight(), layer.B @ layer.A * layer.scale)
    s = layer.sparse_weight().reshape(-1)
    assert torch.equal(s[layer.index], layer.values.detach())
    mask = torch.ones_like(s, dtype=torch.bool)
    mask[layer.index] = False
    assert bool((s[mask] == 0).all())


def test_adam_fits_a_target_map():
    torch.manual_seed(0)
    target = nn.Linear(32, 24)
    layer = SparseLowRankLinear(32, 24, 8, density=0.1, alpha=8.0, seed=0)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(256, 32)
    with torch.no_grad():
        y = target(x)
    losses = []
    for _ in range(60):
        loss = (layer(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


# ---------------------------------------------------------------------------------------------
# Kernels under the interpreter
# ---------------------------------------------------------------------------------------------
WEIGHT_SIZES = [(1, 1, 1, 1.0), (5, 3, 2, 0.5), (63, 65, 7, 0.1), (64, 128, 16, 0.03),
                (130, 70, 40, 0.2), (17, 200, 33, 0.05)]


def _weight_inputs(size, g, dtype=torch.float32):
    m, n, r, d = size
    B = torch.randn(m, r, generator=g).to(dtype)
    A = torch.randn(r, n, generator=g).to(dtype)
    nnz = max(1, int(d * m * n))
    index = torch.sort(torch.randperm(m * n, generator=g)[:nnz]).values
    values = torch.randn(nnz, generator=g).to(dtype)
    return (B, A, values, index), {"scale": 0.75}


@needs_triton
def test_weight_kernel_matches_reference():
    """Sizes below, at and above the 64 × 64 tile, ranks below and above the 32-wide chunk."""
    report = check_against_reference(sparse_lowrank_weight, sparse_lowrank_weight_reference, _weight_inputs,
                                      WEIGHT_SIZES, atol=1e-5, rtol=1e-5)
    assert len(report) == len(WEIGHT_SIZES)


@needs_triton
def test_weight_kernel_float16_and_given_offsets():
    def make(size, g):
        (B, A, values, index), kw = _weight_inputs(size, g, torch.float16)
        return (B, A, values, index), {**kw, "tile_offsets": tile_offsets(index, size[0], size[1])}

    check_against_reference(sparse_lowrank_weight, sparse_lowrank_weight_reference, make,
                            [(63, 65, 7, 0.1), (70, 130, 20, 0.05)], atol=2e-2, rtol=1e-2)


@needs_triton
def test_weight_kernel_dense_support_and_many_entries_per_row():
    """density 1 (every entry a non-zero: the longest runs a tile can have)."""
    check_against_reference(sparse_lowrank_weight, sparse_lowrank_weight_reference, _weight_inputs,
                            [(20, 70, 3, 1.0)], atol=1e-5, rtol=1e-5)


def test_tile_offsets_bound_each_tiles_runs():
    g = torch.Generator().manual_seed(0)
    m, n = 70, 150
    index = random_support(m, n, 0.2, g)
    off = tile_offsets(index, m, n)
    n_tiles = -(-n // BLOCK_N)
    assert off.shape == (m, n_tiles + 1) and off.dtype == torch.int32
    rows, cols = index // n, index % n
    for i in (0, 1, 37, m - 1):
        for c in range(n_tiles):
            run = index[int(off[i, c]): int(off[i, c + 1])]
            want = index[(rows == i) & (cols >= c * BLOCK_N) & (cols < min((c + 1) * BLOCK_N, n))]
            assert torch.equal(run, want)
    assert int(off[-1, -1]) == index.numel() and int(off[0, 0]) == 0


@needs_triton
def test_gather_kernel_matches_reference():
    def make(nnz, g):
        m, n = 37, 101
        index = torch.sort(torch.randperm(m * n, generator=g)[:nnz]).values
        return torch.randn(m, n, generator=g), index

    check_against_reference(gather_support, gather_support_reference, make, [1, 1023, 1024, 1025, 3000],
                            atol=0, rtol=0)


@needs_triton
def test_layer_on_the_interpreter_matches_the_reference():
    """Forward and all gradients through the interpreted kernels (float32, odd sizes)."""
    torch.manual_seed(0)
    layer = SparseLowRankLinear(70, 90, 5, density=0.1, backend="interpret")
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(2, 3, 70, requires_grad=True)
    y = layer(x)
    gy = torch.randn(y.shape)
    params = [x, layer.A, layer.B, layer.values, layer.bias]
    got = torch.autograd.grad(y, params, gy)
    layer.backend = "reference"
    y_ref = layer(x)
    want = torch.autograd.grad(y_ref, params, gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_work_counts():
    w = weight_work(2048, 2048, 512, 125829)
    assert w["flops"] == 2.0 * 2048 * 2048 * 512 + 125829
    assert w["bytes"] > 4 * 2048 * 2048
    assert gather_work(10)["bytes"] == 10 * 16


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [0, -1, 21, 1.5, True, "4"])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        SparseLowRankLinear(20, 30, rank)


@pytest.mark.parametrize("density", [0, -0.1, 1.5, "0.03", True, None, float("nan")])
def test_bad_density(density):
    with pytest.raises(ValueError, match="density"):
        SparseLowRankLinear(20, 30, 4, density=density)


def test_density_giving_no_nonzero():
    with pytest.raises(ValueError, match="no non-zero"):
        SparseLowRankLinear(4, 5, 2, density=0.01)
    assert n_nonzeros(0.05, 4, 5) == 1


@pytest.mark.parametrize("features", [(2.5, 3), (0, 3), (3, -1), (True, 3), ("3", 3)])
def test_bad_features(features):
    with pytest.raises(ValueError, match="features"):
        SparseLowRankLinear(features[0], features[1], 1)


def test_bad_support_and_other_arguments():
    with pytest.raises(ValueError, match="sorted"):
        SparseLowRankLinear(10, 10, 2, density=None, support=torch.tensor([5, 3, 7]))
    with pytest.raises(ValueError, match="sorted"):
        SparseLowRankLinear(10, 10, 2, density=None, support=torch.tensor([3, 3, 7]))
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        SparseLowRankLinear(10, 10, 2, density=None, support=torch.tensor([3, 100]))
    with pytest.raises(TypeError, match="integer"):
        SparseLowRankLinear(10, 10, 2, density=None, support=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="support"):
        SparseLowRankLinear(10, 10, 2, support="top")
    with pytest.raises(ValueError, match="asks for 3"):
        SparseLowRankLinear(10, 10, 2, density=0.03, support=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="non-empty"):
        check_support(torch.tensor([], dtype=torch.int64), 10, 10)
    with pytest.raises(ValueError, match="generator or seed"):
        SparseLowRankLinear(10, 10, 2, density=0.1, seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="alpha"):
        SparseLowRankLinear(10, 10, 2, density=0.1, alpha=0)
    with pytest.raises(ValueError, match="unknown backend"):
        SparseLowRankLinear(10, 10, 2, density=0.1, backend="cuda")
    with pytest.raises(ValueError, match="weight must be a 2-D"):
        top_magnitude_index(torch.zeros(3), 0.5)


def test_bad_inputs_to_forward():
    layer = _layer(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\(\.\.\., 20\)"):
        layer(torch.randn(3, 21))
    with pytest.raises(TypeError, match="dtype torch.float64"):
        layer(torch.randn(3, 20, dtype=F64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([1.0] * 20)


def test_kernel_errors():
    g = torch.Generator().manual_seed(0)
    (B, A, values, index), _ = _weight_inputs((8, 9, 2, 0.3), g)
    # without triton installed the same call names the missing package instead
    no_cuda = (ValueError, "CUDA") if HAS_TRITON else (RuntimeError, "needs triton")
    with pytest.raises(no_cuda[0], match=no_cuda[1]):
        sparse_lowrank_weight(B, A, values, index, backend="triton")
    with pytest.raises(no_cuda[0], match=no_cuda[1]):
        gather_support(torch.randn(8, 9), index, backend="triton")
    if HAS_TRITON:
        with pytest.raises(TypeError, match="dtype"):  # the kernel takes float32/16/bf16
            sparse_lowrank_weight(B.double(), A.double(), values.double(), index, backend="interpret")
        with pytest.raises(ValueError, match="contiguous"):
            sparse_lowrank_weight(B.t().contiguous().t(), A, values, index, backend="interpret")
    with pytest.raises(TypeError, match="A"):
        sparse_lowrank_weight(B, A.double(), values, index, backend="reference")
    with pytest.raises(TypeError, match="index"):
        sparse_lowrank_weight(B, A, values, index.int(), backend="reference")
    with pytest.raises(ValueError, match="A must have shape"):
        sparse_lowrank_weight(B, A[:1], values, index, backend="reference")
    with pytest.raises(ValueError, match="index must have shape"):
        sparse_lowrank_weight(B, A, values, index[:-1], backend="reference")
    with pytest.raises(ValueError, match="tile_offsets"):
        sparse_lowrank_weight(B, A, values, index, tile_offsets=torch.zeros(8, 5, dtype=torch.int32),
                              backend="reference")
    with pytest.raises(TypeError, match="scale"):
        sparse_lowrank_weight(B, A, values, index, scale=True, backend="reference")
    with pytest.raises(ValueError, match="out must have shape"):
        gather_support(torch.randn(8, 9), index, out=torch.empty(2), backend="reference")


def test_layer_on_the_cuda_only_path_with_cpu_tensors():
    layer = SparseLowRankLinear(20, 30, 4, density=0.1, backend="triton")
    error, match = (ValueError, "CUDA-only path") if HAS_TRITON else (RuntimeError, "needs triton")
    with pytest.raises(error, match=match):
        layer(torch.randn(2, 20))


def test_float64_on_auto_uses_the_reference():
    layer = _layer()  # float64: the kernels take float32/16/bf16 only; "auto" runs the reference
    assert layer(torch.randn(2, 20, dtype=F64)).dtype == F64


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_round_trip_exact():
    layer = _layer(dtype=torch.float32, seed=4)
    state = _roundtrip(layer.state_dict())
    assert set(state) == {"A", "B", "values", "bias", "index", "_extra_state"} and state["index"].dtype == torch.int64
    fresh = SparseLowRankLinear(20, 30, 4, density=0.1, seed=4)  # same seed: same support
    fresh.load_state_dict(state)
    x = torch.randn(3, 20)
    assert torch.equal(fresh(x), layer(x))
    for k, v in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_loading_a_different_support_is_an_error():
    state = _layer(dtype=torch.float32, seed=4).state_dict()
    other = SparseLowRankLinear(20, 30, 4, density=0.1, seed=5)
    with pytest.raises(ValueError, match=r"index: the checkpoint's sparse support does not match .* positions differ"):
        other.load_state_dict(state)
    smaller = SparseLowRankLinear(20, 30, 4, density=0.05, seed=4)
    with pytest.raises(ValueError, match="it holds 60 positions, the layer 30"):
        smaller.load_state_dict(state)
    # adopting the checkpoint's support
    other.load_state_dict(state, adopt_support=True)
    assert torch.equal(other.index, state["index"]) and torch.equal(other.values.detach(), state["values"])
    smaller.load_state_dict(state, adopt_support=True)
    assert smaller.nnz == 60 and smaller.values.shape == (60,)
    x = torch.randn(2, 20)
    ref = SparseLowRankLinear.from_state_dict(state, alpha=32.0)
    assert torch.equal(smaller(x), ref(x)) and torch.equal(other(x), ref(x))
    assert not other._adopt_support


def test_loading_mismatched_shapes_is_an_error():
    state = _layer(dtype=torch.float32).state_dict()
    with pytest.raises(ValueError, match=r"cannot load A: the checkpoint has shape \(4, 20\), the layer \(8, 20\)"):
        SparseLowRankLinear(20, 30, 8, density=0.1, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot load B"):
        SparseLowRankLinear(20, 31, 4, density=0.1, seed=0).load_state_dict(state)
    bad = dict(state, values=state["values"][:-1])
    with pytest.raises(ValueError, match="values"):
        SparseLowRankLinear(20, 30, 4, density=0.1, seed=0).load_state_dict(bad)
    with pytest.raises(ValueError, match="lacks 'index'"):
        SparseLowRankLinear.from_state_dict({k: v for k, v in state.items() if k != "index"})


def test_from_state_dict_without_bias_and_with_prefix():
    layer = _layer(bias=False, dtype=torch.float32, alpha=8.0)
    state = {f"blk.{k}": v for k, v in layer.state_dict().items()}
    rebuilt = SparseLowRankLinear.from_state_dict(state, alpha=8.0, prefix="blk.")
    assert rebuilt.bias is None and rebuilt.rank == 4 and rebuilt.nnz == layer.nnz
    x = torch.randn(5, 20)
    assert torch.equal(rebuilt(x), layer(x))


# ---------------------------------------------------------------------------------------------
# The converter
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cfg():
    return tiny_llama_config(vocab_size=64, num_hidden_layers=2)


def test_convert_replaces_the_projections_only(cfg):
    model = build_model(cfg, seed=0)
    before = count_parameters(model)
    state = torch.random.get_rng_state()
    rep = convert_to_sltrain(model, rank=16, density=0.03, alpha=32.0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert isinstance(rep, SLTrainReport) and len(rep.replaced) == 7 * cfg.num_hidden_layers
    layers = sltrain_layers(model)
    assert [n for n, _ in layers] == rep.replaced
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    # parameters r(m + n) + ⌊δ m n⌋ per matrix, the rest unchanged
    shapes = parameter_shapes(cfg)
    want = sum(16 * (s[0] + s[1]) + int(0.03 * s[0] * s[1]) if len(s) == 2 and is_projected_name(k)
               else math.prod(s) for k, s in shapes.items())
    assert rep.params_before == before and rep.params_after == want == sum(p.numel() for p in model.parameters())
    assert rep.index_entries == sum(m.nnz for _, m in layers) == rep.sparse_params
    assert rep.low_rank_params == sum(m.A.numel() + m.B.numel() for _, m in layers)
    assert "index entries" in str(rep)
    # the estimator counts the same trainable elements
    est = estimate_memory(cfg, "sltrain", rank=16, density=0.03)
    assert est.n_trainable == rep.params_after and est.index_bytes == 8 * rep.index_entries
    # it trains: a loss and a backward through every layer
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(m.values.grad is not None and m.A.grad is not None for _, m in layers)


def test_convert_is_seeded_and_checkpoints_resume(cfg):
    a, b, c = (build_model(cfg, seed=0) for _ in range(3))
    convert_to_sltrain(a, rank=8, seed=0)
    convert_to_sltrain(b, rank=8, seed=0)
    convert_to_sltrain(c, rank=8, seed=1)
    for (_, la), (_, lb), (_, lc) in zip(sltrain_layers(a), sltrain_layers(b), sltrain_layers(c)):
        assert torch.equal(la.index, lb.index) and not torch.equal(la.index, lc.index)
    # a trained step, saved, loaded into the same-seed model; a different seed must refuse
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    a(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    state = _roundtrip(a.state_dict())
    b.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    with pytest.raises(ValueError, match="support does not match"):
        c.load_state_dict(state)
    load_sltrain_state_dict(c, state, adopt_support=True)
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, c(input_ids=ids).logits)


def test_trainer_resumes_an_sltrain_model_bitwise(tmp_path):
    """mini.lm.train_lm's checkpoints carry the supports; a resume into a model converted with
    the same seed continues bitwise, one converted with another seed is refused."""
    from mini.lm import TrainerConfig, synthetic_lm_data, train_lm

    data = synthetic_lm_data(60, seed=0)
    cfg = tiny_llama_config(vocab_size=data.tokenizer.vocab_size, num_hidden_layers=1)
    fast = dict(batch_size=2, seq_len=16, eval_every=4, eval_batches=1, progress=False)

    def make(seed):
        model = build_model(cfg, seed=0)
        convert_to_sltrain(model, rank=8, alpha=8.0, seed=seed)
        return model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    m1, o1 = make(0)
    h1 = train_lm(m1, o1, data, TrainerConfig(steps=8, **fast))
    m2, o2 = make(0)
    train_lm(m2, o2, data, TrainerConfig(steps=4, checkpoint_dir=str(tmp_path), checkpoint_every=4, **fast))
    path = tmp_path / "step_000004.pt"
    m3, o3 = make(0)
    h3 = train_lm(m3, o3, data, TrainerConfig(steps=8, **fast), resume_from=path)
    for (n, a), b in zip(m1.named_parameters(), m3.parameters()):
        assert torch.equal(a, b), n
    assert h1.train_loss == h3.train_loss
    m4, o4 = make(1)
    with pytest.raises(ValueError, match="support does not match"):
        train_lm(m4, o4, data, TrainerConfig(steps=8, **fast), resume_from=path)


def test_convert_errors(cfg):
    with pytest.raises(ValueError, match="match no nn.Linear"):
        convert_to_sltrain(build_model(cfg, seed=0), rank=8, patterns=[r"\.nothing$"])
    with pytest.raises(ValueError, match="rank"):
        convert_to_sltrain(build_model(cfg, seed=0), rank=0)
    with pytest.raises(ValueError, match="density"):
        convert_to_sltrain(build_model(cfg, seed=0), rank=8, density=1.5)
    with pytest.raises(ValueError, match="seed"):
        convert_to_sltrain(build_model(cfg, seed=0), rank=8, seed=0.5)
    with pytest.raises(TypeError, match="nn.Module"):
        load_sltrain_state_dict({}, {})


def test_convert_caps_the_rank_and_keeps_other_patterns(cfg):
    model = build_model(cfg, seed=0)
    rep = convert_to_sltrain(model, rank=10_000, patterns=[r"mlp\.down_proj$"])
    assert len(rep.replaced) == cfg.num_hidden_layers
    down = model.get_submodule(rep.replaced[0])
    assert down.rank == min(cfg.hidden_size, cfg.intermediate_size)
    assert isinstance(model.get_submodule(rep.replaced[0].replace("down_proj", "up_proj")), nn.Linear)


# ---------------------------------------------------------------------------------------------
# The memory estimator's SLTrain methods
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, full, sltrain, low_rank", [
    ("llama_60m", 58.1, 43.5, 42.8),
    ("llama_130m", 134.1, 96.5, 94.0),
    ("llama_350m", 368.0, 194.3, 185.2),
    ("llama_1b", 1339.1, 645.5, 609.3),
])
def test_memory_digest_parameter_counts(config, full, sltrain, low_rank):
    """The digest's counts with the paper's ranks (DEFAULT_RANKS) and δ = 0.03."""
    s = estimate_memory(config, "sltrain")
    assert s.options["density"] == 0.03
    assert round(s.n_params / 1e6, 1) == full
    assert round(s.n_trainable / 1e6, 1) == sltrain
    assert round(estimate_memory(config, "low_rank").n_trainable / 1e6, 1) == low_rank


def test_memory_sltrain_accounting():
    one_b = estimate_memory("llama_1b", "sltrain")
    # the digest: 0.29 GB of int64 indices at 1B against 0.07 GB of BF16 values
    nnz = one_b.index_bytes / 8
    assert round(one_b.index_gb, 2) == 0.29 and round(2 * nnz / 1e9, 2) == 0.07
    for ib in (8, 4, 0):
        r = estimate_memory("llama_1b", "sltrain", index_bytes=ib)
        assert r.index_bytes == ib * nnz
        assert r.weight_bytes == 2 * r.n_trainable + ib * nnz
        assert r.state_bytes == 2 * 2 * r.n_trainable and r.grad_bytes == 2 * r.n_trainable
    # 7B: r = 1024, δ = 0.05 by default; 8-bit states and per-layer updates
    seven = estimate_memory("llama_7b", "sltrain8bit", per_layer_updates=True)
    assert seven.rank == 1024 and seven.options["density"] == 0.05
    assert round(seven.n_trainable / 1e6) == 3145
    galore = estimate_memory("llama_7b", "galore8bit", per_layer_updates=True)
    adam = estimate_memory("llama_7b", "adam")
    assert seven.total_bytes < galore.total_bytes < adam.total_bytes
    assert seven.states_gb < estimate_memory("llama_7b", "sltrain", per_layer_updates=True).states_gb
    # per tensor: A, B, values each get their own 8-bit moments
    for t in tensor_breakdown("llama_60m", "sltrain8bit"):
        if t.projected:
            m, n = t.shape
            sizes = (128 * n, m * 128, int(0.03 * m * n))
            assert t.states == sum(2 * (k + math.ceil(k / 256) * 4) if k >= 4096 else 8 * k for k in sizes)
    row = one_b.as_row()
    assert row["total_GB"] == pytest.approx(row["weights_GB"] + row["grads_GB"] + row["states_GB"] + row["projectors_GB"])
    assert row["index_GB"] == one_b.index_gb


def test_recipes_agree_with_the_estimator_defaults():
    from mini.lm.memory import DEFAULT_RANKS, SLTRAIN_DENSITIES
    assert set(PAPER_RECIPES) == set(DEFAULT_RANKS)
    for name, rec in PAPER_RECIPES.items():
        assert rec.rank == DEFAULT_RANKS[name] and rec.density == SLTRAIN_DENSITIES[name]
    assert PAPER_RECIPES["llama_7b"].optimizer == "adam8bit" and PAPER_RECIPES["llama_60m"].alpha == 32.0


def test_memory_sltrain_errors():
    with pytest.raises(ValueError, match="index_bytes"):
        estimate_memory("llama_60m", "sltrain", index_bytes=-1)
    with pytest.raises(ValueError, match="density"):
        estimate_memory("llama_60m", "sltrain", density=0)
    with pytest.raises(ValueError, match="rank"):
        estimate_memory("llama_60m", "sltrain8bit", rank=0)


# ----------------------------------------------------------------------------- hyperparameters in checkpoints (issue 15)
def test_alpha_is_saved_and_a_different_alpha_is_an_error():
    a16 = SparseLowRankLinear(20, 30, 4, density=0.1, alpha=16.0, seed=4)
    with torch.no_grad():
        a16.B.normal_()  # B = 0 at initialisation would hide α
    state = _roundtrip(a16.state_dict())  # weights_only=True
    assert state["_extra_state"].dtype == torch.float64
    a32 = SparseLowRankLinear(20, 30, 4, density=0.1, alpha=32.0, seed=4)
    before = {k: v.clone() for k, v in a32.state_dict().items()}
    with pytest.raises(ValueError, match=r"alpha=16 .*this layer has alpha=32"):
        a32.load_state_dict(state)
    # nothing was loaded
    assert all(torch.equal(a32.state_dict()[k], v) for k, v in before.items() if k != "_extra_state")
    with pytest.raises(ValueError, match=r"alpha=16 .*this layer has alpha=32"):
        load_sltrain_state_dict(nn.Sequential(a32), {f"0.{k}": v for k, v in state.items()}, adopt_support=True)
    # the right α loads, exactly
    same = SparseLowRankLinear(20, 30, 4, density=0.1, alpha=16.0, seed=4)
    same.load_state_dict(state)
    x = torch.randn(3, 20)
    assert torch.equal(same(x), a16(x))
    # from_state_dict reads α from the checkpoint, and checks one that is passed
    rebuilt = SparseLowRankLinear.from_state_dict(state)
    assert rebuilt.alpha == 16.0 and torch.equal(rebuilt(x), a16(x))
    with pytest.raises(ValueError, match="alpha=16"):
        SparseLowRankLinear.from_state_dict(state, alpha=32.0)


def test_model_checkpoint_with_other_alpha_fails_on_load():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 24), nn.Linear(24, 24))
    other = copy.deepcopy(model)
    convert_to_sltrain(model, rank=4, alpha=16.0, patterns=[r"^\d$"], seed=1)
    convert_to_sltrain(other, rank=4, alpha=32.0, patterns=[r"^\d$"], seed=1)
    with pytest.raises(ValueError, match=r"0\._extra_state: the checkpoint was trained with alpha=16"):
        other.load_state_dict(_roundtrip(model.state_dict()))


def test_old_checkpoint_without_hyperparameters_loads_with_a_warning():
    layer = SparseLowRankLinear(20, 30, 4, density=0.1, alpha=8.0, seed=4)
    state = {k: v for k, v in layer.state_dict().items() if k != "_extra_state"}
    fresh = SparseLowRankLinear(20, 30, 4, density=0.1, alpha=8.0, seed=4)
    with pytest.warns(UserWarning, match="alpha cannot be checked"):
        fresh.load_state_dict(state)  # strict
    with pytest.raises(ValueError, match="pass the alpha the checkpoint was trained with"):
        SparseLowRankLinear.from_state_dict(state)
    assert SparseLowRankLinear.from_state_dict(state, alpha=8.0).alpha == 8.0


def test_corrupt_hyperparameters_are_an_error():
    state = SparseLowRankLinear(20, 30, 4, density=0.1, seed=4).state_dict()
    with pytest.raises(ValueError, match="expected the SLTrain layer's hyperparameters"):
        SparseLowRankLinear(20, 30, 4, density=0.1, seed=4).load_state_dict(dict(state, _extra_state=torch.zeros(2)))
    bad = state["_extra_state"].clone()
    bad[5] += 1
    with pytest.raises(ValueError, match="records 61 support positions, the checkpoint's index holds 60"):
        SparseLowRankLinear(20, 30, 4, density=0.1, seed=4).load_state_dict(dict(state, _extra_state=bad))
