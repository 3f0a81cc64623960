"""Tests of mini.spinquant.quantizers: fake quantisers, RTN and GPTQ.

References: cases worked out by hand below, numpy brute force (clip search), autograd (the
straight-through gradient), and a textbook float64 OBQ-style GPTQ loop written here.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mini.spinquant.quantizers import (
    GPTQ_SEQUENTIAL,
    HessianAccumulator,
    QuantConfig,
    gptq_quantize_linear_,
    gptq_quantize_model_,
    gptq_quantize_weight,
    quantize_activation,
    quantize_kv,
    quantize_weight,
    quantize_weight_with_scale,
    rtn_quantize_linear_,
    rtn_quantize_model_,
    weight_scale,
)

D = torch.float64


def t(*rows):
    return torch.tensor(rows, dtype=D)


# --------------------------------------------------------------------------- QuantConfig
@pytest.mark.parametrize("setting, bits", [("W4A4KV4", (4, 4, 4, 4)), ("W4A16KV16", (4, 16, 16, 16)),
                                           ("W16A4KV4", (16, 4, 4, 4)), ("W4A8K4V8", (4, 8, 4, 8))])
def test_config_parse_and_str_round_trip(setting, bits):
    c = QuantConfig.parse(setting)
    assert (c.w_bits, c.a_bits, c.k_bits, c.v_bits) == bits
    assert str(c) == setting
    assert QuantConfig.parse(str(c)) == c
    assert QuantConfig.parse("w4a4kv4", a_clip=0.9).a_clip == 0.9


@pytest.mark.parametrize("field, value", [("w_bits", 1), ("a_bits", 17), ("k_bits", 0), ("v_bits", 3.5), ("w_bits", True)])
def test_config_bits_outside_range(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be an integer in 2\.\.16.*{value!r}"):
        QuantConfig(**{field: value})


def test_config_other_errors():
    with pytest.raises(ValueError, match=r"'W4A4' is not of the form"):
        QuantConfig.parse("W4A4")
    with pytest.raises(ValueError, match=r"w_bits must be an integer in 2\.\.16.*32"):
        QuantConfig.parse("W32A4KV4")
    with pytest.raises(ValueError, match=r"a_clip must be a number in \(0, 1\], got 0"):
        QuantConfig(a_clip=0)
    with pytest.raises(ValueError, match=r"kv_clip must be a number in \(0, 1\], got 1.5"):
        QuantConfig(kv_clip=1.5)
    with pytest.raises(ValueError, match=r"a_groupsize must be None .* got -4"):
        QuantConfig(a_groupsize=-4)
    with pytest.raises(TypeError, match="setting must be a str"):
        QuantConfig.parse(4)


# --------------------------------------------------------------------------- activations, by hand
# bits 2: maxq = 3, s = (m⁺ − m⁻)/3, z = round(−m⁻/s), x̂ = s(clamp(round(x/s) + z, 0, 3) − z)
HAND_CASES = [
    # mixed signs: m⁺ = 2, m⁻ = -0.5, s = 5/6, z = round(0.6) = 1
    ([0.3, 1.0, 2.0, -0.5], 1.0, [0.0, 5 / 6, 5 / 3, -5 / 6]),
    # all positive: m⁻ = 0 (range contains 0), s = 1/3, z = 0; 0 stays exactly 0
    ([0.2, 0.5, 1.0, 0.0], 1.0, [1 / 3, 2 / 3, 1.0, 0.0]),
    # all positive without a zero entry: still z = 0, s = 2/3, so 1.0 -> round(1.5) = 2 -> 4/3
    ([1.0, 2.0], 1.0, [4 / 3, 2.0]),
    # all negative: m⁺ = 0, s = 1/3, z = 3; -0.4 -> round(-1.2) + 3 = 2 -> -1/3
    ([-1.0, -0.4, 0.0], 1.0, [-1.0, -1 / 3, 0.0]),
    # ties round half to even: s = 1, z = 0; 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    ([0.5, 1.5, 2.5, 3.0], 1.0, [0.0, 2.0, 2.0, 3.0]),
    # clip 0.5: m⁺ = 2, m⁻ = -0.5, s = 5/6, z = 1; 4 -> round(4.8) + 1 = 6 -> clamp 3 -> 5/3
    ([-1.0, 0.0, 1.0, 4.0], 0.5, [-5 / 6, 0.0, 5 / 6, 5 / 3]),
]


@pytest.mark.parametrize("x, clip, expected", HAND_CASES)
def test_activation_hand_cases(x, clip, expected):
    got = quantize_activation(t(x), 2, clip_ratio=clip)
    torch.testing.assert_close(got, t(expected), rtol=0, atol=1e-15)
    got32 = quantize_activation(t(x).float(), 2, clip_ratio=clip)
    torch.testing.assert_close(got32, t(expected).float(), rtol=0, atol=1e-6)


def test_zero_is_exact_for_every_group():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, 16, generator=g, dtype=D) + 0.1  # every row one-signed (positive) ...
    x[25:] *= -1  # ... or negative
    x[:, 3] = 0.0
    for bits in (2, 3, 4, 8):
        y = quantize_activation(x, bits)
        assert bool((y[:, 3] == 0).all())
        step = (y.amax(1) - torch.minimum(y.amin(1), torch.zeros(50, dtype=D))) / (2**bits - 1)
        assert bool(((y - x).abs() <= step[:, None] / 2 + 1e-12).all())  # within half a step


def test_zero_range_group_gives_zeros_without_nan():
    x = torch.zeros(3, 8, requires_grad=True)
    y = quantize_activation(x, 4)
    assert torch.equal(y, torch.zeros(3, 8))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 8))
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, -2.0, 0.5, 0.25]])
    got = quantize_activation(z, 4, groupsize=4)  # first group empty, second not
    assert torch.equal(got[0, :4], torch.zeros(4)) and bool(torch.isfinite(got).all())


def _np_asym(x: np.ndarray, bits: int, clip: float) -> np.ndarray:
    """Brute-force per-row reference in float64."""
    out = np.empty_like(x)
    maxq = 2**bits - 1
    for i, row in enumerate(x):
        hi, lo = max(row.max(), 0.0) * clip, min(row.min(), 0.0) * clip
        if hi == 0 and lo == 0:
            hi, lo = 1.0, -1.0
        s = (hi - lo) / maxq
        z = np.round(-lo / s)
        out[i] = s * (np.clip(np.round(row / s) + z, 0, maxq) - z)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_activation_against_numpy_and_groups(bits, clip):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 5, 24, generator=g, dtype=D) * 3
    got = quantize_activation(x, bits, clip_ratio=clip)
    np.testing.assert_allclose(got.numpy(), _np_asym(x.reshape(-1, 24).numpy(), bits, clip).reshape(x.shape), atol=1e-14)
    grouped = quantize_activation(x, bits, clip_ratio=clip, groupsize=6)
    np.testing.assert_allclose(grouped.numpy(), _np_asym(x.reshape(-1, 6).numpy(), bits, clip).reshape(x.shape), atol=1e-14)
    # per-head KV: (batch, seq, heads·head_dim) and (batch, heads, seq, head_dim) give the same groups
    kv = quantize_kv(x, bits, head_dim=8, clip_ratio=clip)
    np.testing.assert_allclose(kv.numpy(), _np_asym(x.reshape(-1, 8).numpy(), bits, clip).reshape(x.shape), atol=1e-14)
    heads_first = x.view(2, 5, 3, 8).transpose(1, 2).contiguous()
    torch.testing.assert_close(quantize_kv(heads_first, bits, 8, clip).transpose(1, 2).reshape(x.shape), kv)


def test_clip_ratio_trades_the_outlier_for_the_rest():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 64, generator=g, dtype=D)
    x[:, 0] = 20.0  # one outlier per token
    errs = {c: (quantize_activation(x, 4, clip_ratio=c) - x)[:, 1:].abs().mean().item() for c in (1.0, 0.5)}
    assert errs[0.5] < 0.75 * errs[1.0], errs  # the 63 ordinary entries get half the step (0.64 seen)
    clipped = quantize_activation(x, 4, clip_ratio=0.5)[:, 0]
    s = (10.0 - 0.5 * x.amin(1).clamp(max=0)) / 15  # (200,) the step at clip 0.5
    assert bool((clipped <= 10.0 + s / 2 + 1e-12).all())  # the outlier is clipped to c · max (± the zero point's half step)


def test_straight_through_gradient_is_identity():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 12, generator=g, dtype=D, requires_grad=True)
    w = torch.randn(4, 12, generator=g, dtype=D)
    for f in (lambda v: quantize_activation(v, 3, 0.9), lambda v: quantize_activation(v, 4, groupsize=4),
              lambda v: quantize_kv(v, 2, 6), lambda v: quantize_weight(v, 3)):
        x.grad = None
        y = f(x)
        assert not torch.equal(y, x)  # it does quantise
        (y * w).sum().backward()
        assert torch.equal(x.grad, w)
    assert torch.autograd.gradcheck(lambda v: quantize_activation(v, 16), (x,))  # 16 bits: identity


def test_sixteen_bits_and_dtypes():
    x = torch.randn(3, 10)
    assert quantize_activation(x, 16) is x and quantize_weight(x, 16) is x
    xb = x.to(torch.bfloat16)
    yb = quantize_activation(xb, 4)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb, quantize_activation(xb.float(), 4).to(torch.bfloat16), rtol=0, atol=0)


def test_activation_bad_inputs():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"bits must be an integer in 2\.\.16.*got 1"):
        quantize_activation(x, 1)
    with pytest.raises(ValueError, match=r"bits must be an integer in 2\.\.16.*got 17"):
        quantize_weight(x, 17)
    with pytest.raises(ValueError, match=r"clip_ratio must be a number in \(0, 1\], got 0.0"):
        quantize_activation(x, 4, clip_ratio=0.0)
    with pytest.raises(ValueError, match=r"groupsize=3 must divide the last dimension 8"):
        quantize_activation(x, 4, groupsize=3)
    with pytest.raises(ValueError, match=r"must be a multiple of head_dim=3"):
        quantize_kv(x, 4, head_dim=3)
    with pytest.raises(ValueError, match=r"head_dim must be a positive integer, got 0"):
        quantize_kv(x, 4, head_dim=0)
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got dtype torch.int64"):
        quantize_activation(torch.ones(2, 8, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"w must be a 2-D weight"):
        quantize_weight(torch.randn(8), 4)


# --------------------------------------------------------------------------- weights
def test_weight_hand_case_and_levels():
    # bits 3: levels -4..3, s = max|w| / 3 = 1/3: 1 -> 3, -0.5 -> round(-1.5) = -2, 0.25 -> round(0.75) = 1, 0.1 -> 0
    w = t([1.0, -0.5, 0.25, 0.1])
    torch.testing.assert_close(quantize_weight(w, 3, clip_search=False), t([1.0, -2 / 3, 1 / 3, 0.0]), rtol=0, atol=1e-15)
    # bits 2: levels -2..1, s = 1: -0.5 rounds half to even (0), the negative level -2 exists
    torch.testing.assert_close(quantize_weight(t([1.0, -0.5, -1.0]), 2, clip_search=False), t([1.0, 0.0, -1.0]))
    g = torch.Generator().manual_seed(3)
    W = torch.randn(16, 40, generator=g, dtype=D)
    for bits in (2, 3, 4, 8):
        for search in (False, True):
            s = weight_scale(W, bits, search)
            k = quantize_weight(W, bits, search) / s
            torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-9)
            assert float(k.round().min()) >= -(2 ** (bits - 1)) and float(k.round().max()) <= 2 ** (bits - 1) - 1
        # without the search, the largest |w| of each row is a grid point (±(2^{b-1}-1) s)
        amax = W.abs().amax(1)
        torch.testing.assert_close(weight_scale(W, bits, False)[:, 0] * (2 ** (bits - 1) - 1), amax)


def _np_clip_search(W: np.ndarray, bits: int) -> np.ndarray:
    """Brute force: for each row, every shrink p = 1 - k/100 (k < 80), first minimiser of Σ|Q - w|^2.4."""
    maxq = 2 ** (bits - 1) - 1
    out = np.empty(W.shape[0])
    for i, row in enumerate(W):
        xmax = max(np.abs(row).max(), 1e-5)
        errs = []
        for k in range(80):
            s = ((1 - k / 100) * xmax) / maxq
            q = s * np.clip(np.round(row / s), -maxq - 1, maxq)
            errs.append(np.sum(np.abs(q - row) ** 2.4))
        out[i] = ((1 - int(np.argmin(errs)) / 100) * xmax) / maxq
    return out


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clip_search_against_brute_force(bits):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(24, 50, generator=g, dtype=D)
    W[::4, 0] *= 8  # outlier rows, where the search shrinks a lot
    s = weight_scale(W, bits, clip_search=True)[:, 0]
    np.testing.assert_allclose(s.numpy(), _np_clip_search(W.numpy(), bits), rtol=1e-12)
    shrink = (s * (2 ** (bits - 1) - 1) / W.abs().amax(1)).numpy()
    assert shrink.min() < 0.9 and shrink.max() <= 1.0 + 1e-12 and shrink.min() >= 0.21 - 1e-12
    # the search never does worse on its own criterion than p = 1, and better on some row
    e = lambda q: (q - W).abs().pow(2.4).sum(1)
    e_s, e_1 = e(quantize_weight(W, bits, True)), e(quantize_weight(W, bits, False))
    assert bool((e_s <= e_1).all()) and bool((e_s < e_1).any())


def test_rtn_linear_in_place():
    torch.manual_seed(0)
    lin = nn.Linear(12, 5)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    assert rtn_quantize_linear_(lin, 4) is lin
    torch.testing.assert_close(lin.weight.detach(), quantize_weight(w0, 4))
    assert torch.equal(lin.bias.detach(), b0)
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear, got Conv1d"):
        rtn_quantize_linear_(nn.Conv1d(2, 2, 1), 4)


# --------------------------------------------------------------------------- GPTQ
def _textbook_gptq(W: torch.Tensor, H: torch.Tensor, bits: int, scale: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Unblocked OBQ-style loop in float64 with an explicit inverse, updated by Gaussian elimination."""
    W = W.clone().double()
    H = H.clone().double()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H = H + percdamp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=D)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for i in range(W.shape[1]):
        q = quantize_weight_with_scale(W[:, i], scale[:, 0], bits)
        Q[:, i] = q
        err = (W[:, i] - q) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]  # OBS update of the remaining columns
        Hinv = Hinv - torch.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]  # remove column i
    return Q


