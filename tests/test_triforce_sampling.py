"""Speculative sampling (mini.triforce.sampling): exact laws by enumeration on small vocabularies
(the residual versions equal the target to rounding, the released middle sampler does not), Monte
Carlo with seeded generators and the pooled χ² test, tokens per pass, counters, errors."""
from __future__ import annotations

import math
import random

import pytest
import torch

from mini.triforce import (
    PassCounter,
    SamplingConfig,
    SpeculativeDecoder,
    accept_or_resample,
    check_gamma,
    chi_square_test,
    expected_tokens_per_pass,
    process_logits,
    residual_distribution,
    total_variation,
    verify,
)
from mini.triforce.sampling import _accept_or_resample, enumerate_law

CONFIGS = [SamplingConfig(0.6, 0.9), SamplingConfig(1.0, 0.9), SamplingConfig(1.0, 1.0), SamplingConfig(0.6, 1.0)]


def _probs(V, seed, sharp=1.5):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(V, generator=g, dtype=torch.float64), dim=0)


def _model(V, seed, sharp=1.5):
    """A context-dependent random LM: prefix -> logits (V,), float64, deterministic."""
    def logits(prefix):
        rng = random.Random(f"{seed}:{prefix}")
        return torch.tensor([sharp * rng.gauss(0.0, 1.0) for _ in range(V)], dtype=torch.float64)
    return logits


def _empirical(samples):
    counts = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    return counts


# --------------------------------------------------------------------------- process_logits
def test_temperature_and_top_p_filtering():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64))
    p = process_logits(logits, 1.0, 1.0)
    torch.testing.assert_close(p, torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64))
    t = process_logits(logits, 0.5, 1.0)
    torch.testing.assert_close(t, torch.softmax(logits / 0.5, 0))
    # top-p 0.7: 0.5 < 0.7 so 0.3 is kept (mass before it 0.5 ≤ 0.7); 0.15 has 0.8 before it: removed
    f = process_logits(logits, 1.0, 0.7)
    torch.testing.assert_close(f, torch.tensor([0.625, 0.375, 0.0, 0.0], dtype=torch.float64))
    assert process_logits(logits, 1.0, 0.4).tolist() == [1.0, 0.0, 0.0, 0.0]  # the top token always stays
    batch = process_logits(torch.stack([logits, logits.flip(0)]), 1.0, 0.7)  # (2, V): per row
    torch.testing.assert_close(batch[1], f.flip(0))
    assert process_logits(logits.float(), 1.0, 1.0).dtype == torch.float32


def test_greedy_is_its_own_mode():
    logits = torch.tensor([0.1, 2.0, 2.0, -1.0])
    for temp in (0.0, -1.0, 0.7):
        assert process_logits(logits, temp, 1.0, greedy=True).tolist() == [0.0, 1.0, 0.0, 0.0]
    assert SamplingConfig(0.0, 1.0, greedy=True).probs(logits).tolist() == [0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("temperature", [0.0, -0.5, math.inf])
def test_temperature_not_positive_with_sampling_raises(temperature):
    with pytest.raises(ValueError, match=r"temperature must be a finite float > 0 when sampling, got .*greedy=True"):
        process_logits(torch.zeros(3), temperature, 0.9)
    with pytest.raises(ValueError, match=r"temperature must be a finite float > 0"):
        SamplingConfig(temperature, 0.9)


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.5, "0.9", True])
def test_top_p_outside_unit_interval_raises(top_p):
    with pytest.raises(ValueError, match=r"top_p must be a float in \(0, 1\], got"):
        process_logits(torch.zeros(3), 1.0, top_p)
    with pytest.raises(ValueError, match=r"top_p must be a float in \(0, 1\]"):
        SamplingConfig(1.0, top_p)


def test_process_logits_bad_tensor():
    with pytest.raises(TypeError, match=r"logits must be a floating-point torch.Tensor"):
        process_logits(torch.zeros(3, dtype=torch.long), 1.0, 1.0)
    with pytest.raises(ValueError, match=r"non-empty last \(vocabulary\) dimension"):
        process_logits(torch.zeros(0), 1.0, 1.0)


