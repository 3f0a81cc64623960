"""The two-layer network with squared activation for modular addition, and its loss.

Paper: Yuandong Tian, "Composing Global Optimizers to Reasoning Tasks via Algebraic Objects in
Neural Nets", 2024, arXiv:2410.01779 (the problem setup: model and MSE loss). The book's chapter
``book/cogo/theory.ipynb`` (Part I, CoGO theory) explains every function here.

Model. Real weights ``Wa, Wb`` of shape ``(q, d)`` and ``Wc`` of shape ``(d, q)``; for inputs
``a, b`` in Z_d the hidden pre-activation is ``h = Wa e_a + Wb e_b`` and the output is

    o(a, b) = Wc h(a, b)^2            (squared elementwise)

Loss. With ``y = (a + b) mod d`` and the centring projector ``P⊥ = I - 1 1ᵀ / d``,

    ℓ = (1 / d²) Σ_{a, b} ‖P⊥ (o(a, b) - e_y)‖²

the mean over all d² pairs. Per example this equals the official code's "mse" loss
``Σ_g (o_g - ō)² - 2 (o_y - ō) + 1 - 1/d``. The zero network has loss ``(d - 1) / d``.

Differences from the official code (facebookresearch/luckmatters, ssl/real-dataset/cogo/):
the loss is evaluated on all d² pairs at once by broadcasting (``h[a, b, :] = Wa[:, a] +
Wb[:, b]``) rather than on one-hot mini-batches through ``nn.Linear`` layers; weights are plain
tensors in the layout above (``nn.Linear(d, q).weight`` has the same ``(q, d)`` layout, so the
official ``layera.weight``, ``layerb.weight``, ``layerc.weight`` plug in directly).

Explained in :doc:`/book/cogo/theory`.
"""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

__all__ = ["check_d", "check_weights", "as_weights", "forward", "loss", "accuracy"]

_NAMES = ("Wa", "Wb", "Wc")


def check_d(d: Any, odd: bool = False, name: str = "d") -> int:
    """Validate a modulus ``d``: an ``int`` (not bool, not float) >= 2; odd and >= 3 if ``odd``.

    Returns ``d`` as a Python int. Raises TypeError for a non-integer, ValueError for a bad value.

    Explained in :doc:`/book/cogo/theory`.
    """
    if isinstance(d, bool) or not isinstance(d, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= 2, got {d!r} of type {type(d).__name__}")
    d = int(d)
    if d < 2:
        raise ValueError(f"{name} must be an integer >= 2, got {d}")
    if odd and (d < 3 or d % 2 == 0):
        raise ValueError(
            f"{name} must be an odd integer >= 3, got {d}: an even d has the self-conjugate "
            f"frequency d/2, which the constructions and the analysis do not handle"
        )
    return d


def _to_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if not (np.issubdtype(x.dtype, np.floating)):
            raise TypeError(
                f"{name} must be a real floating array, got numpy dtype {x.dtype}"
            )
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    if isinstance(x, torch.Tensor):
        if not x.dtype.is_floating_point or x.dtype.is_complex:
            raise TypeError(f"{name} must be a real floating tensor, got dtype {x.dtype}")
        return x
    raise TypeError(
        f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}"
    )


def check_weights(Wa: Any, Wb: Any, Wc: Any, d: int | None = None) -> tuple[int, int]:
    """Validate a weight triple and return ``(q, d)``.

    Allowed: torch tensors or numpy arrays, 2-D, real floating; ``Wa`` and ``Wb`` of the same
    shape ``(q, d)`` (``q >= 0``), ``Wc`` of shape ``(d, q)``, ``d >= 2``; if ``d`` is given
    the weights must agree with it.

    Explained in :doc:`/book/cogo/theory`.
    """
    ts = [_to_tensor(w, n) for w, n in zip((Wa, Wb, Wc), _NAMES)]
    for w, n in zip(ts, _NAMES):
        if w.dim() != 2:
            raise ValueError(f"{n} must be 2-D, got shape {tuple(w.shape)}")
    q, dd = ts[0].shape
    if tuple(ts[1].shape) != (q, dd):
        raise ValueError(
            f"Wb must have the shape of Wa (q, d) = {(q, dd)}, got {tuple(ts[1].shape)}"
        )
    if tuple(ts[2].shape) != (dd, q):
        raise ValueError(
            f"Wc must have shape (d, q) = {(dd, q)} (transposed to Wa), got {tuple(ts[2].shape)}"
        )
    if dd < 2:
        raise ValueError(
            f"Wa has shape {(q, dd)}: the modulus d (its second dimension) must be >= 2, got {dd}"
        )
    if d is not None:
        d = check_d(d)
        if d != dd:
            raise ValueError(f"d = {d} disagrees with the weights' d = {dd} (Wa shape {(q, dd)})")
    return int(q), int(dd)


