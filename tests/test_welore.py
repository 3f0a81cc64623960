"""Tests of mini.welore: spectra, the τ bisection, the break-even rule, compression of a tiny Llama
(exactness, factors, counts, uniform baseline), LRC-only fine-tuning, state_dict round trip,
merging back, and the error paths of the issue "Part II completed: SLTrain and WeLore"."""
from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from mini.lm import build_model, tiny_llama_config
from mini.welore import (
    CompressionReport,
    LowRankComponent,
    MatrixSpectrum,
    Spectra,
    Threshold,
    analyze_spectra,
    break_even_rank,
    compress,
    effective_rank_reduction,
    freeze_for_lrc_finetuning,
    load_compressed,
    lrc_parameters,
    lrc_ranks,
    merge_lrcs,
    normalized_singular_values,
    pays_off,
    pruned_ranks,
    threshold_for_reduction,
    uniform_pruned_ranks,
)


# ----------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def base() -> nn.Module:
    model = build_model(tiny_llama_config(), seed=0)
    model.eval()
    return model


@pytest.fixture(scope="module")
def spectra(base) -> Spectra:
    return analyze_spectra(base)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def _random_spectra(seed: int, n_mats: int = 7) -> Spectra:
    """Heavy-tailed random spectra of assorted sizes (some with exact ties and a zero value)."""
    g = torch.Generator().manual_seed(seed)
    values, shapes = {}, {}
    for j in range(n_mats):
        m, n = int(torch.randint(3, 60, (1,), generator=g)), int(torch.randint(3, 60, (1,), generator=g))
        r = min(m, n)
        s = torch.rand(r, generator=g, dtype=torch.float64) ** (1 + 3 * j / n_mats) * 10
        if j == 2 and r > 3:
            s[:2] = s.max()  # a tie at the top
        if j == 3:
            s[-1] = 0.0  # rank-deficient
        values[f"m{j}"], shapes[f"m{j}"] = s, (m, n)
    return Spectra.from_singular_values(values, shapes)


def _levels(spectra: Spectra) -> np.ndarray:
    """Every reduction ρ(τ) can take for τ ∈ [0, 1], by brute force over the breakpoints."""
    vals = np.sort(np.concatenate([m.s_tilde for m in spectra]))
    taus = np.concatenate([[0.0], np.unique(vals) + 1e-300, np.nextafter(np.unique(vals), 2.0), [1.0]])
    taus = taus[(taus >= 0) & (taus <= 1)]
    return np.unique([(vals < t).sum() / vals.size for t in taus])


# ----------------------------------------------------------------------------- spectra
def test_analyze_spectra_shapes_and_factors(base, spectra):
    assert len(spectra) == 4 * 7 and spectra.total_rank == 28 * 128
    q = spectra["model.layers.0.self_attn.q_proj"]
    gate = spectra["model.layers.0.mlp.gate_proj"]
    assert q.shape == (128, 128) and gate.shape == (352, 128) and gate.full_rank == 128
    assert gate.U.shape == (352, 128) and gate.Vh.shape == (128, 128) and gate.s.dtype == torch.float32
    assert torch.all(gate.s[:-1] >= gate.s[1:])
    w = base.get_submodule(gate.name).weight
    torch.testing.assert_close(gate.U @ torch.diag(gate.s) @ gate.Vh, w, atol=1e-5, rtol=1e-4)
    # without factors: the same singular values (mini.lm.spectra.singular_values)
    light = analyze_spectra(base, patterns=[r"\.q_proj$"], keep_factors=False)
    assert len(light) == 4 and light[q.name].U is None
    torch.testing.assert_close(light[q.name].s, q.s)