def _layer_data(out_f: int, in_f: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g, dtype=D)
    mix = torch.randn(in_f, in_f, generator=g, dtype=D)  # correlated inputs: where GPTQ helps
    X = torch.randn(n, in_f, generator=g, dtype=D) @ mix
    return W, X


def test_gptq_with_identity_hessian_is_rtn():
    W, _ = _layer_data(8, 20, 1, 0)
    for bits in (2, 4):
        for search in (False, True):
            Q = gptq_quantize_weight(W, torch.eye(20, dtype=D), bits, clip_search=search)
            assert torch.equal(Q, quantize_weight_with_scale(W, weight_scale(W, bits, search), bits))
            assert torch.equal(Q, quantize_weight(W, bits, search))


@pytest.mark.parametrize("blocksize", [1, 3, 4, 128])
def test_gptq_matches_textbook_loop(blocksize):
    W, X = _layer_data(6, 10, 40, 1)  # width 10: blocks of 3 and 4 do not divide it
    X[:, 7] = 0.0  # a dead input feature
    acc = HessianAccumulator(10, dtype=D)
    acc.add_batch(X)
    for bits in (2, 3, 4):
        Q = gptq_quantize_weight(W, acc.H, bits, blocksize=blocksize)
        ref = _textbook_gptq(W, acc.H, bits, weight_scale(W, bits, True))
        torch.testing.assert_close(Q, ref, rtol=0, atol=1e-10)
        assert bool((Q[:, 7] == 0).all())
        assert not torch.equal(Q, quantize_weight(W, bits))  # the error propagation did something


