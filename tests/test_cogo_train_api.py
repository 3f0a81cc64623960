"""mini.cogo.train for users: start from given weights, resume, call back; loss with a mask."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mini.cogo as cogo
from mini.cogo.trainer import TrainConfig, TrainResult, evaluate, init_weights, train

CFG = dict(d=5, q=12, seeds=2, dtype=torch.float64, progress=False, log_every=10)


def test_resume_equals_one_run():
    whole = train(steps=40, **CFG)
    first = train(steps=25, **CFG)
    rest = train(steps=15, resume=first, **CFG)
    for a, b in zip((whole.Wa, whole.Wb, whole.Wc), (rest.Wa, rest.Wb, rest.Wc)):
        assert torch.equal(a, b)  # the same arithmetic in the same order: bit for bit
    assert rest.steps_done == 40 and first.steps_done == 25
    assert list(rest.history["step"]) == [25, 35, 40]
    np.testing.assert_array_equal(rest.history["train_loss"][-1], whole.history["train_loss"][-1])


def test_resume_takes_new_hyper_parameters():
    first = train(steps=5, **CFG)
    rest = train(steps=5, resume=first, **{**CFG, "weight_decay": 0.5, "lr": 0.001})
    default = train(steps=5, resume=first, **CFG)
    assert not torch.equal(rest.Wa, default.Wa)


def test_init_equals_default_init():
    cfg = TrainConfig(steps=20, **CFG)
    base = train(cfg)
    given = train(cfg, init=init_weights(cfg))
    assert torch.equal(base.Wc, given.Wc)
    zeros = tuple(torch.zeros_like(w) for w in init_weights(cfg))
    stuck = train(cfg, init=zeros)  # the zero network is a critical point: nothing moves
    assert float(stuck.Wa.abs().max()) == 0.0


def test_callback_steps_and_shapes():
    seen = []

    def cb(step, Wa, Wb, Wc):
        assert Wa.shape == (2, 12, 5) and Wc.shape == (2, 5, 12)
        seen.append((step, float(cogo.loss(Wa[0], Wb[0], Wc[0]))))

    res = train(steps=25, callback=cb, callback_every=10, **CFG)
    assert [s for s, _ in seen] == [0, 10, 20, 25]
    full = cogo.loss(*res.weights(0))
    assert seen[-1][1] == pytest.approx(float(full), rel=1e-12)
    seen.clear()
    train(steps=10, resume=res, callback=cb, callback_every=5, **CFG)
    assert [s for s, _ in seen] == [25, 30, 35]


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(callback=3), TypeError, "callback must be callable"),
        (dict(callback=print, callback_every=0), ValueError, "callback_every must be an integer >= 1"),
        (dict(callback_every=2.5), ValueError, "callback_every"),
        (dict(init=(1, 2, 3)), TypeError, "init Wa must be a real floating torch.Tensor"),
        (dict(init=(torch.zeros(2, 12, 4),) * 3), ValueError, r"init Wa has shape \(2, 12, 4\)"),
        (dict(init="w"), TypeError, "init must be a tuple"),
        (dict(resume="r"), TypeError, "resume must be a TrainResult"),
    ],
)
def test_errors(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        train(steps=1, **CFG, **kwargs)


def test_init_and_resume_exclusive_and_resume_needs_state():
    first = train(steps=2, **CFG)
    with pytest.raises(ValueError, match="at most one of init and resume"):
        train(steps=1, init=init_weights(TrainConfig(**CFG)), resume=first, **CFG)
    bare = TrainResult(Wa=first.Wa, Wb=first.Wb, Wc=first.Wc, mask=first.mask,
                       history={}, elapsed_s=0.0, config=first.config)
    with pytest.raises(ValueError, match="no optimizer_state"):
        train(steps=1, resume=bare, **CFG)
    with pytest.raises(ValueError, match=r"resume Wa has shape \(2, 12, 5\)"):
        train(steps=1, resume=first, **{**CFG, "seeds": 3})


def test_loss_with_mask_matches_evaluate_and_a_direct_sum():
    res = train(steps=30, **CFG)
    Wa, Wb, Wc = res.weights(1)
    m = res.mask[1]
    ev = evaluate(res.Wa, res.Wb, res.Wc, res.mask)
    assert float(cogo.loss(Wa, Wb, Wc, mask=m)) == pytest.approx(ev["train_loss"][1], rel=1e-12)
    # direct: per pair, sum over outputs of the centred squared error
    d = 5
    tot, n = 0.0, 0
    for a in range(d):
        for b in range(d):
            if m[a, b]:
                o = Wc @ (Wa[:, a] + Wb[:, b]) ** 2
                u = o - torch.nn.functional.one_hot(torch.tensor((a + b) % d), d).double()
                tot += float(((u - u.mean()) ** 2).sum())
                n += 1
    assert float(cogo.loss(Wa, Wb, Wc, mask=m)) == pytest.approx(tot / n, rel=1e-12)
    assert float(cogo.loss(Wa, Wb, Wc, mask=torch.ones(d, d, dtype=torch.bool))) == pytest.approx(
        float(cogo.loss(Wa, Wb, Wc)), rel=1e-15
    )


@pytest.mark.parametrize(
    "mask, exc, msg",
    [
        (torch.ones(5, 5), TypeError, "mask must be boolean"),
        (torch.ones(5, 4, dtype=torch.bool), ValueError, r"mask must have shape \(d, d\) = \(5, 5\)"),
        (torch.zeros(5, 5, dtype=torch.bool), ValueError, "mask selects no pairs"),
    ],
)
def test_loss_mask_errors(mask, exc, msg):
    W = cogo.construct("F6", 5)
    with pytest.raises(exc, match=msg):
        cogo.loss(*W, mask=mask)


def test_exports():
    assert cogo.evaluate is evaluate and cogo.init_weights is init_weights
    assert callable(cogo.make_masks)