def as_weights(
    Wa: Any, Wb: Any, Wc: Any, d: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate and return the triple as torch tensors (numpy becomes float64; tensors pass).

    Explained in :doc:`/book/cogo/theory`.
    """
    check_weights(Wa, Wb, Wc, d)
    ts = [_to_tensor(w, n) for w, n in zip((Wa, Wb, Wc), _NAMES)]
    dtype = torch.promote_types(torch.promote_types(ts[0].dtype, ts[1].dtype), ts[2].dtype)
    return tuple(t.to(dtype) for t in ts)  # type: ignore[return-value]


def forward(Wa: Any, Wb: Any, Wc: Any) -> torch.Tensor:
    """Outputs ``o[a, b, :] = Wc (Wa e_a + Wb e_b)^2`` for all d² pairs, shape ``(d, d, d)``.

    Explained in :doc:`/book/cogo/theory`.
    """
    Wa, Wb, Wc = as_weights(Wa, Wb, Wc)
    h = Wa.T[:, None, :] + Wb.T[None, :, :]  # (d, d, q): h[a, b] = Wa[:, a] + Wb[:, b]
    return (h * h) @ Wc.T  # (d, d, d)


def _targets(d: int, device: torch.device | None = None) -> torch.Tensor:
    r = torch.arange(d, device=device)
    return (r[:, None] + r[None, :]) % d  # (d, d)


def _pair_mask(mask: Any, d: int, device: torch.device) -> torch.Tensor:
    """Validate a boolean ``(d, d)`` pair mask that selects at least one pair."""
    m = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask))
    if m.dtype != torch.bool:
        raise TypeError(f"mask must be boolean, got dtype {m.dtype}")
    if tuple(m.shape) != (d, d):
        raise ValueError(f"mask must have shape (d, d) = {(d, d)}, got {tuple(m.shape)}")
    if not bool(m.any()):
        raise ValueError("mask selects no pairs; it must select at least one")
    return m.to(device)


def loss(Wa: Any, Wb: Any, Wc: Any, mask: Any = None) -> torch.Tensor:
    """Mean over the pairs of ``‖P⊥(o − e_{(a+b) mod d})‖²``; a 0-dim tensor.

    ``mask``: optional boolean ``(d, d)`` array/tensor selecting the pairs to average over (a
    training split, as :func:`mini.cogo.trainer.make_masks` draws them); ``None`` averages all
    d² pairs. Differentiable when the inputs require grad. Numpy inputs are computed in float64.

    Explained in :doc:`/book/cogo/theory`.
    """
    Wa, Wb, Wc = as_weights(Wa, Wb, Wc)
    d = Wa.shape[1]
    o = forward(Wa, Wb, Wc)  # (d, d, d)
    e = torch.nn.functional.one_hot(_targets(d, Wa.device), d).to(o.dtype)  # (d, d, d)
    r = o - e
    r = r - r.mean(dim=-1, keepdim=True)  # P⊥
    per_pair = (r * r).sum(dim=-1)  # (d, d)
    if mask is None:
        return per_pair.mean()
    return per_pair[_pair_mask(mask, d, per_pair.device)].mean()


def accuracy(Wa: Any, Wb: Any, Wc: Any, mask: Any = None) -> float:
    """Fraction of pairs whose argmax output is ``(a + b) mod d``.

    ``mask``: optional boolean ``(d, d)`` array/tensor selecting the pairs to count (e.g. the
    test split); ``None`` counts all d² pairs.

    Explained in :doc:`/book/cogo/theory`.
    """
    Wa, Wb, Wc = as_weights(Wa, Wb, Wc)
    d = Wa.shape[1]
    with torch.no_grad():
        pred = forward(Wa, Wb, Wc).argmax(dim=-1)  # (d, d)
    ok = pred == _targets(d, pred.device)
    if mask is None:
        return float(ok.double().mean())
    return float(ok[_pair_mask(mask, d, ok.device)].double().mean())