@pytest.mark.parametrize("shape, all_seeds", [((8, 16), True), ((4, 6), False)])
def test_gptq_output_error_not_above_rtn(shape, all_seeds):
    """GPTQ is greedy, not optimal: on 8×16 it beat RTN at every one of 30 seeds checked (ratio of
    output errors 0.76 on average at 3 bits); on 4×6 it lost at 3 of 30 (worst 1.23, mean 0.88), so
    there only the mean is asserted."""
    out_f, in_f = shape
    ratios = []
    for seed in range(10):
        W, X = _layer_data(out_f, in_f, 64, seed)
        lin_g, lin_r = nn.Linear(in_f, out_f, bias=False).double(), nn.Linear(in_f, out_f, bias=False).double()
        with torch.no_grad():
            lin_g.weight.copy_(W)
            lin_r.weight.copy_(W)
        gptq_quantize_linear_(lin_g, X, 3)
        rtn_quantize_linear_(lin_r, 3)
        e_g = torch.linalg.norm(X @ W.T - X @ lin_g.weight.detach().T)
        e_r = torch.linalg.norm(X @ W.T - X @ lin_r.weight.detach().T)
        ratios.append(float(e_g / e_r))
    if all_seeds:
        assert max(ratios) <= 1.0, ratios
    assert np.mean(ratios) < 0.95, ratios


