"""mini.cogo.dynamics: orders, the recorder's off-target identity, settle steps, width sweep."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mini.cogo as cogo
from mini.cogo import dynamics as dyn

CFG = dict(d=5, q=12, seeds=2, dtype=torch.float64, progress=False, log_every=5)


def test_frequency_orders_match_analyze():
    res = cogo.train(steps=60, **{**CFG, "d": 7, "q": 16})
    got = dyn.frequency_orders(res.Wa, res.Wb, res.Wc)
    for s, a in enumerate(cogo.analyze_batch(res.Wa, res.Wb, res.Wc)):
        assert list(got[s]) == [a.orders[k] for k in range(1, 4)]
    W = cogo.construct("F6", 7)  # 3(d - 1) = 18 nodes, 6 on each frequency
    one = [w.unsqueeze(0) for w in W]
    assert list(dyn.frequency_orders(*one)[0]) == [6, 6, 6]


def test_recorder_identity_and_steps():
    want = [0, 3, 7, 20]
    rec = dyn.PotentialRecorder(want)
    res = cogo.train(steps=20, callback=rec, callback_every=1, **CFG)
    assert list(rec.step) == want
    assert rec.diag.shape == (4, 2, 2) and rec.off.shape == (4, 2, 2)
    assert rec.orders.dtype.kind == "i" and rec.energy.min() > 0
    # ℓ_k + 1 = |r̃_kkk − 1|² + off_k, and the centred potentials give r̃_kkk
    Wc = cogo.center(*res.weights(1))
    pots = cogo.potentials(*Wc)
    lk = cogo.per_frequency_loss(pots).numpy()
    k = np.arange(1, 3)
    r = pots["r"].numpy()[k, k, k]
    np.testing.assert_allclose(rec.diag[-1, 1], r, rtol=1e-12)
    np.testing.assert_allclose(lk[k] + 1, np.abs(r - 1) ** 2 + rec.off[-1, 1], rtol=1e-12)
    assert (rec.off >= -1e-12).all()


def test_recorder_off_is_zero_on_a_construction():
    W = [w.unsqueeze(0) for w in cogo.construct("F6", 7)]
    rec = dyn.PotentialRecorder([0])
    rec(0, *W)
    np.testing.assert_allclose(rec.diag[0, 0], 1, atol=1e-10)
    np.testing.assert_allclose(rec.off[0, 0], 0, atol=1e-10)


def test_settle_steps():
    steps = np.array([0, 10, 20, 30])
    ok = np.array([[True, False, True], [False, False, True], [True, True, True], [True, False, True]])
    out = dyn.settle_steps(steps, ok)
    assert out[0] == 20 and np.isnan(out[1]) and out[2] == 0


def test_spearman():
    assert dyn.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert dyn.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    assert dyn.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1)
    assert np.isnan(dyn.spearman([1, 1, 1], [1, 2, 3]))


def test_log_steps():
    s = dyn.log_steps(1000, n=20, first=5)
    assert s[0] == 0 and s[-1] == 1000 and s == sorted(set(s)) and 5 in s
    assert dyn.log_steps(3, first=5) == [0, 3]


def test_width_sweep_shapes_and_batches():
    cfg = cogo.TrainConfig(steps=30, **{**CFG, "seeds": 3})
    sw = dyn.width_sweep(cfg, [4, 12], loss_cut=10.0)
    assert sw.final_loss.shape == (2, 3) and sw.widths == [4, 12] and sw.seeds == [0, 1, 2]
    assert (sw.fit_step == 0).all()  # every loss is below 10 from the start
    assert sw.rate().shape == (2,) and sw.rate([1]).shape == (2,)
    # network s of a width is the trainer's seed s: the same as its own run
    alone = cogo.train(cfg, q=12, seed=2, seeds=1)
    assert sw.final_loss[1, 2] == pytest.approx(float(alone.history["train_loss"][-1, 0]), rel=1e-12)


@pytest.mark.parametrize(
    "call, msg",
    [
        (lambda: dyn.log_steps(0), "steps must be an integer >= 1, got 0"),
        (lambda: dyn.PotentialRecorder([]), "steps must be a non-empty"),
        (lambda: dyn.PotentialRecorder([1], rule="x"), "rule must be one of"),
        (lambda: dyn.settle_steps([0, 1], np.array([1, 0])), "bool array"),
        (lambda: dyn.spearman([1], [1]), "same size >= 2"),
        (lambda: dyn.width_sweep(cogo.TrainConfig(**CFG), []), "widths must be a non-empty"),
        (lambda: dyn.width_sweep(cogo.TrainConfig(**CFG), [4], loss_cut=0), "loss_cut must be"),
        (lambda: dyn.width_sweep({"d": 5}, [4]), "config must be a TrainConfig"),
        (lambda: dyn.frequency_orders(torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(5, 2)),
         "Wa must be 3-D"),
        (lambda: dyn.PotentialRecorder([0]).diag, "nothing recorded yet"),
    ],
)
def test_errors(call, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        call()


def test_sweep_json_round_trip_and_summary():
    cfg = cogo.TrainConfig(steps=40, **{**CFG, "seeds": 4, "log_every": 10})
    sw = dyn.width_sweep(cfg, [4, 10, 12, 20], loss_cut=0.5)
    back = dyn.sweep_from_json(dyn.sweep_to_json(sw))
    for k in ("final_loss", "train_acc", "test_acc", "fit_step"):
        np.testing.assert_array_equal(getattr(back, k), getattr(sw, k))
    s = dyn.width_summary(back, 5, [[0, 1], [2, 3]])
    assert (s["q_max"], s["q_below"], s["q_F46"], s["q_F6"]) == (20, 4, 10, 12)
    assert len(s["fit_max"]) == 2 and all(0 <= v <= 1 for v in s["fit_below"])
    with pytest.raises(ValueError, match="widths must include 2d"):
        dyn.width_summary(back, 7, [[0]])
    with pytest.raises(ValueError, match="data must be a dict"):
        dyn.sweep_from_json({"widths": [1]})


def test_stage_steps():
    rec = dyn.PotentialRecorder(dyn.log_steps(200, n=20, first=5))
    cogo.train(steps=200, callback=rec, callback_every=1, **{**CFG, "q": 24, "weight_decay": 1e-3})
    st = dyn.stage_steps(rec)
    assert set(st) == {"half", "diag", "off", "order"} and st["half"].shape == (2, 2)
    np.testing.assert_array_equal(st["order"], dyn.settle_steps(rec.step, rec.orders == rec.orders[-1]))