# --------------------------------------------------------------------------- accept_or_resample
@pytest.mark.parametrize("V", [3, 4, 5, 6])
@pytest.mark.parametrize("cfg", CONFIGS[:2])
def test_accept_or_resample_law_is_the_target_exactly(V, cfg):
    for seed in range(5):
        p = cfg.probs(torch.log(_probs(V, seed)))
        q = cfg.probs(torch.log(_probs(V, 100 + seed, sharp=3.0)))

        def run(ch, p=p, q=q):
            x = ch.choice(q)
            return (_accept_or_resample(p, q, x, ch)[1],)

        law = torch.zeros(V, dtype=torch.float64)
        for (y,), w in enumerate_law(run).items():
            law[y] += w
        assert total_variation(law, p) < 1e-15
        # the released resampling (from p itself) has law min(q, p) + (1 − β) p
        rel = enumerate_law(lambda ch, p=p, q=q: (_accept_or_resample(p, q, ch.choice(q), ch, released=True)[1],))
        rel_law = torch.zeros(V, dtype=torch.float64)
        for (y,), w in rel.items():
            rel_law[y] += w
        m = torch.minimum(p, q)
        torch.testing.assert_close(rel_law, m + (1 - m.sum()) * p, rtol=0, atol=1e-15)


def test_accept_or_resample_monte_carlo_and_residual():
    p, q = _probs(5, 1), _probs(5, 2, sharp=3.0)
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = {}
    n_acc = 0
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=g))
        ok, y = accept_or_resample(p, q, x, generator=g)
        assert ok == (y == x) or not ok
        n_acc += ok
        counts[y] = counts.get(y, 0) + 1
    res = chi_square_test(counts, {i: float(p[i]) for i in range(5)})
    assert res.p_value > 1e-3, res
    alpha = float(torch.minimum(p, q).sum())  # acceptance probability Σ min(p, q)
    assert abs(n_acc / n - alpha) < 4 * math.sqrt(alpha * (1 - alpha) / n)
    r = residual_distribution(p, q)
    torch.testing.assert_close(r, torch.clamp(p - q, min=0) / torch.clamp(p - q, min=0).sum())
    torch.testing.assert_close(residual_distribution(p, p), p)  # p = q: no residual mass
    # deterministic cases: q one-hot on the target's zero, p one-hot elsewhere
    e = torch.eye(4, dtype=torch.float64)
    assert accept_or_resample(e[2], e[1], 1) == (False, 2)
    assert accept_or_resample(e[1], e[1], torch.tensor(1)) == (True, 1)


def test_accept_or_resample_errors():
    p, q = _probs(4, 0), _probs(4, 1)
    with pytest.raises(ValueError, match=r"draft and target have different vocabulary sizes: .* 4 and 5"):
        accept_or_resample(p, _probs(5, 1), 0)
    with pytest.raises(ValueError, match=r"token must be an int in \[0, 4\), got 4"):
        accept_or_resample(p, q, 4)
    with pytest.raises(ValueError, match=r"q\[token\]=0.0 under the proposal q"):
        accept_or_resample(p, torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64), 2)
    with pytest.raises(TypeError, match=r"p must be a floating-point torch.Tensor"):
        accept_or_resample([0.5, 0.5], q, 0)
    with pytest.raises(ValueError, match=r"q must be a non-empty probability vector \(V,\), got shape \(1, 4\)"):
        accept_or_resample(p, q[None], 0)
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None"):
        accept_or_resample(p, q, 0, generator=3)


# --------------------------------------------------------------------------- verify
def test_verify_block():
    e = torch.eye(3, dtype=torch.float64)
    q = e[[0, 1, 2]]  # proposals drawn from one-hots
    # target agrees on the first two, then wants 0: accept 2, resample 0 at the third
    res = verify([0, 1, 2], q, e[[0, 1, 0, 2]])
    assert res.tokens == (0, 1, 0) and res.accepted == 2 and not res.all_accepted
    res = verify(torch.tensor([0, 1, 2]), q, e[[0, 1, 2, 1]])  # all accepted: bonus from p[γ]
    assert res.tokens == (0, 1, 2, 1) and res.accepted == 3 and res.all_accepted
    res = verify([0], q[:1], e[[2, 0]])
    assert res.tokens == (2,) and res.accepted == 0