def test_normalized_singular_values():
    s = torch.tensor([4.0, 3.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(normalized_singular_values(s), torch.tensor([1.0, 2 / 3, 0.0], dtype=torch.float64))
    # min s = 0: the min-max normalisation is s / max s
    s0 = torch.tensor([5.0, 2.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(normalized_singular_values(s0), s0 / 5)
    # flat spectra (zero matrix, scaled orthogonal matrix in float32): nothing is less important
    assert torch.all(normalized_singular_values(torch.zeros(4)) == 1)
    q = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))[0]
    spec = MatrixSpectrum.from_matrix("q", 3 * q)
    assert spec.pruned(1.0) == 0 and spec.pruned(0.5) == 0


def test_rank_deficient_matrix_prunes_its_null_directions_first():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 20, generator=g, dtype=torch.float64)
    lin = nn.Linear(20, 16, bias=False, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(w)
    model = nn.Sequential(lin)
    spec = analyze_spectra(model, patterns=[r"^0$"])["0"]
    assert spec.full_rank == 16 and spec.numerical_rank == 3
    assert np.all(spec.s_tilde[3:] < 1e-12)  # the 13 numerically zero directions have s̃ ≈ 0
    assert spec.pruned(1e-9) == 13  # first pruned at any τ > 0
    rep = compress(model, 0.8, patterns=[r"^0$"])  # levels 12/16 and 13/16 straddle 0.8; 13/16 is closer
    row = rep.matrices[0]
    assert row.pruned == 13 and row.kept_rank == 3 and row.is_lrc
    torch.testing.assert_close(model[0].dense_weight(), w, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- the τ bisection
@pytest.mark.parametrize("seed", range(5))
def test_threshold_hits_closest_level(seed):
    sp = _random_spectra(seed)
    levels = _levels(sp)
    for target in (0.01, 0.05, 0.1, 0.25, 0.3333, 0.5, 0.7, 0.9, 0.99):
        tau, achieved = threshold_for_reduction(sp, target)
        assert 0.0 <= tau <= 1.0
        assert achieved == effective_rank_reduction(sp, tau)
        best = np.min(np.abs(levels - target))
        assert abs(achieved - target) == pytest.approx(best, abs=1e-15), (target, achieved)
        if achieved != target:  # ties go to the smaller reduction
            other = 2 * target - achieved
            if np.any(np.isclose(levels, other, atol=1e-15, rtol=0)):
                assert achieved < target


def test_threshold_target_above_max_level():
    sp = Spectra.from_singular_values({"a": torch.tensor([3.0, 2.0, 1.0]), "b": torch.tensor([2.0, 2.0, 1.0])})
    # ρ(1): a keeps its top value only (2 of 3 pruned), b keeps its two tied top values (1 of 3)
    tau, achieved = threshold_for_reduction(sp, 0.99)
    assert achieved == pytest.approx(3 / 6) and tau <= 1.0
    assert isinstance(threshold_for_reduction(sp, 0.2), Threshold)


def test_reduction_monotone_in_tau():
    sp = _random_spectra(7)
    taus = np.linspace(0, 1, 401)
    rho = [effective_rank_reduction(sp, float(t)) for t in taus]
    assert rho[0] == 0.0 and all(a <= b for a, b in zip(rho, rho[1:]))
    assert rho[-1] < 1.0  # the top direction of every matrix survives τ = 1
    counts = pruned_ranks(sp, 0.5)
    assert sum(counts.values()) / sp.total_rank == effective_rank_reduction(sp, 0.5)


def test_uniform_pruned_ranks_total_is_rounded_target(spectra):
    for target in (0.5, 0.25, 0.3, 0.7):
        pr = uniform_pruned_ranks(spectra, target)
        assert sum(pr.values()) == round(target * spectra.total_rank)
        assert all(math.floor(target * 128) <= k <= math.floor(target * 128) + 1 for k in pr.values())
    assert set(uniform_pruned_ranks(spectra, 0.5).values()) == {64}  # exact: every matrix loses 64
    sp = _random_spectra(3)
    pr = uniform_pruned_ranks(sp, 0.37)
    assert sum(pr.values()) == round(0.37 * sp.total_rank)
    assert all(0 <= pr[m.name] <= m.full_rank - 1 for m in sp)


# ----------------------------------------------------------------------------- break-even rule
def test_break_even_rule():
    assert break_even_rank(128, 128) == 64.0
    assert pays_off(63, 128, 128) and not pays_off(64, 128, 128)  # 64·256 = 128²: no saving
    assert break_even_rank(352, 128) == pytest.approx(352 * 128 / 480)  # 93.87
    assert pays_off(93, 352, 128) and not pays_off(94, 352, 128)
    assert pays_off(93, 128, 352) and not pays_off(94, 128, 352)


def test_compress_follows_break_even_rule(base, spectra):
    for method in ("welore", "uniform"):
        rep = compress(copy.deepcopy(base), 0.5, method=method, spectra=spectra)
        for row in rep.matrices:
            m, n = row.shape
            k = row.full_rank - row.pruned
            assert row.is_lrc == (row.pruned > 0 and k * (m + n) < m * n), row
    # uniform 50%: square matrices keep 64 = break-even (stay dense), 352x128 ones keep 64 < 93.9
    rep = compress(copy.deepcopy(base), 0.5, method="uniform", spectra=spectra)
    assert {r.name.rsplit(".", 1)[1] for r in rep.matrices if r.is_lrc} == {"gate_proj", "up_proj", "down_proj"}
    # the official rule (min_ratio = 0.4999 of the fine-tuning scripts) factorises every 50% matrix
    rep = compress(copy.deepcopy(base), 0.5, method="uniform", spectra=spectra, min_ratio=0.4999)
    assert rep.n_lrc == 28


# ----------------------------------------------------------------------------- compress a tiny Llama
def test_tiny_target_leaves_forward_exactly_unchanged(base, spectra, tokens):
    model = copy.deepcopy(base)
    rep = compress(model, 1e-6, spectra=spectra)
    assert rep.tau == 0.0 and rep.n_lrc == 0 and rep.kept_rank == rep.total_rank
    assert rep.params_after == rep.params_before
    assert torch.equal(_logits(model, tokens), _logits(base, tokens))
    # smallest positive level: one direction per matrix (the min of s̃ is 0); dense N-LRCs: unchanged
    model = copy.deepcopy(base)
    rep = compress(model, 28 / 3584, spectra=spectra)
    assert rep.attempted_reduction == 28 / 3584 and rep.n_lrc == 0 and rep.achieved_reduction == 0.0
    assert torch.equal(_logits(model, tokens), _logits(base, tokens))


def test_lrc_factors_are_the_rank_k_truncation_float64():
    model = build_model(tiny_llama_config(), seed=1).double()
    orig = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    rep = compress(model, 0.4, min_ratio=0.0)
    assert rep.n_lrc == 28
    for row in rep.matrices:
        lrc = model.get_submodule(row.name)
        assert isinstance(lrc, LowRankComponent) and lrc.rank == row.kept_rank
        assert lrc.up.weight.dtype == torch.float64
        U, s, Vh = torch.linalg.svd(orig[row.name], full_matrices=False)
        k = row.kept_rank
        w_k = U[:, :k] @ torch.diag(s[:k]) @ Vh[:k]
        torch.testing.assert_close(lrc.dense_weight(), w_k, atol=1e-12, rtol=0)
        # balanced factors: column i of B and row i of A both have norm √s_i
        torch.testing.assert_close(lrc.up.weight.norm(dim=0), s[:k].sqrt(), atol=1e-12, rtol=0)
        torch.testing.assert_close(lrc.down.weight.norm(dim=1), s[:k].sqrt(), atol=1e-12, rtol=0)


def test_lrc_parameter_counts(base, spectra):
    model = copy.deepcopy(base)
    rep = compress(model, 0.5, spectra=spectra)
    assert isinstance(rep, CompressionReport) and 0 < rep.n_lrc < 28
    for row in rep.matrices:
        m, n = row.shape
        assert row.params_before == m * n
        assert row.params_after == (row.kept_rank * (m + n) if row.is_lrc else m * n)
        if row.is_lrc:
            assert sum(p.numel() for p in model.get_submodule(row.name).parameters()) == row.params_after
    saved = sum(r.params_before - r.params_after for r in rep.matrices)
    assert rep.params_after == rep.params_before - saved == sum(p.numel() for p in model.parameters())
    assert rep.lrc_parameter_count == sum(p.numel() for p in lrc_parameters(model))
    assert rep.ranks() == lrc_ranks(model)
    rows = rep.rows()
    assert len(rows) == 28 and {"name", "kept", "lrc", "params_after"} <= set(rows[0])
    table = rep.to_table()
    assert table.count("\n") == 29 and "0.mlp.gate_proj" in table
    assert "LRCs" in str(rep)


def test_attempted_and_achieved_reduction(base, spectra, tokens):
    rep = compress(copy.deepcopy(base), 0.5, spectra=spectra)  # N-LRCs dense (official)
    th = threshold_for_reduction(spectra, 0.5)
    assert rep.tau == th.tau and rep.attempted_reduction == th.achieved
    lrc_pruned = sum(r.pruned for r in rep.matrices if r.is_lrc)
    assert rep.achieved_reduction == pytest.approx(lrc_pruned / rep.total_rank)
    assert rep.achieved_reduction < rep.attempted_reduction
    # nlrc="truncate": every matrix applies its kept rank, achieved = attempted
    model = copy.deepcopy(base)
    rep_t = compress(model, 0.5, spectra=spectra, nlrc="truncate")
    assert rep_t.achieved_reduction == pytest.approx(rep_t.attempted_reduction)
    assert rep_t.params_after == rep.params_after  # N-LRCs stay dense either way
    for row in rep_t.matrices:
        if not row.is_lrc:
            w = model.get_submodule(row.name).weight
            assert torch.linalg.matrix_rank(w.double(), rtol=1e-5).item() == row.kept_rank
    # the same function as factorising everything (min_ratio=0.0), up to float32 rounding
    model_all = copy.deepcopy(base)
    compress(model_all, 0.5, spectra=spectra, min_ratio=0.0)
    torch.testing.assert_close(_logits(model, tokens), _logits(model_all, tokens), atol=1e-4, rtol=1e-4)


def test_uniform_baseline_reduction_equals_target(base, spectra):
    rep = compress(copy.deepcopy(base), 0.5, method="uniform", spectra=spectra, nlrc="truncate")
    assert rep.tau is None and rep.attempted_reduction == 0.5 and rep.achieved_reduction == 0.5
    assert {r.kept_rank for r in rep.matrices} == {64}
    rep = compress(copy.deepcopy(base), 0.3, method="uniform", spectra=spectra, min_ratio=0.0)
    assert rep.achieved_reduction == round(0.3 * 3584) / 3584
    # equal total rank with WeLore at the level WeLore achieved
    w = compress(copy.deepcopy(base), 0.3, spectra=spectra, min_ratio=0.0)
    u = compress(copy.deepcopy(base), w.attempted_reduction, method="uniform", spectra=spectra, min_ratio=0.0)
    assert u.kept_rank == w.kept_rank


def test_compress_without_cached_factors_matches(base, tokens):
    light = analyze_spectra(base, keep_factors=False)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    ra = compress(a, 0.5, spectra=light)
    rb = compress(b, 0.5)
    assert ra.ranks() == rb.ranks()
    torch.testing.assert_close(_logits(a, tokens), _logits(b, tokens), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- fine-tuning
def test_frozen_and_trainable_sets(base, spectra, tokens):
    model = copy.deepcopy(base)
    rep = compress(model, 0.5, spectra=spectra)
    for row in rep.matrices:  # compress alone: LRCs trainable, N-LRCs frozen
        for p in model.get_submodule(row.name).parameters():
            assert p.requires_grad == row.is_lrc
    params = freeze_for_lrc_finetuning(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{n}.{f}.weight" for n in rep.lrc_names for f in ("down", "up")}
    assert trainable == expected and len(params) == len(expected)
    assert {id(p) for p in params} == {id(p) for p in lrc_parameters(model)}
    assert not model.model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad
    # one AdamW step moves the LRC factors only
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    logits = model(tokens).logits
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), tokens[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == expected
    # the official continual fine-tuning script also trains the norms
    params_n = freeze_for_lrc_finetuning(model, train_norms=True)
    names_n = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {n for n in names_n if "norm" in n}
    assert names_n == expected | norms and len(norms) == 2 * 4 + 1 and len(params_n) == len(names_n)


def test_freeze_without_lrc_is_an_error(base):
    with pytest.raises(ValueError, match="no LowRankComponent"):
        freeze_for_lrc_finetuning(copy.deepcopy(base))


# ----------------------------------------------------------------------------- state dict, merge
def test_state_dict_round_trip(base, spectra, tokens):
    model = copy.deepcopy(base)
    rep = compress(model, 0.5, spectra=spectra)
    with torch.no_grad():  # move the factors off the SVD so the test sees the loaded values
        for p in lrc_parameters(model):
            p.add_(0.01)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = build_model(tiny_llama_config(), seed=5)
    fresh.eval()
    conv = load_compressed(fresh, sd)
    assert sorted(conv.replaced) == sorted(rep.lrc_names) and lrc_ranks(fresh) == rep.ranks()
    assert torch.equal(_logits(fresh, tokens), _logits(model, tokens))
    with pytest.raises(ValueError, match="no LowRankComponent factors"):
        load_compressed(build_model(tiny_llama_config(), seed=0), base.state_dict())


def test_merge_back_to_dense(base, spectra, tokens):
    model = copy.deepcopy(base)
    rep = compress(model, 0.5, spectra=spectra)
    name = rep.lrc_names[0]
    lrc = model.get_submodule(name)
    lin = lrc.merge()
    assert isinstance(lin, nn.Linear) and lin.weight.shape == (lrc.out_features, lrc.in_features)
    torch.testing.assert_close(lin.weight, lrc.dense_weight())
    x = torch.randn(3, lrc.in_features)
    torch.testing.assert_close(lin(x), lrc(x), atol=1e-5, rtol=1e-5)
    expected = _logits(model, tokens)
    merged = merge_lrcs(model)
    assert sorted(merged) == sorted(rep.lrc_names) and lrc_ranks(model) == {}
    assert sum(p.numel() for p in model.parameters()) == rep.params_before
    torch.testing.assert_close(_logits(model, tokens), expected, atol=1e-4, rtol=1e-4)


def test_lowrank_component_with_bias():
    lin = nn.Linear(10, 7, bias=True, dtype=torch.float64)
    lrc = LowRankComponent.from_linear(lin, 7)  # full rank: exact
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(lrc(x), lin(x))
    torch.testing.assert_close(lrc.merge()(x), lin(x))
    assert "rank=7" in repr(lrc)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.0, -0.1, 1.5, float("nan")])
def test_target_outside_unit_interval(base, spectra, bad):
    with pytest.raises(ValueError, match="target"):
        threshold_for_reduction(spectra, bad)
    with pytest.raises(ValueError, match="target"):
        uniform_pruned_ranks(spectra, bad)
    with pytest.raises(ValueError, match="target"):
        compress(copy.deepcopy(base), bad, spectra=spectra)


def test_target_wrong_type(spectra):
    for bad in ("0.5", None, True):
        with pytest.raises(TypeError, match="target"):
            threshold_for_reduction(spectra, bad)


def test_patterns_matching_no_layer(base):
    with pytest.raises(ValueError, match="match no nn.Linear"):
        analyze_spectra(base, patterns=[r"\.no_such_proj$"])
    with pytest.raises(ValueError, match="match no nn.Linear"):
        compress(copy.deepcopy(base), 0.5, patterns=r"\.nothing$")
    with pytest.raises(ValueError, match="patterns"):
        analyze_spectra(base, patterns=[])


def test_non_2d_spectra():
    with pytest.raises(ValueError, match="2-D"):
        MatrixSpectrum.from_matrix("w", torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="2-D"):
        MatrixSpectrum.from_matrix("w", torch.randn(5), keep_factors=False)
    with pytest.raises(ValueError, match="1-D"):
        Spectra.from_singular_values({"w": torch.rand(3, 3)})
    with pytest.raises(ValueError, match="1-D"):
        MatrixSpectrum("w", (3, 3), torch.rand(3, 3))
    with pytest.raises(ValueError, match="descending"):
        MatrixSpectrum("w", (3, 3), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="min\\(out, in\\)"):
        MatrixSpectrum("w", (3, 4), torch.tensor([3.0, 2.0]))
    with pytest.raises(ValueError, match="non-negative"):
        normalized_singular_values(torch.tensor([1.0, -1.0]))


def test_other_bad_arguments(base, spectra):
    m = copy.deepcopy(base)
    with pytest.raises(ValueError, match="method"):
        compress(m, 0.5, spectra=spectra, method="svd")
    with pytest.raises(ValueError, match="nlrc"):
        compress(m, 0.5, spectra=spectra, nlrc="drop")
    with pytest.raises(ValueError, match="min_ratio"):
        compress(m, 0.5, spectra=spectra, min_ratio=1.0)
    with pytest.raises(TypeError, match="spectra"):
        threshold_for_reduction({"a": torch.ones(3)}, 0.5)
    with pytest.raises(ValueError, match="tau"):
        effective_rank_reduction(spectra, float("inf"))
    with pytest.raises(ValueError, match="rank"):
        pays_off(-1, 4, 4)
    with pytest.raises(ValueError, match="out_features"):
        break_even_rank(0, 4)
    # spectra of another model's weights, or of an already compressed model
    other = build_model(tiny_llama_config(), seed=3)
    with pytest.raises(ValueError, match="do not match the model's weights"):
        compress(other, 0.5, spectra=spectra)
    compress(m, 0.5, spectra=spectra)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        compress(m, 0.5, spectra=spectra)
    with pytest.raises(ValueError, match="rank"):
        LowRankComponent(8, 4, 5)