def test_gptq_float32_path_close_to_float64():
    W, X = _layer_data(16, 48, 200, 4)
    acc = HessianAccumulator(48)  # float32, as in the official code
    acc.add_batch(X.float())
    Q32 = gptq_quantize_weight(W.float(), acc.H, 4)
    Q64 = _textbook_gptq(W, acc.H.double(), 4, weight_scale(W, 4, True))
    frac = float((Q32.double() - Q64).abs().gt(1e-4).float().mean())
    assert Q32.dtype == torch.float32 and frac < 0.02, frac  # a rare rounding flip at most


def test_hessian_accumulator_batches_and_hook():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(3, 7, 9, generator=g, dtype=D)
    one = HessianAccumulator(9, dtype=D)
    one.add_batch(X)
    flat = X.reshape(-1, 9)
    torch.testing.assert_close(one.H, 2 * flat.T @ flat / 21)
    two = HessianAccumulator(9, dtype=D)
    lin = nn.Linear(9, 2).double()
    handle = two.hook(lin)
    lin(X[:1])
    lin(X[1:])
    handle.remove()
    lin(X)  # after remove: not counted
    assert two.nsamples == 21
    torch.testing.assert_close(two.H, one.H)
    with pytest.raises(ValueError, match=r"last dimension in_features=9, got shape \(2, 4\)"):
        two.add_batch(torch.randn(2, 4, dtype=D))
    with pytest.raises(ValueError, match="in_features must be a positive integer, got 0"):
        HessianAccumulator(0)


