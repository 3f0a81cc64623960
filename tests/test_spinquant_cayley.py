"""CayleySGD: orthogonality, descent, step cap, momentum, state_dict, first-order form, errors."""

from __future__ import annotations

import io
import itertools

import pytest
import torch

from mini.spinquant.cayley import CayleySGD, cayley_step


def _orth(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, Rr = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * torch.sign(torch.diagonal(Rr))).to(dtype)


def _target(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n, generator=g, dtype=torch.float64)


def _run(
    R0: torch.Tensor, T: torch.Tensor, steps: int, **kw
) -> tuple[torch.nn.Parameter, list[float], CayleySGD]:
    """Minimise ||R − T||² from R0; return the parameter, the losses and the optimizer."""
    R = torch.nn.Parameter(R0.clone())
    opt = CayleySGD([R], **kw)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (R - T.to(R.dtype)).pow(2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return R, losses, opt


def _orth_err(R: torch.Tensor) -> float:
    R = R.detach().double()
    return (R.T @ R - torch.eye(R.shape[0], dtype=torch.float64)).abs().max().item()


@pytest.mark.parametrize("exact", [True, False])
def test_stays_orthogonal_and_reaches_polar_minimum(exact: bool) -> None:
    n = 16
    T = _target(n)
    R, losses, _ = _run(_orth(n, 0), T, 100, lr=0.02, exact=exact)
    assert R.dtype == torch.float32
    # measured: exact 3e-7 (float32 storage), approx 5e-7; the approximation's own error grows
    # as (α‖A‖/2)^5 (next test): at lr 0.05 it drifts to 2e-5 in 100 steps on this problem.
    assert _orth_err(R) < 1e-5
    # The minimum of ||R − T||² over O(n) is at the polar factor U·Vᵀ of T (SO(n) or not: from a
    # start in the same connected component, at least the loss must fall well below its start).
    U, _, Vh = torch.linalg.svd(T)
    best = (U @ Vh - T).pow(2).sum().item()
    assert losses[-1] < losses[0] - 0.5 * (losses[0] - best)
    # monotone descent at this lr
    assert all(b <= a + 1e-4 for a, b in itertools.pairwise(losses))


def test_trace_objective_reaches_optimum() -> None:
    # max tr(Tᵀ R) over SO(n) from the identity: T = a rotation, so the optimum R = T is reachable.
    n = 8
    Tq = _orth(n, 3, torch.float64)
    if torch.linalg.det(Tq) < 0:
        Tq[:, 0] = -Tq[:, 0]
    R = torch.nn.Parameter(torch.eye(n, dtype=torch.float64))
    opt = CayleySGD([R], lr=0.2)
    for _ in range(300):
        opt.zero_grad()
        (-(Tq * R).sum()).backward()
        opt.step()
    assert (R.detach() - Tq).abs().max().item() < 1e-6


def test_exact_and_approx_agree_and_exact_is_orthogonal_in_float64() -> None:
    R = _orth(12, 4, torch.float64)
    M = _target(12, 5)
    A = 0.5 * (M - M.T)
    Re, ae = cayley_step(R, A, lr=0.05, exact=True)
    Ra, aa = cayley_step(R, A, lr=0.05, exact=False)
    assert ae == aa
    assert _orth_err(Re) < 1e-13
    # fixed point: error contracts by ≤ α‖A‖/2 per iteration, 5 iterations.
    assert (Re - Ra).abs().max().item() < 1e-6


@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_fixed_point_error_within_contraction_bound(scale: float) -> None:
    # Y_k − Y* = (α/2·A)^k (Y_0 − Y*): after 5 iterations at most (α‖A‖₁/2)^5 ‖Y_0 − Y*‖₁.
    R = _orth(12, 4, torch.float64)
    M = scale * _target(12, 5)
    A = 0.5 * (M - M.T)
    Re, alpha = cayley_step(R, A, lr=1.0, exact=True)
    Ra, _ = cayley_step(R, A, lr=1.0, exact=False)
    a1 = A.abs().sum(0).max().item()
    assert alpha == pytest.approx(min(1.0, 1 / a1))
    e0 = (R.T + alpha * A @ R.T - Re.T).abs().sum(0).max().item()
    e5 = (Ra.T - Re.T).abs().sum(0).max().item()
    assert e5 <= (alpha * a1 / 2) ** 5 * e0 * (1 + 1e-9) + 1e-15


def test_alpha_capped_by_inverse_one_norm() -> None:
    n = 6
    R = torch.nn.Parameter(torch.eye(n, dtype=torch.float64))
    G = 100.0 * _target(n, 7)
    A = 0.5 * (G - G.T)  # R = I
    cap = 1.0 / A.abs().sum(0).max().item()
    assert cap < 1.0
    opt = CayleySGD([R], lr=1.0)
    R.grad = G.clone()
    opt.step()
    assert opt.state[R]["alpha"] == pytest.approx(cap, rel=1e-15)
    eye = torch.eye(n, dtype=torch.float64)
    expect = (eye - cap / 2 * A) @ torch.linalg.inv(eye + cap / 2 * A)
    assert (R.detach() - expect).abs().max().item() < 1e-12
    # a small gradient: the cap is not active and α = lr
    R2 = torch.nn.Parameter(torch.eye(n, dtype=torch.float64))
    opt2 = CayleySGD([R2], lr=0.01)
    R2.grad = 0.01 * _target(n, 7)
    opt2.step()
    assert opt2.state[R2]["alpha"] == 0.01


def test_first_order_is_riemannian_gradient_step() -> None:
    R = _orth(10, 8, torch.float64)
    G = _target(10, 9)
    A = 0.5 * (R.T @ G - G.T @ R)
    errs = []
    for alpha in (1e-2, 1e-3, 1e-4):
        Rn, a = cayley_step(R, A, lr=alpha)
        assert a == alpha
        errs.append((Rn - (R - alpha * R @ A)).abs().max().item())
    # O(α²): ten times smaller α, a hundred times smaller error
    assert 50 < errs[0] / errs[1] < 200 and 50 < errs[1] / errs[2] < 200
    assert errs[1] < 1e-5


def test_momentum_buffer_accumulates_and_matters() -> None:
    n = 8
    T = _target(n, 2)
    R, _, opt = _run(_orth(n, 1, torch.float64), T, 2, lr=0.01, momentum=0.9)
    buf = opt.state[R]["momentum_buffer"]
    assert buf.abs().max().item() > 1e-3
    assert (
        buf + buf.T
    ).abs().max().item() < 1e-12  # skew: a tangent (Lie algebra) direction
    # hand-computed two steps: M1 = A0, M2 = 0.9·M1 + A1
    R0 = _orth(n, 1, torch.float64)
    A0 = R0.T @ (2 * (R0 - T))
    A0 = 0.5 * (A0 - A0.T)
    R1, _ = cayley_step(R0, A0, 0.01)
    A1 = R1.T @ (2 * (R1 - T))
    A1 = 0.5 * (A1 - A1.T)
    M2 = 0.9 * A0 + A1
    assert (buf - M2).abs().max().item() < 1e-12
    R2, _ = cayley_step(R1, M2, 0.01)
    assert (R.detach() - R2).abs().max().item() < 1e-12
    # different trajectories with and without momentum, and momentum is not worse here
    Ra, la, _ = _run(_orth(n, 1, torch.float64), T, 30, lr=0.01, momentum=0.0)
    Rb, lb, _ = _run(_orth(n, 1, torch.float64), T, 30, lr=0.01, momentum=0.9)
    assert (Ra.detach() - Rb.detach()).abs().max().item() > 1e-2
    assert lb[-1] < la[-1]
    assert _orth_err(Rb) < 1e-12


def test_state_dict_round_trip_resumes_identically() -> None:
    n = 8
    T = _target(n, 3)
    R, _, opt = _run(_orth(n, 2), T, 5, lr=0.02, momentum=0.5, exact=False)
    buf = io.BytesIO()
    torch.save({"R": R.detach().clone(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    R2 = torch.nn.Parameter(saved["R"])
    opt2 = CayleySGD([R2], lr=1.0)  # hyper-parameters come from the state_dict
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["lr"] == 0.02 and opt2.param_groups[0]["exact"] is False
    for P, o in ((R, opt), (R2, opt2)):
        for _ in range(5):
            o.zero_grad()
            (P - T.float()).pow(2).sum().backward()
            o.step()
    assert torch.equal(R.detach(), R2.detach())
    assert torch.equal(
        opt.state[R]["momentum_buffer"], opt2.state[R2]["momentum_buffer"]
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_keeps_parameter_dtype(dtype: torch.dtype) -> None:
    R = torch.nn.Parameter(_orth(8, 0, dtype))
    opt = CayleySGD([R], lr=0.1)
    R.grad = _target(8).to(dtype)
    before = R.detach().clone()
    opt.step()
    assert R.dtype == dtype and not torch.equal(R.detach(), before)


def test_parameter_without_grad_is_skipped() -> None:
    R = torch.nn.Parameter(_orth(4, 0))
    before = R.detach().clone()
    CayleySGD([R], lr=0.1).step()
    assert torch.equal(R.detach(), before)


def test_errors() -> None:
    sq = torch.nn.Parameter(torch.eye(3))
    with pytest.raises(ValueError, match=r"params\[0\] has shape \(3, 4\).*square"):
        CayleySGD([torch.nn.Parameter(torch.zeros(3, 4))], lr=0.1)
    with pytest.raises(ValueError, match=r"params\[1\] has shape \(3,\)"):
        CayleySGD([sq, torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(ValueError, match=r"lr=0 must be a number > 0"):
        CayleySGD([sq], lr=0)
    with pytest.raises(ValueError, match=r"lr=-0.1 must be"):
        CayleySGD([sq], lr=-0.1)
    with pytest.raises(ValueError, match=r"momentum=1.0 must be in \[0, 1\)"):
        CayleySGD([sq], lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match=r"momentum=-0.5 must be in \[0, 1\)"):
        CayleySGD([sq], lr=0.1, momentum=-0.5)
    with pytest.raises(TypeError, match=r"exact=1 must be a bool"):
        CayleySGD([sq], lr=0.1, exact=1)
    with pytest.raises(ValueError, match=r"momentum=2 must be"):
        CayleySGD([{"params": [sq], "momentum": 2}], lr=0.1)
    with pytest.raises(TypeError, match=r"dtype torch.int64"):
        CayleySGD([torch.zeros(3, 3, dtype=torch.long)], lr=0.1)