def test_verify_monte_carlo_emits_target_tokens():
    """Context-free models: every emitted token is i.i.d. p, whatever q (χ² on the first two)."""
    p, q = _probs(4, 3), _probs(4, 4, sharp=3.0)
    g = torch.Generator().manual_seed(1)
    gamma = 3
    firsts, seconds = [], []
    for _ in range(4000):
        props = torch.multinomial(q, gamma, replacement=True, generator=g)
        res = verify(props, q.expand(gamma, 4), p.expand(gamma + 1, 4), generator=g)
        firsts.append(res.tokens[0])
        if len(res.tokens) > 1:
            seconds.append(res.tokens[1])
    pd = {i: float(p[i]) for i in range(4)}
    assert chi_square_test(_empirical(firsts), pd).p_value > 1e-3
    assert chi_square_test(_empirical(seconds), pd).p_value > 1e-3


def test_verify_errors():
    p = _probs(4, 0).expand(3, 4)
    with pytest.raises(ValueError, match=r"gamma \(proposals per round\) must be an integer >= 1, got 0"):
        verify([], p[:0], p[:1])
    with pytest.raises(ValueError, match=r"p_probs must have shape \(3, V\) for gamma=2"):
        verify([0, 1], p[:2], p[:2])
    with pytest.raises(ValueError, match=r"draft and target have different vocabulary sizes"):
        verify([0, 1], _probs(5, 0).expand(2, 5), p)
    with pytest.raises(ValueError, match=r"proposals must be token ids in \[0, 4\)"):
        verify([0, 7], p[:2], p)
    with pytest.raises(TypeError, match=r"q_probs must be a floating-point torch.Tensor"):
        verify([0, 1], [[0.5, 0.5]], p)


# --------------------------------------------------------------------------- hierarchy, exactly
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"T{c.temperature}-p{c.top_p}")
@pytest.mark.parametrize("n_levels, gamma, V", [(2, 3, 5), (2, 1, 6), (3, 2, 4), (3, 1, 5), (3, 3, 3)])
def test_round_law_is_the_target_by_enumeration(cfg, n_levels, gamma, V):
    draft, middle, target = _model(V, 1, sharp=2.5), _model(V, 2), _model(V, 3)
    levels = [draft, target] if n_levels == 2 else [draft, middle, target]
    dec = SpeculativeDecoder(levels, gamma=gamma, config=cfg)
    for prefix in [(0,), (1, 2)]:
        first = dec.first_token_law(prefix)
        assert abs(float(first.sum()) - 1) < 1e-14
        assert total_variation(first, dec.target_probs(prefix)) < 1e-14
        seq = dec.sequence_law(prefix, 2)
        assert total_variation(seq, dec.target_sequence_law(prefix, 2)) < 1e-14
    assert all(c.passes == 0 for c in dec.counters.values())  # enumeration counts nothing


def test_released_middle_sampler_is_not_exact():
    """Middle = target (so the top level accepts every proposal): the first token's law is the
    released middle's, min(q, p) + (1 − β)·p, not p."""
    V = 4
    cfg = SamplingConfig(1.0, 1.0)
    draft, target = _model(V, 7, sharp=3.0), _model(V, 8)
    prefix = (0,)
    exact = SpeculativeDecoder([draft, target, target], gamma=2, config=cfg)
    rel = SpeculativeDecoder([draft, target, target], gamma=2, config=cfg, released=True)
    p = exact.target_probs(prefix)
    q = cfg.probs(draft(prefix))
    assert total_variation(exact.first_token_law(prefix), p) < 1e-15
    got = rel.first_token_law(prefix)
    m = torch.minimum(p, q)
    torch.testing.assert_close(got, m + (1 - m.sum()) * p, rtol=0, atol=1e-15)
    tv = total_variation(got, p)
    assert tv > 1e-3, tv
    assert total_variation(rel.sequence_law(prefix, 2), rel.target_sequence_law(prefix, 2)) > 1e-3
    # and with a distinct middle model and tempered, filtered levels too
    # (some prefixes hide the defect: where filtering leaves the middle one-hot, nothing is rejected)
    levels = [_model(V, 7, sharp=1.0), _model(V, 9, sharp=1.0), _model(V, 8, sharp=1.0)]
    for cfg2 in (SamplingConfig(0.6, 0.9), SamplingConfig(1.0, 0.9)):
        rel2 = SpeculativeDecoder(levels, gamma=2, config=cfg2, released=True)
        assert total_variation(rel2.first_token_law((1,)), rel2.target_probs((1,))) > 1e-2
        ok2 = SpeculativeDecoder(levels, gamma=2, config=cfg2)
        assert total_variation(ok2.first_token_law((1,)), ok2.target_probs((1,))) < 1e-15


