"""Identities of the GaLore chapter (book/galore/theory.ipynb), checked in float64."""
from __future__ import annotations

import warnings

import pytest
import torch

from mini.galore import GaLoreAdamW, GaLoreProjector

F64 = torch.float64


def _problem(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=g, dtype=F64)
    B = torch.randn(m, m, generator=g, dtype=F64)
    C = torch.randn(n, n, generator=g, dtype=F64)
    B, C = B @ B.T / m + torch.eye(m, dtype=F64), C @ C.T / n + torch.eye(n, dtype=F64)  # PSD
    eta = 1.0 / float(torch.linalg.eigvalsh(B)[-1] * torch.linalg.eigvalsh(C)[-1])
    return A, B, C, eta


def test_float64_gradient_keeps_a_float64_svd():
    G = torch.randn(12, 20, generator=torch.Generator().manual_seed(1), dtype=F64)
    proj = GaLoreProjector(rank=12, update_proj_gap=5, scale=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        R = proj.project(G, 0)
    P = proj.ortho  # (12, 12), left side
    assert P.dtype == F64
    torch.testing.assert_close(P.T @ P, torch.eye(12, dtype=F64), rtol=0, atol=1e-13)
    torch.testing.assert_close(proj.project_back(R), G, rtol=0, atol=1e-13)


@pytest.mark.parametrize("shape,proj_type", [((12, 16), "std"), ((12, 16), "left"), ((16, 12), "std"),
                                             ((16, 12), "right")])
def test_full_rank_galore_sgd_is_sgd(shape, proj_type):
    m, n = shape
    A, B, C, eta = _problem(m, n)
    W_sgd, W_gal = torch.zeros(m, n, dtype=F64), torch.zeros(m, n, dtype=F64)
    proj = GaLoreProjector(rank=min(m, n), update_proj_gap=5, scale=1.0, proj_type=proj_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(30):
            W_sgd = W_sgd + eta * (A - B @ W_sgd @ C)
            W_gal = W_gal + eta * proj.project_back(proj.project(A - B @ W_gal @ C, t))
    torch.testing.assert_close(W_gal, W_sgd, rtol=1e-12, atol=1e-14)


def test_full_rank_galore_adam_is_not_adam():
    m, n = 12, 16
    A, B, C, _ = _problem(m, n)
    W_adam = torch.zeros(m, n, dtype=F64, requires_grad=True)
    W_gal = torch.zeros(m, n, dtype=F64, requires_grad=True)
    opt_adam = GaLoreAdamW([{"params": [W_adam]}], lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt_gal = GaLoreAdamW([{"params": [W_gal], "rank": m, "update_proj_gap": 10**6, "scale": 1.0}], lr=1e-2)
        for _ in range(5):
            for W, opt in ((W_adam, opt_adam), (W_gal, opt_gal)):
                W.grad = -(A - B @ W.detach() @ C)
                opt.step()
    dist = float((W_gal.detach() - W_adam.detach()).norm() / W_adam.detach().norm())
    assert dist > 0.1  # elementwise normalisation is not rotation invariant
