"""GaLoreAdamW8bit: GaLore with Adam moments stored block-wise quantized in 8 bits.

Part II, GaLore chapter (``book/galore/``). Zhao et al., "GaLore: Memory-Efficient LLM Training
by Gradient Low-Rank Projection", ICML 2024, arXiv 2403.03507 ("8-bit GaLore", the optimizer of
the paper's 7B pre-training runs: 18 GB vs 26 GB for 8-bit Adam), on top of Dettmers et al.,
"8-bit Optimizers via Block-wise Quantization", ICLR 2022, arXiv 2110.02861.

The update (one parameter, step t = 1, 2, …)
----------------------------------------------
As :class:`mini.galore.adamw.GaLoreAdamW` (projection R_t of the gradient for groups with
``"rank"``, the raw gradient otherwise), with the moments kept between steps as 8-bit codes and
one float32 absmax per block of ``block_size`` values (:mod:`mini.quant.blockwise`)::

    M, V   = deq(M̃_{t−1}; Q_signed), deq(Ṽ_{t−1}; Q_unsigned)  # float32, low-rank
    M      = β1 M + (1 − β1) R_t
    V      = β2 V + (1 − β2) R_t²
    N_t    = M / (√V / c2 + ε),    c1 = 1 − β1ᵗ,   c2 = √(1 − β2ᵗ)
    W_t    = W_{t−1} − (lr / c1) · α · project_back(N_t)   # projected groups
    W_t    = W_t − lr · λ · W_t                            # decoupled weight decay
    W_t    = W_{t−1}·(1 − lr·λ) − (lr / c1) · N_t          # plain groups (bitsandbytes)
    M̃_t, Ṽ_t = quant(M; Q_signed), quant(V; Q_unsigned)   # fresh absmax per block

The update uses the float32 moments of this step; only what is *stored* is quantized, as in
bitsandbytes. Q_signed / Q_unsigned are the dynamic maps of
:func:`mini.quant.blockwise.dynamic_map`: the first moment takes both signs, the second is
non-negative and spans many orders of magnitude, which a linear map would round to zero (see
:mod:`mini.quant.blockwise`). A tensor whose
(low-rank) moments have fewer than ``min_8bit_size`` elements keeps float32 moments, as
bitsandbytes does (its default 4096): the absmax overhead and the error are not worth it there.

Memory per moment of n values: n bytes + 4·ceil(n / block_size) bytes of absmax (1.016 bytes
per value at block 256) instead of 4 bytes; :meth:`GaLoreAdamW8bit.state_bytes` counts it all.

Differences from galore-torch 1.0 (``galore_torch/adamw8bit.py``) and bitsandbytes, and why
-------------------------------------------------------------------------------------------
- Runs on CPU and on GPU: galore-torch wraps bitsandbytes' ``Optimizer2State`` and calls
  ``torch.cuda.synchronize()`` every parameter step, which fails without CUDA. Here the
  quantization is :func:`mini.quant.blockwise.quantize_blockwise` (Triton on CUDA, PyTorch on CPU).
- The arithmetic is bitsandbytes' Adam (ε added to the bias-corrected √V, step lr / c1), which
  is what galore-torch's 8-bit optimizer runs; the float GaLoreAdamW uses the Hugging Face form
  ``lr·c2/c1 · M / (√V + ε)``. The two differ only in how ε is scaled (by c2 ≤ 1).
- Defaults are galore-torch's ``GaLoreAdamW8bit`` (= bitsandbytes ``AdamW8bit``): lr 1e-3,
  betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2, block 256, min_8bit_size 4096.
- Weight decay as galore-torch's 8-bit optimizer places it: after the update in projected
  groups, ``p·(1 − lr·λ)`` before the update in plain groups (bitsandbytes' AdamW8bit). The
  float GaLoreAdamW decays after the update everywhere; the difference is ``lr²·λ·|update|``.
- Nearest-code quantization is exact, as bitsandbytes' PyTorch implementation; its CPU library
  searches approximately (see :mod:`mini.quant.blockwise`). With bitsandbytes' CPU update made
  to quantize exactly, ``tests/test_galore8bit.py`` finds the same codes and trajectories within
  1e-6 of bitsandbytes' AdamW8bit (plain groups) and of galore-torch's GaLoreAdamW8bit run on
  CPU (projected groups, all four projection types); with the library as it is, 0.4% of the
  distance travelled, against 1.9% between bitsandbytes' own 8-bit and 32-bit AdamW.
- No percentile clipping, no max_unorm, no paged states, no stable-embedding special case.
- bfloat16 and float16 parameters: the moments are 8-bit (or float32 below ``min_8bit_size``)
  and the update is computed in float32, then rounded to the parameter's dtype *before* the
  back-projection, which runs in that dtype with the basis (stored in the gradient's dtype), as
  galore-torch's 8-bit optimizer does (bitsandbytes writes the low-rank update into a low-rank
  ``p.data`` of the parameter's dtype). ``tests/test_optim_mixed_precision.py`` runs it.
- ``project_moments=True`` works here too: the moments are dequantized, rotated into the new
  subspace (:meth:`~mini.galore.adamw.GaLoreAdamW.transfer_moments`) and requantized.
- ``state_dict()`` holds only tensors and plain values (codes uint8, absmax float32), so it loads
  with ``torch.load(weights_only=True)``; on load the codes stay uint8 and the absmax and
  small float32 moments stay float32 (torch's loader casts every state tensor to the
  parameter's dtype, which would turn codes into floats; bitsandbytes also overrides it).

Explained in :doc:`/labs/galore/memory_tables`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from mini.kernels.dispatch import BACKENDS
from mini.quant.blockwise import dequantize_blockwise, dynamic_map, quantize_blockwise

from .adamw import GaLoreAdamW
from .projector import GaLoreProjector

__all__ = ["BlockwiseMoments", "GaLoreAdamW8bit", "optimizer_state_bytes"]

_MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (state key, signed map?)
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")


class BlockwiseMoments:
    """Adam's two moments kept as 8-bit block-wise codes (bitsandbytes' layout and arithmetic).

    The storage and update shared by :class:`GaLoreAdamW8bit` and the per-layer INT8 path of
    Q-GaLore (:class:`~mini.qgalore.optimizer.Int8LayerwiseQGaLore`): a state dict holds
    ``exp_avg`` / ``exp_avg_sq`` as uint8 codes with float32 ``*_absmax`` per block, or float32
    moments when a tensor has fewer than ``min_8bit_size`` elements. Arguments as
    :class:`GaLoreAdamW8bit`'s.

    Explained in :doc:`/labs/galore/memory_tables`.
    """

    def __init__(self, block_size: int = 256, min_8bit_size: int = 4096, backend: str = "auto") -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be a non-negative integer, got {min_8bit_size!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        self.block_size = block_size
        self.min_8bit_size = min_8bit_size
        self.backend = backend
        self._codes: dict[tuple[bool, torch.device], Tensor] = {}

    def code(self, signed: bool, device: torch.device) -> Tensor:
        """The dynamic map (signed for M, unsigned for V) on ``device`` (cached)."""
        key = (signed, torch.device(device))
        if key not in self._codes:
            self._codes[key] = dynamic_map(signed).to(device)
        return self._codes[key]

    @staticmethod
    def is_8bit(state: dict[str, Any]) -> bool:
        """True when this parameter's moments are stored in 8 bits."""
        m = state.get("exp_avg")
        return isinstance(m, Tensor) and m.dtype == torch.uint8

    def load_moments(self, state: dict[str, Any]) -> dict[str, Tensor]:
        """The moments as float32 tensors (dequantized if 8-bit; the stored tensors otherwise)."""
        if not self.is_8bit(state):
            return {key: state[key] for key, _ in _MOMENTS}
        out = {}
        for key, signed in _MOMENTS:
            q = state[key]
            out[key] = dequantize_blockwise(
                q, state[key + "_absmax"], self.code(signed, q.device), self.block_size,
                backend=self.backend, validate=False,
            )  # (low-rank shape) float32
        return out

    def store_moments(self, state: dict[str, Any], moments: dict[str, Tensor]) -> None:
        """Requantize float32 moments into the state (fresh absmax per block); no-op for 32-bit states."""
        if not self.is_8bit(state):
            return
        for key, signed in _MOMENTS:
            x = moments[key].contiguous()
            quantize_blockwise(
                x, self.code(signed, x.device), self.block_size,
                out=(state[key], state[key + "_absmax"]), backend=self.backend, validate=False,
            )

    def init_moments(self, state: dict[str, Any], like: Tensor) -> None:
        """Zero moments in the shape of ``like``: 8-bit codes + absmax, or float32 if small."""
        if like.numel() >= self.min_8bit_size:
            nb = -(-like.numel() // self.block_size)
            for key, _ in _MOMENTS:
                state[key] = torch.zeros(like.shape, dtype=torch.uint8, device=like.device)  # codes
                state[key + "_absmax"] = torch.zeros(nb, dtype=torch.float32, device=like.device)  # 0 => value 0
        else:
            for key, _ in _MOMENTS:
                state[key] = torch.zeros(like.shape, dtype=torch.float32, device=like.device)

    def update_moments(
        self, state: dict[str, Any], grad: Tensor, betas: tuple[float, float], eps: float, step: int,
        correct_bias: bool = True,
    ) -> Tensor:
        """Dequantize, update the moments with ``grad`` at ``step`` (1, 2, …), requantize; return
        the float32 direction M / (√V / c2 + ε) (bitsandbytes' form; the step is lr / c1)."""
        beta1, beta2 = betas
        g = grad.float()
        moments = self.load_moments(state)
        m, v = moments["exp_avg"], moments["exp_avg_sq"]  # float32, low-rank shape
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        c2 = math.sqrt(1.0 - beta2**step) if correct_bias else 1.0
        if not self.is_8bit(state):  # m, v are the stored float32 moments: keep them
            return m / (v.sqrt() / c2 + eps)
        self.store_moments(state, moments)  # requantize first: v's and m's buffers are reused
        den = v.sqrt_().div_(c2).add_(eps)  # √V / c2 + ε, same ops as above
        return torch.div(m, den, out=m)  # (low-rank shape) float32


class GaLoreAdamW8bit(GaLoreAdamW, BlockwiseMoments):
    """GaLoreAdamW with 8-bit block-wise quantized Adam moments (bitsandbytes' Adam arithmetic).

    Explained in :doc:`/labs/galore/memory_tables`.

    Args:
        params: parameters or param groups; a group with ``"rank"`` (and ``"update_proj_gap"``,
            ``"scale"``, ``"proj_type"``) is projected, as in galore-torch.
        lr, betas, eps, weight_decay: Adam's hyperparameters (defaults of galore-torch's
            GaLoreAdamW8bit: 1e-3, (0.9, 0.999), 1e-8, 1e-2).
        correct_bias: bias-correct the moments (default True).
        project_moments: carry the moments into the new subspace at a switch (default False).
        block_size: values sharing one absmax (default 256, bitsandbytes' optimizer block).
        min_8bit_size: moments with fewer elements stay float32 (default 4096, bitsandbytes).
        backend: quantization backend, ``"auto"`` (Triton on CUDA, PyTorch on CPU),
            ``"triton"``, ``"interpret"`` or ``"reference"``.

    State per parameter: ``step``; 8-bit: ``exp_avg`` / ``exp_avg_sq`` uint8 codes (low-rank
    shape) and ``exp_avg_absmax`` / ``exp_avg_sq_absmax`` float32 (n_blocks,); or float32
    ``exp_avg`` / ``exp_avg_sq`` below ``min_8bit_size``; ``projector`` for projected groups.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        correct_bias: bool = True,
        project_moments: bool = False,
        block_size: int = 256,
        min_8bit_size: int = 4096,
        backend: str = "auto",
    ) -> None:
        BlockwiseMoments.__init__(self, block_size, min_8bit_size, backend)
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            project_moments=project_moments,
        )

    # ----------------------------------------------------------------------------- extension surface
    def init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any], grad: Tensor) -> None:
        """Moments in the (low-rank) shape of ``grad``: 8-bit codes + absmax, or float32 if small."""
        self.init_moments(state, grad)

    def adam_direction(self, p: Tensor, group: dict[str, Any], state: dict[str, Any], grad: Tensor) -> Tensor:
        """Dequantize, update the moments with ``grad``, requantize; return M / (√V / c2 + ε)."""
        return self.update_moments(state, grad, group["betas"], group["eps"], state["step"], group["correct_bias"])

    def step_size(self, group: dict[str, Any], step: int) -> float:
        """lr / (1 − β1ᵗ) (bitsandbytes' form: the second moment's correction sits in N)."""
        if not group["correct_bias"]:
            return group["lr"]
        return group["lr"] / (1.0 - group["betas"][0] ** step)

    def transfer_moments(
        self, state: dict[str, Any], projector: GaLoreProjector, old_basis: tuple[Tensor | None, Tensor | None]
    ) -> None:
        """Dequantize, rotate into the new subspace (as GaLoreAdamW), requantize."""
        if not self.is_8bit(state):
            super().transfer_moments(state, projector, old_basis)
            return
        moments = self.load_moments(state)
        super().transfer_moments(moments, projector, old_basis)
        self.store_moments(state, moments)

    # ----------------------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step: GaLoreAdamW's, with weight decay placed as galore-torch's 8-bit optimizer does.

        Projected groups: decay after the update (galore-torch). Plain groups: ``p ← p·(1 − lr·λ)``
        before the update (bitsandbytes' AdamW8bit, which galore-torch runs for them).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                grad, projector = self._prepare(p, group, state)  # shared with GaLoreAdamW
                direction = self.adam_direction(p, group, state, grad)  # float32, (low-rank) shape
                step_size = self.step_size(group, state["step"])
                if projector is not None:
                    # galore-torch's order: the low-rank update -η·N first, rounded to the
                    # parameter's dtype (bitsandbytes writes it into the low-rank p.data), then
                    # back to (m, n) in that dtype, with the basis
                    low = direction.mul_(-step_size).to(p.dtype)  # (low-rank shape)
                    p.add_(projector.project_back(low))  # scale included
                    if wd > 0.0:
                        p.add_(p, alpha=-lr * wd)
                else:
                    if wd > 0.0:
                        p.mul_(1.0 - lr * wd)
                    p.add_(direction.to(p.dtype), alpha=-step_size)
        return loss

    # ----------------------------------------------------------------------------- state
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, keeping the saved dtypes of codes, absmax and moments (torch casts every state tensor to the param dtype)."""
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        keep: dict[Any, dict[str, Tensor]] = {}
        for i in ids:
            st = state_dict["state"].get(i)
            if st:
                keep[i] = {k: v for k, v in st.items() if k in _STATE_KEYS and isinstance(v, Tensor)}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for key, value in keep.get(i, {}).items():  # torch cast them to p.dtype: uint8 codes too
                self.state[p][key] = value.to(device=p.device)

    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state now held, by kind (for the memory lab).

        Keys: ``moments_8bit`` (uint8 codes), ``absmax``, ``moments_32bit`` (float32 moments of
        small tensors), ``projector`` (bases), ``total``.
        """
        out = {"moments_8bit": 0, "absmax": 0, "moments_32bit": 0, "projector": 0}
        for state in self.state.values():
            for key, value in state.items():
                if not isinstance(value, Tensor):
                    continue
                nbytes = value.numel() * value.element_size()
                if key.endswith("_absmax"):
                    out["absmax"] += nbytes
                elif key in ("exp_avg", "exp_avg_sq"):
                    out["moments_8bit" if value.dtype == torch.uint8 else "moments_32bit"] += nbytes
            projector = state.get("projector")
            if isinstance(projector, GaLoreProjector):
                for t in projector.basis():
                    if t is not None:
                        out["projector"] += t.numel() * t.element_size()
        out["total"] = sum(out.values())
        return out


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (projector bases included; ``step`` counters excluded).

    Works for torch optimizers, :class:`~mini.galore.adamw.GaLoreAdamW` and
    :class:`GaLoreAdamW8bit`, so the memory lab compares them with one function.

    Explained in :doc:`/labs/galore/memory_tables`.
    """
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, Tensor) and key != "step":
                total += value.numel() * value.element_size()
            elif isinstance(value, GaLoreProjector):
                total += sum(t.numel() * t.element_size() for t in value.basis() if t is not None)
    return total
