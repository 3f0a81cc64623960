"""Q-GaLore's projector: lazy, layer-adaptive subspace updates and an INT4 projection matrix.

Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank
Gradients", arXiv 2407.08296 (2024), Section 3 (official code VITA-Group/Q-GaLore). Part II, Q-GaLore
chapter (:doc:`/book/qgalore/theory`; GaLore itself: :doc:`/book/galore/theory`). It
extends :class:`mini.galore.projector.GaLoreProjector`.

Lazy subspace updates
---------------------
Some layers' gradient subspaces settle early, so refreshing them every T steps wastes SVDs. At
every SVD (steps where ``step % T == 0``) after the first, the projector measures how much the
leading direction moved ::

    c_t = |<p_t, p_{t-1}>| / (||p_t|| ||p_{t-1}||)    cos_rule="abs" (default)
    c_t =  <p_t, q_{t-1}>  / (||p_t|| ||q_{t-1}||)    cos_rule="signed" (official)

where ``p_t`` is the leading singular vector of the new basis (first row of ``Vh`` on the right
side, first column of ``U`` on the left or full side), ``p_{t-1}`` the same vector of the stored
(dequantized) previous basis and ``q_{t-1}`` the float leading vector of the previous SVD, kept
beside the quantized basis (what the official code compares with). ``c_t`` goes into a queue of
the last ``queue_size`` values (5); **if the queue is full and its mean is ≥ cos_threshold
(0.4), T ← γ T (γ = 2)**. The count of SVDs performed is ``n_svd``.

Choices, and the official code
------------------------------
- Sign. A singular vector is defined up to sign, and the official code takes the signed cosine
  of the first vectors, so an SVD that merely flips the sign of an unchanged subspace reads as
  ``c = -1`` ("moved completely") and delays the doubling at random (a CPU SVD's sign is close
  to a coin flip). The default ``cos_rule="abs"`` uses ``|cos|``: the sign carries no
  information about the subspace. ``cos_rule="signed"`` is the official rule, to compare with.
- The queue is never cleared, as in the official code: once the mean of the last five cosines
  is above the threshold, every later SVD doubles T again while it stays there, so a stable
  layer's refresh interval grows geometrically (this is where the paper's "about 36% of the SVDs
  suffice" comes from). Clearing the queue after each doubling would need five more SVDs per
  doubling and would save fewer SVDs than the paper reports; a rotating subspace pulls the mean
  down and stops the growth either way.
- Only the leading vector is compared (as the official code); with a rank-r basis this is a
  cheap proxy for the whole subspace.

INT4 projection
---------------
The basis is stored group-wise quantized by :func:`mini.quant.groupwise.quantize_groupwise`
(``proj_bits`` = 4 by default, or 8; groups of ``proj_group_size`` = 256 over the flattened
matrix; range including 0; INT4 packed two per byte; the official code spends a byte per value
and clips one-sign groups) and dequantized at every use (``ortho`` is a property). A 512 × 1376
Gaussian's left basis at r = 128 comes back with a relative error of about 0.11 (the digest's
figure; tested). The ``|cos|`` rule compares the new float basis with the dequantized previous
one; the official code (``cos_rule="signed"``) compares it with the previous SVD's float leading
vector, which it keeps unquantized (a vector of m or n floats per matrix).

Explained in :doc:`/book/qgalore/theory`.
"""
from __future__ import annotations

from numbers import Integral, Real
from typing import Any, Optional

import torch
from torch import Tensor

from mini.galore.projector import GaLoreProjector
from mini.quant.groupwise import ALLOWED_BITS, GroupQuantized, quantize_groupwise

__all__ = ["AdaptiveProjector", "check_adaptive_options"]


def _pack(qt: Optional[GroupQuantized], dtype: Optional[torch.dtype]) -> Optional[dict[str, Any]]:
    if qt is None:
        return None
    return {"data": qt.data, "scale": qt.scale, "zero": qt.zero, "shape": list(qt.shape),
            "bits": qt.bits, "group_size": qt.group_size, "dtype": str(dtype).replace("torch.", "")}


def _unpack(d: Optional[dict[str, Any]]) -> tuple[Optional[GroupQuantized], Optional[torch.dtype]]:
    if d is None:
        return None, None
    qt = GroupQuantized(d["data"], d["scale"], d["zero"], tuple(int(s) for s in d["shape"]),
                        int(d["bits"]), int(d["group_size"]))
    return qt, getattr(torch, d["dtype"])


# the adaptive projector's options (defaults: mini.qgalore.optimizer.QGALORE_GROUP_DEFAULTS)
_OPTIONS: tuple[str, ...] = ("cos_threshold", "gamma", "queue_size", "proj_bits", "proj_group_size", "cos_rule")