def test_monte_carlo_generate_chi_square():
    """10⁴-scale check at test size: 1500 two-token samples per decoder, χ² with pooling."""
    V = 4
    cfg = SamplingConfig(1.0, 1.0)
    draft, target = _model(V, 7, sharp=3.0), _model(V, 8)
    prefix = (0,)
    results = {}
    for name, levels, released in [("ar", [target], False), ("tri", [draft, target, target], False),
                                   ("released", [draft, target, target], True)]:
        dec = SpeculativeDecoder(levels, gamma=2, config=cfg, released=released)
        g = torch.Generator().manual_seed(0)
        samples = [tuple(dec.generate(prefix, 2, generator=g)) for _ in range(1500)]
        results[name] = chi_square_test(_empirical(samples), dec.target_sequence_law(prefix, 2))
    assert results["ar"].p_value > 1e-3 and results["tri"].p_value > 1e-3, results
    assert results["released"].p_value < 1e-6 and results["released"].z > 5, results


def test_greedy_hierarchy_reproduces_greedy_target():
    V = 5
    cfg = SamplingConfig(0.6, 0.9, greedy=True)
    draft, middle, target = _model(V, 1), _model(V, 2), _model(V, 3)
    dec = SpeculativeDecoder([draft, middle, target], gamma=3, config=cfg)
    out = dec.generate((0,), 12)
    seq, want = [0], []
    for _ in range(12):
        want.append(int(target(tuple(seq)).argmax()))
        seq.append(want[-1])
    assert out == want


# --------------------------------------------------------------------------- counts and tokens per pass
def test_expected_tokens_per_pass_formula():
    for alpha in (0.0, 0.3, 0.8, 0.97):
        for gamma in (1, 4, 6):
            assert abs(expected_tokens_per_pass(alpha, gamma) - sum(alpha ** i for i in range(gamma + 1))) < 1e-12
    assert expected_tokens_per_pass(1.0, 6) == 7.0
    assert expected_tokens_per_pass(0.0, 3) == 1.0
    with pytest.raises(ValueError, match=r"gamma \(proposals per round\) must be an integer >= 1, got 0"):
        expected_tokens_per_pass(0.5, 0)
    with pytest.raises(ValueError, match=r"alpha \(acceptance probability\) must be a float in \[0, 1\], got 1.5"):
        expected_tokens_per_pass(1.5, 2)


def test_expected_round_length_matches_formula_exactly():
    """Context-free draft and target: acceptance is i.i.d. with α = Σ min(p, q), and the exact
    mean round length is (1 − α^{γ+1})/(1 − α)."""
    V, gamma = 5, 3
    cfg = SamplingConfig(1.0, 1.0)
    lp, lq = torch.log(_probs(V, 5)), torch.log(_probs(V, 6, sharp=2.0))
    dec = SpeculativeDecoder([lambda pre: lq, lambda pre: lp], gamma=gamma, config=cfg)
    law = dec.round_law(())
    mean_len = math.fsum(len(t) * w for t, w in law.items())
    alpha = float(torch.minimum(cfg.probs(lp), cfg.probs(lq)).sum())
    assert abs(mean_len - expected_tokens_per_pass(alpha, gamma)) < 1e-13