def test_gptq_bad_inputs():
    W = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"H must have shape \(5, 5\) for w of shape \(3, 5\), got \(4, 4\)"):
        gptq_quantize_weight(W, torch.eye(4), 4)
    with pytest.raises(ValueError, match="blocksize must be a positive integer, got 0"):
        gptq_quantize_weight(W, torch.eye(5), 4, blocksize=0)
    with pytest.raises(ValueError, match="percdamp must be a non-negative number, got -0.1"):
        gptq_quantize_weight(W, torch.eye(5), 4, percdamp=-0.1)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize_weight(W, -torch.eye(5), 4)
    with pytest.raises(ValueError, match=r"bits must be an integer in 2\.\.16.*got 1"):
        gptq_quantize_weight(W, torch.eye(5), 1)
    with pytest.raises(TypeError, match="calib must be a HessianAccumulator or a tensor of inputs, got list"):
        gptq_quantize_linear_(nn.Linear(5, 3), [1, 2], 4)


# --------------------------------------------------------------------------- whole models
def _tiny_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).double().eval()


def _manual_sequential_gptq(model, ids, bits):
    """The straightforward orchestration: full forward passes, inputs stored, then GPTQ per group."""
    for layer in model.model.layers:
        mods = {n.split(".")[-1]: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        for group in GPTQ_SEQUENTIAL:
            inputs = {r: [] for r in group}
            hs = [mods[r].register_forward_hook(lambda m, i, o, r=r, inputs=inputs: inputs[r].append(i[0].detach())) for r in group]
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
            for h in hs:
                h.remove()
            for r in group:
                gptq_quantize_linear_(mods[r], torch.cat(inputs[r]).reshape(-1, mods[r].in_features), bits)
    return model


def test_gptq_model_official_order_and_untouched_head():
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    model = _tiny_llama()
    head0 = model.lm_head.weight.detach().clone()
    emb0 = model.model.embed_tokens.weight.detach().clone()
    fp_logits = model(input_ids=ids).logits.detach()
    ref = _manual_sequential_gptq(_tiny_llama(), ids, 3)
    gptq_quantize_model_(model, [ids[:2], ids[2:]], 3)
    for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, p_ref, rtol=0, atol=1e-10, msg=name)
    assert torch.equal(model.lm_head.weight, head0) and torch.equal(model.model.embed_tokens.weight, emb0)
    for layer in model.model.layers:  # every linear is on its 3-bit grid
        for lin in (m for m in layer.modules() if isinstance(m, nn.Linear)):
            assert int(torch.unique(lin.weight.detach(), dim=None).numel()) <= 8 * lin.out_features
    # one-shot Hessians (all from the full-precision model) give different weights: the order matters
    oneshot = _tiny_llama()
    accs = {}
    hs = []
    for name, m in oneshot.model.layers.named_modules():
        if isinstance(m, nn.Linear):
            accs[name] = HessianAccumulator(m.in_features, dtype=D)
            hs.append(accs[name].hook(m))
    with torch.no_grad():
        oneshot(input_ids=ids)
    for h in hs:
        h.remove()
    for name, m in oneshot.model.layers.named_modules():
        if isinstance(m, nn.Linear):
            gptq_quantize_linear_(m, accs[name], 3)
    assert not torch.allclose(oneshot.model.layers[1].self_attn.o_proj.weight, model.model.layers[1].self_attn.o_proj.weight)
    # GPTQ's logits are closer to full precision than RTN's on the calibration text
    rtn = rtn_quantize_model_(_tiny_llama(), 3)
    err = lambda mdl: float((mdl(input_ids=ids).logits - fp_logits).pow(2).mean())
    with torch.no_grad():
        assert err(model) < err(rtn), (err(model), err(rtn))


def test_rtn_model_and_bad_inputs():
    model = _tiny_llama()
    ref = _tiny_llama()
    rtn_quantize_model_(model, 4)
    for layer, layer_ref in zip(model.model.layers, ref.model.layers):
        for (n, m), (_, m_ref) in zip(layer.named_modules(), layer_ref.named_modules()):
            if isinstance(m, nn.Linear):
                torch.testing.assert_close(m.weight, quantize_weight(m_ref.weight.detach(), 4), msg=n)
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)
    with pytest.raises(TypeError, match=r"model \(Linear\) must be a transformers Llama-family causal LM"):
        rtn_quantize_model_(nn.Linear(2, 2), 4)
    with pytest.raises(ValueError, match=r"calib batch 0 must be a LongTensor of shape \(batch, seq\)"):
        gptq_quantize_model_(model, torch.randn(2, 4), 4)