#: The lazy-update cosine rules: ``|cos|`` against the dequantized previous basis (mini's
#: default), or the official code's signed cosine against the previous float leading vector.
COS_RULES: tuple[str, ...] = ("abs", "signed")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_adaptive_options(**options: Any) -> dict[str, Any]:
    """Validate options of :class:`AdaptiveProjector` (``cos_threshold``, ``gamma``, ``queue_size``,
    ``proj_bits``, ``proj_group_size``, ``cos_rule``; any subset).

    Returns them as plain Python values; an unknown name or a bad value raises, naming the
    option, its value and what is allowed. Used by the projector, by
    :class:`~mini.qgalore.optimizer.QGaLoreAdamW` when a group is added and by
    :class:`~mini.qgalore.optimizer.Int8LayerwiseQGaLore` when it is built, so errors come at
    construction, not at the first step or inside backward.

    Explained in :doc:`/book/qgalore/theory`.
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"unknown projector argument(s) {unknown}; allowed: {sorted(_OPTIONS)}")
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name == "cos_threshold":
            if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value <= 1:
                raise ValueError(f"cos_threshold must be a real number in [0, 1], got {value!r}")
            out[name] = float(value)
        elif name == "gamma":
            if isinstance(value, bool) or not isinstance(value, Real) or not 1 <= value < float("inf"):
                raise ValueError(f"gamma must be a real number >= 1 (the gap's growth factor), got {value!r}")
            out[name] = float(value)
        elif name == "cos_rule":
            if value not in COS_RULES or not isinstance(value, str):
                raise ValueError(f"cos_rule must be one of {COS_RULES} (|cos|, or the official code's signed "
                                 f"cosine), got {value!r}")
            out[name] = str(value)
        elif name == "proj_bits":
            if isinstance(value, bool) or not isinstance(value, Integral) or int(value) not in ALLOWED_BITS:
                raise ValueError(f"proj_bits must be one of {ALLOWED_BITS}, got {value!r}")
            out[name] = int(value)
        else:  # queue_size, proj_group_size
            out[name] = _positive_int(name, value)
    return out


class AdaptiveProjector(GaLoreProjector):
    """GaLore's projector with Q-GaLore's lazy updates and a quantized (INT4) basis.

    Arguments beyond :class:`~mini.galore.projector.GaLoreProjector`'s ``rank``,
    ``update_proj_gap``, ``scale``, ``proj_type``, ``name``:

    Explained in :doc:`/book/qgalore/theory`.

    Args:
        cos_threshold: mean ``|cosine|`` of the queue at or above which the gap grows (official: 0.4).
        gamma: factor of the gap's growth, a real ≥ 1 (official: 2); the gap stays an int.
        queue_size: how many recent cosines are averaged (official: 5).
        proj_bits: 4 (official) or 8, bits of the stored basis.
        proj_group_size: values per quantization group of the basis (official: 256).
        cos_rule: ``"abs"`` (default): ``|cos|`` with the dequantized previous basis's leading
            vector; ``"signed"``: the official code's signed cosine with the previous SVD's float
            leading vector (a sign flip of an unchanged subspace then reads as -1).

    State beyond the base class: ``queue`` (recent cosines, floats), ``n_gap_increases`` and,
    for ``cos_rule="signed"``, ``past_leading`` (the previous SVD's float leading vector).
    """

    def __init__(
        self,
        rank: int,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        name: str | None = None,
        cos_threshold: float = 0.4,
        gamma: float = 2.0,
        queue_size: int = 5,
        proj_bits: int = 4,
        proj_group_size: int = 256,
        cos_rule: str = "abs",
    ) -> None:
        options = check_adaptive_options(cos_threshold=cos_threshold, gamma=gamma, queue_size=queue_size,
                                         proj_bits=proj_bits, proj_group_size=proj_group_size,
                                         cos_rule=cos_rule)
        self.cos_threshold = options["cos_threshold"]
        self.gamma = options["gamma"]
        self.queue_size = options["queue_size"]
        self.proj_bits = options["proj_bits"]
        self.proj_group_size = options["proj_group_size"]
        self.cos_rule = options["cos_rule"]
        self.past_leading: Optional[Tensor] = None  # (n,) or (m,) float32, cos_rule "signed" only
        self.queue: list[float] = []
        self.n_gap_increases = 0
        self._in_svd = False
        self._q: dict[str, Optional[GroupQuantized]] = {"ortho": None, "ortho_right": None}
        self._dtype: dict[str, Optional[torch.dtype]] = {"ortho": None, "ortho_right": None}
        super().__init__(rank, update_proj_gap, scale, proj_type, name)

    # ------------------------------------------------------------- the quantized basis
    def _get(self, key: str) -> Optional[Tensor]:
        qt = self._q[key]
        return None if qt is None else qt.dequantize(self._dtype[key])

    def _set(self, key: str, value: Optional[Tensor]) -> None:
        if value is None:
            self._q[key], self._dtype[key] = None, None
        else:
            self._q[key] = quantize_groupwise(value.detach().float(), self.proj_bits, self.proj_group_size)
            self._dtype[key] = value.dtype

    ortho = property(lambda self: self._get("ortho"), lambda self, v: self._set("ortho", v),
                     doc="The basis, dequantized from its stored INT4/INT8 form at every read.")
    ortho_right = property(lambda self: self._get("ortho_right"), lambda self, v: self._set("ortho_right", v),
                           doc="The right basis of proj_type 'full', dequantized at every read.")

    def needs_update(self, step: int) -> bool:
        return self._q["ortho"] is None or step % self.update_proj_gap == 0

    @property
    def quantized_basis(self) -> tuple[Optional[GroupQuantized], Optional[GroupQuantized]]:
        """The stored ``(ortho, ortho_right)`` as :class:`~mini.quant.groupwise.GroupQuantized`."""
        return self._q["ortho"], self._q["ortho_right"]

    @property
    def basis_nbytes(self) -> int:
        """Bytes of the stored basis (codes, scales, zero points)."""
        return sum(qt.nbytes for qt in self._q.values() if qt is not None)

    # ------------------------------------------------------------- lazy updates
    def _leading(self, ortho: Tensor) -> Tensor:
        return ortho[0, :] if self.side == "right" else ortho[:, 0]  # (n,) or (m,)

    def set_basis(self, ortho: Tensor, ortho_right: Tensor | None = None) -> None:
        """Install a basis; after a real SVD, queue the cosine of the leading vectors.

        ``|cos|`` with the dequantized previous basis (``cos_rule="abs"``) or the signed
        cosine with the previous SVD's float leading vector (``"signed"``, the official
        code). Then grow the gap T when the queue is full and its mean is at least the
        threshold.
        """
        previous = self.ortho if self.cos_rule == "abs" else None
        super().set_basis(ortho, ortho_right)
        if not getattr(self, "_in_svd", False):
            return
        a = self._leading(ortho).float()  # (n,) or (m,): the new float leading vector
        if self.cos_rule == "signed":
            b, self.past_leading = self.past_leading, a.clone()
            if b is None:
                return
            cos = float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-30))
        else:
            if previous is None:
                return
            b = self._leading(previous).float()
            cos = float((a @ b).abs() / (a.norm() * b.norm()).clamp_min(1e-30))
        self.queue.append(cos)
        if len(self.queue) > self.queue_size:
            self.queue.pop(0)
        full = len(self.queue) == self.queue_size
        stable = full and sum(self.queue) / self.queue_size >= self.cos_threshold
        if stable and self.gamma > 1:
            # T <- gamma T (at least +1, so the gap stays an integer that grows)
            grown = int(round(self.update_proj_gap * self.gamma))
            self.update_proj_gap = max(self.update_proj_gap + 1, grown)
            self.n_gap_increases += 1

    def update_basis(self, grad: Tensor) -> bool:
        self._in_svd = True  # cosines are taken for SVD bases only, not for the identity fallback
        try:
            return super().update_basis(grad)
        finally:
            self._in_svd = False

    # ------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain scalars only (``torch.load(weights_only=True)`` works); the basis
        is saved quantized."""
        state = super().state_dict()
        state.pop("ortho", None)
        state.pop("ortho_right", None)
        state.update(
            cos_threshold=self.cos_threshold,
            gamma=self.gamma,
            queue_size=self.queue_size,
            proj_bits=self.proj_bits,
            proj_group_size=self.proj_group_size,
            cos_rule=self.cos_rule,
            queue=list(self.queue),
            n_gap_increases=self.n_gap_increases,
        )
        for key in ("ortho", "ortho_right"):
            if self._q[key] is not None:
                state[key + "_q"] = _pack(self._q[key], self._dtype[key])
        if self.past_leading is not None:
            state["past_leading"] = self.past_leading
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (tensors are used as given: move them beforehand)."""
        base = {k: v for k, v in state.items() if k not in ("ortho_q", "ortho_right_q", "past_leading")}
        super().load_state_dict(base)
        self.cos_threshold = float(state["cos_threshold"])
        self.gamma = float(state["gamma"])
        self.queue_size = int(state["queue_size"])
        self.proj_bits = int(state["proj_bits"])
        self.proj_group_size = int(state["proj_group_size"])
        self.queue = [float(c) for c in state["queue"]]
        self.n_gap_increases = int(state.get("n_gap_increases", 0))
        self.cos_rule = check_adaptive_options(cos_rule=state.get("cos_rule", "abs"))["cos_rule"]
        self.past_leading = state.get("past_leading")
        for key in ("ortho", "ortho_right"):
            self._q[key], self._dtype[key] = _unpack(state.get(key + "_q"))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank={self.rank}, update_proj_gap={self.update_proj_gap}, "
                f"scale={self.scale}, proj_type={self.proj_type!r}, side={self.side!r}, n_svd={self.n_svd}, "
                f"proj_bits={self.proj_bits}, cos_rule={self.cos_rule!r}, queue={[round(c, 3) for c in self.queue]})")