def test_counters_per_level():
    V = 5
    draft, middle, target = _model(V, 1), _model(V, 2), _model(V, 3)
    cfg = SamplingConfig(0.6, 0.9)
    g = torch.Generator().manual_seed(3)
    ar = SpeculativeDecoder([target], config=cfg)
    assert len(ar.generate((0,), 10, generator=g)) == 10
    assert ar.counters["target"].passes == 10 and ar.tokens_per_target_pass() == 1.0
    two = SpeculativeDecoder([draft, target], gamma=4, config=cfg)
    two.generate((0,), 40, generator=g)
    t, d = two.counters["target"], two.counters["draft"]
    assert d.passes == 4 * t.passes and t.proposed == 4 * t.passes
    assert two.tokens == t.accepted + t.passes  # accepted proposals + one token per round
    assert two.tokens_per_target_pass() == two.tokens / t.passes
    tri = SpeculativeDecoder([draft, middle, target], gamma=3, config=cfg)
    tri.generate((0,), 40, generator=g)
    c = tri.counters
    assert c["middle"].passes == c["draft"].passes == c["draft"].proposed
    assert 0 <= c["draft"].acceptance <= 1 and 0 <= c["middle"].acceptance <= 1
    assert c["middle"].proposed == c["target"].proposed >= 3 * c["target"].passes
    assert tri.tokens == c["target"].accepted + c["target"].passes
    tri.reset_counters()
    assert tri.tokens == 0 and all(x.passes == 0 for x in c.values())
    assert math.isnan(PassCounter("x").acceptance) and math.isnan(tri.tokens_per_target_pass())


# --------------------------------------------------------------------------- χ², TV, errors
def test_chi_square_pooling_and_survival_function():
    probs = {"a": 0.5, "b": 0.3, "c": 0.15, "d": 0.03, "e": 0.02}
    counts = {"a": 48, "b": 33, "c": 14, "d": 4, "e": 1}
    res = chi_square_test(counts, probs)  # n = 100: d (3) and e (2) pool into one cell of 5
    assert res.cells == 4 and res.dof == 3
    want = (48 - 50) ** 2 / 50 + (33 - 30) ** 2 / 30 + (14 - 15) ** 2 / 15 + (5 - 5) ** 2 / 5
    assert abs(res.statistic - want) < 1e-12
    assert abs(res.z - (want - 3) / math.sqrt(6)) < 1e-12
    two = chi_square_test({0: 30, 1: 50, 2: 20}, {0: 0.25, 1: 0.5, 2: 0.25})  # dof 2: sf = exp(−x/2)
    assert abs(two.p_value - math.exp(-two.statistic / 2)) < 1e-12
    assert chi_square_test({0: 3, 1: 1}, {0: 1.0, 1: 0.0}).statistic == math.inf  # impossible outcome
    with pytest.raises(ValueError, match=r"probs must sum to 1, got 0.9"):
        chi_square_test({0: 1}, {0: 0.9})
    with pytest.raises(ValueError, match=r"counts must hold at least one observation"):
        chi_square_test({}, {0: 1.0})


def test_total_variation():
    assert total_variation({(0,): 0.5, (1,): 0.5}, {(0,): 1.0}) == 0.5
    assert total_variation(torch.tensor([0.2, 0.8]), torch.tensor([0.8, 0.2])) == pytest.approx(0.6)
    with pytest.raises(ValueError, match=r"p and q must have one shape"):
        total_variation(torch.zeros(2), torch.zeros(3))
    with pytest.raises(TypeError, match=r"both be tensors or both mappings"):
        total_variation(torch.zeros(2), {0: 1.0})


def test_decoder_errors():
    V = 4
    target = _model(V, 3)
    with pytest.raises(ValueError, match=r"gamma \(proposals per round\) must be an integer >= 1, got 0"):
        SpeculativeDecoder([_model(V, 1), target], gamma=0)
    with pytest.raises(ValueError, match=r"gamma .* got 2.5"):
        check_gamma(2.5)
    bad = SpeculativeDecoder([_model(V + 1, 1), target], gamma=2)
    with pytest.raises(ValueError, match=r"draft and target have different vocabulary sizes: level 1 gave 4 logits, "
                                         r"an earlier level 5"):
        bad.round((0,))
    with pytest.raises(ValueError, match=r"released=True .* needs 3 levels, got 2"):
        SpeculativeDecoder([_model(V, 1), target], released=True)
    with pytest.raises(ValueError, match=r"levels must be 1 to 3 callables"):
        SpeculativeDecoder([])
    with pytest.raises(TypeError, match=r"config must be a SamplingConfig"):
        SpeculativeDecoder([target], config={"temperature": 0.6})
    with pytest.raises(ValueError, match=r"n_tokens must be an integer >= 0, got -1"):
        SpeculativeDecoder([target]).generate((0,), -1)
    with pytest.raises(ValueError, match=r"level 0 must return logits of shape \(V,\)"):
        SpeculativeDecoder([lambda pre: torch.zeros(2, 3)]).round(())
