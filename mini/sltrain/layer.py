"""The SLTrain layer: a linear map whose weight is a scaled low-rank product plus a fixed-support
sparse matrix, ``W = (α/r)·B A + S``, trained without ever storing W.

Part II, SLTrain chapter (``book/sltrain/``). Paper: Han, Li, Huang, Hong, Takeda, Jawanpuria,
Mishra, "SLTrain: a sparse plus low-rank approach for parameter and memory efficient
pretraining", NeurIPS 2024, arXiv 2406.02214; official code andyjm3/SLTrain (``SpLoRaLinear``
and its C++ autograd extension ``sparse_linear.cpp``).

The parametrisation (paper, eq. (2) with the official code's scale)::

    W = (α/r) · B A + S,     B ∈ R^{m×r}, A ∈ R^{r×n},  S supported on Ω, |Ω| = ⌊δ m n⌋

``m = out_features``, ``n = in_features``. Ω is drawn once, uniformly at random without
replacement, stored as ``index`` (flat row-major positions ``i·n + j``, sorted, int64, a
persistent buffer) and never trained; only its ``values`` are (paper, Section 3.2: "we fix the
support ... randomly"). Parameters per layer: ``r (m + n) + ⌊δ m n⌋`` (plus the bias).

Initialisation, as the official code: ``A`` Kaiming-uniform with ``a = √5``, i.e. U(±1/√n);
``B = 0`` (so ``W = S`` at step 0 and early training runs through ``S`` and ``A``); ``values``
U(±1/√n); ``bias`` U(±1/√m) (``nn.Linear`` uses 1/√n; the official code 1/√m). The draws are
made in the official order (bias, A, support, values) from one generator.

Forward and backward (the official extension's algebra; eqs. of the chapter)::

    forward:   W = (α/r) B A + S         (recomputed; not saved)
               y = x Wᵀ + b              x (..., n), y (..., m)
    backward:  W = (α/r) B A + S         (recomputed again)
               G_W = gᵀ x                (m × n, dense, transient); g = ∂L/∂y (..., m)
               ∂L/∂x = g W
               ∂L/∂B = G_W (α/r · A)ᵀ,  ∂L/∂A = (α/r) Bᵀ G_W
               ∂L/∂values = G_W[Ω]       (the dense gradient on the support)
               ∂L/∂b = Σ g

The saving is in the parameters, their gradients and optimizer states and the stored weights;
the dense ``G_W`` and ``W`` of one layer exist transiently. W is built by
:func:`mini.sltrain.kernel.sparse_lowrank_weight` and the gather is
:func:`mini.sltrain.kernel.gather_support` (Triton on CUDA, their PyTorch references on CPU).

Differences from the official code, and why:

- The support can be given (``support=`` a tensor of positions, e.g.
  :func:`top_magnitude_index` for the paper's Table 1 comparison), or drawn from a ``generator``
  / ``seed``; the official layer always draws from torch's global generator.
- The state dict saves the hyperparameters that change the function but no tensor shape
  records, α above all (``_extra_state``: α, r, sizes, nnz; :meth:`SparseLowRankLinear.get_extra_state`),
  and loading checks them: a checkpoint trained with another α is an error naming both values
  (the official code saves no α; loading α = 16 weights into an α = 32 layer changed outputs by
  up to 9.5, silently). A state dict saved before this has no ``_extra_state``: it loads with a
  warning that α is unchecked.
- Loading a state dict checks the support: a checkpoint whose ``index`` differs from the
  layer's is an error (the official loader silently takes it, which is right only if the values
  come with it, as they do), unless the support is adopted explicitly
  (:meth:`SparseLowRankLinear.from_state_dict`, ``load_state_dict(..., adopt_support=True)``,
  :func:`load_sltrain_state_dict`). So a resume that regenerates supports from the wrong seed
  fails loudly instead of training values on positions they were not learned for.
- ``density`` may be 1 (the official code requires ``sp_ratio < 1``); ``lora_dropout`` (accepted
  and ignored upstream) and the optional tanh-trainable scaling are not provided.
- W is built in one kernel with the sparse entries added in registers (see
  :mod:`mini.sltrain.kernel`), not a matmul followed by a scatter-add.

Explained in :doc:`/book/sltrain/theory`.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from mini.kernels.dispatch import BACKENDS, current_backend, resolve_backend
from mini.runtime import autocast_dtype
from mini.lm.lowrank import best_rank_approximation, check_features, check_rank_for
from mini.sltrain.kernel import (
    KERNEL_DTYPES,
    gather_support,
    sparse_lowrank_weight,
    tile_offsets,
)

__all__ = [
    "SparseLowRankLinear",
    "sparse_lowrank_linear",
    "n_nonzeros",
    "random_support",
    "top_magnitude_index",
    "check_support",
    "load_sltrain_state_dict",
]


# ---------------------------------------------------------------------------------------------
# The support
# ---------------------------------------------------------------------------------------------
def _check_density(density: Any) -> float:
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 < density <= 1:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    return float(density)


def n_nonzeros(density: float, out_features: int, in_features: int) -> int:
    """``⌊density · out · in⌋``, the support size (the official ``int(sp_ratio · m · n)``).

    A density that gives no non-zero at all is an error (raise it, or use a low-rank layer).

    Explained in :doc:`/book/sltrain/theory`.
    """
    density = _check_density(density)
    n_in, n_out = check_features(in_features, out_features)
    nnz = int(density * n_out * n_in)
    if nnz < 1:
        raise ValueError(
            f"density {density!r} gives no non-zero in a {n_out} x {n_in} weight "
            f"(floor(density * {n_out * n_in}) = 0); use density >= {1 / (n_out * n_in):.3g}"
        )
    return nnz


def random_support(out_features: int, in_features: int, density: float,
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """``⌊δ m n⌋`` flat positions drawn uniformly without replacement, sorted, int64, on CPU.

    As the official code: ``torch.randperm(m·n)[:nnz]``, sorted (from ``generator``, else torch's
    global generator).

    Explained in :doc:`/labs/sltrain/support`.
    """
    nnz = n_nonzeros(density, out_features, in_features)
    perm = torch.randperm(int(out_features) * int(in_features), generator=generator)
    return torch.sort(perm[:nnz]).values  # (nnz,)


def check_support(index: Any, out_features: int, in_features: int, *, name: str = "support") -> Tensor:
    """``index`` as a sorted, distinct, in-range 1-D int64 tensor, or a ValueError naming ``name``.

    Explained in :doc:`/book/sltrain/theory`.
    """
    if not isinstance(index, Tensor):
        raise TypeError(f"{name} must be 'random' or a 1-D integer tensor of positions, got {type(index).__name__}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer positions, got dtype {index.dtype}")
    if index.dim() != 1 or index.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor of flat positions, got shape {tuple(index.shape)}")
    index = index.to(torch.int64)
    size = int(out_features) * int(in_features)
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= size:
        raise ValueError(f"{name} positions must lie in [0, {size}) for a {out_features} x {in_features} "
                         f"weight, got values in [{lo}, {hi}]")
    if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
        raise ValueError(f"{name} must be sorted ascending with distinct positions "
                         "(torch.unique(support) sorts and deduplicates)")
    return index


@torch.no_grad()
def top_magnitude_index(weight: Tensor, density: float, rank: Optional[int] = None) -> Tensor:
    """The flat positions of the ``⌊δ m n⌋`` largest ``|entries|`` of ``weight``, sorted, int64.

    With ``rank``, of the residual ``weight - (best rank-r approximation)`` (truncated SVD): the
    support a sparse factor would pick to capture what ``rank`` singular directions miss (paper,
    Fig. 2 and Table 1, "top" support against random). Ties are broken by ``torch.topk``.

    Explained in :doc:`/book/sltrain/theory`.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    m, n = weight.shape
    nnz = n_nonzeros(density, m, n)
    w = weight.detach().double()
    if rank is not None:
        w = w - best_rank_approximation(w, rank)  # residual of the best rank-r approximation
    top = torch.topk(w.abs().reshape(-1), nnz, sorted=False).indices
    return torch.sort(top).values.to(device=weight.device)  # (nnz,)


# ---------------------------------------------------------------------------------------------
# The autograd function
# ---------------------------------------------------------------------------------------------
def _concrete_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend of the layer's ops; an ``"auto"`` choice falls back to the reference for dtypes
    the kernels do not take (float64), while a forced kernel backend keeps its dtype error."""
    concrete = resolve_backend(backend, device)
    if concrete != "reference" and dtype not in KERNEL_DTYPES and backend == "auto" and current_backend() == "auto":
        return "reference"
    return concrete


class _SparseLowRankFn(torch.autograd.Function):
    """``y = x Wᵀ + b`` with ``W = scale·B A + S``; saves the factors, not W."""

    @staticmethod
    def forward(ctx, x, A, B, values, index, bias, scale, backend, offsets):
        W = sparse_lowrank_weight(B, A, values, index, scale, tile_offsets=offsets, backend=backend)  # (m, n)
        y = x.matmul(W.t())  # (..., m)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x, A, B, values, index)
        ctx.scale, ctx.backend, ctx.offsets, ctx.has_bias = scale, backend, offsets, bias is not None
        return y

    @staticmethod
    def backward(ctx, g):  # g (..., m)
        x, A, B, values, index = ctx.saved_tensors
        need_x, need_A, need_B, need_v = ctx.needs_input_grad[:4]
        need_bias = ctx.has_bias and ctx.needs_input_grad[5]
        scale, backend = ctx.scale, ctx.backend
        g2 = g.reshape(-1, g.shape[-1])  # (T, m)
        gx = gA = gB = gv = gb = None
        if need_x:
            W = sparse_lowrank_weight(
                B, A, values, index, scale, tile_offsets=ctx.offsets, backend=backend
            )
            gx = g2.matmul(W).view(*g.shape[:-1], W.shape[1])  # (..., n)
            del W
        if need_A or need_B or need_v:
            x2 = x.reshape(-1, x.shape[-1])  # (T, n)
            GW = g2.t().matmul(x2)  # (m, n), transient
            if need_B:
                gB = GW.matmul(A.t()).mul_(scale)  # (m, r)
            if need_A:
                gA = B.t().matmul(GW).mul_(scale)  # (r, n)
            if need_v:
                gv = gather_support(GW.contiguous(), index, backend=backend)  # (nnz,)
            del GW
        if need_bias:
            gb = g2.sum(0)
        return gx, gA, gB, gv, None, gb, None, None, None


def _check_input(x: Any, A: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != A.shape[-1]:
        raise ValueError(f"x must have shape (..., {A.shape[-1]}) (in_features), got {tuple(x.shape)}")
    if x.dtype != A.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the layer's parameters are {A.dtype}; "
                        f"cast one of them (x.to({A.dtype}) or layer.to({x.dtype}))")
    if x.device != A.device:
        raise ValueError(f"x is on {x.device} but the layer's parameters are on {A.device}")


def sparse_lowrank_linear(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    values: Tensor,
    index: Tensor,
    bias: Optional[Tensor] = None,
    scale: float = 1.0,
    *,
    backend: str = "auto",
    tile_offsets: Optional[Tensor] = None,
) -> Tensor:
    """``x (scale·B A + S)ᵀ + bias`` with the hand-written backward of the module docstring.

    ``x`` (..., in); ``A`` (r, in); ``B`` (out, r); ``values`` (nnz,) and ``index`` (nnz,) int64
    sorted; ``bias`` (out,) or None; all on one device and (but ``index``) of one dtype.
    ``backend`` picks the ops' backend (``"auto"``: Triton on CUDA for float32/16/bf16, the
    PyTorch reference otherwise); ``tile_offsets`` is the kernel's cached run table.

    Explained in :doc:`/book/sltrain/theory`.
    """
    _check_input(x, A)
    concrete = _concrete_backend(backend, x.device, x.dtype)
    if concrete == "reference":
        tile_offsets = None
    return _SparseLowRankFn.apply(x, A, B, values, index, bias, float(scale), concrete, tile_offsets)


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------
_HPARAMS_VERSION = 1
_HPARAM_NAMES = ("version", "alpha", "rank", "in_features", "out_features", "nnz")


def _read_hparams(saved: Any, key: str) -> dict[str, Any]:
    """The hyperparameters a :meth:`SparseLowRankLinear.get_extra_state` tensor holds, checked."""
    if not isinstance(saved, Tensor) or saved.dim() != 1 or saved.numel() != len(_HPARAM_NAMES):
        raise ValueError(f"cannot load {key}: expected the SLTrain layer's hyperparameters, a 1-D tensor "
                         f"{list(_HPARAM_NAMES)}, got {type(saved).__name__} "
                         f"{tuple(saved.shape) if isinstance(saved, Tensor) else ''}")
    values = [float(v) for v in saved.double().tolist()]
    if values[0] != _HPARAMS_VERSION:
        raise ValueError(f"cannot load {key}: hyperparameter format {values[0]:g}, this mini reads "
                         f"{_HPARAMS_VERSION}")
    out: dict[str, Any] = dict(zip(_HPARAM_NAMES, values))
    for name in ("rank", "in_features", "out_features", "nnz"):
        out[name] = int(out[name])
    return out


class SparseLowRankLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W = (α/r)·B A + S`` and S on a fixed support (SLTrain).

    Explained in :doc:`/book/sltrain/theory`.

    Args:
        in_features, out_features: the weight is (out_features × in_features).
        rank: r, in ``[1, min(in_features, out_features)]``.
        density: δ in (0, 1]; the support holds ``⌊δ·out·in⌋`` entries. With a tensor
            ``support`` it may be None (the tensor's length decides).
        alpha: α; the low-rank product is scaled by ``alpha / rank`` (official default 32 at 60M).
        bias: whether to add a trained bias.
        support: ``"random"`` (drawn uniformly without replacement) or a 1-D tensor of sorted
            distinct flat positions (e.g. :func:`top_magnitude_index`).
        generator, seed: where the random draws (initialisation and support) come from: a CPU
            ``torch.Generator``, or a seed for a fresh one; default torch's global generator.
        device, dtype: of the parameters (the index is always int64).
        backend: the kernels' backend, ``"auto"`` (Triton on CUDA, reference on CPU),
            ``"triton"``, ``"interpret"`` or ``"reference"``; an attribute, may be changed later.

    Parameters ``A`` (r × in), ``B`` (out × r), ``values`` (nnz,), ``bias`` (out,); buffer
    ``index`` (nnz,) int64, saved in the state dict. See the module docstring for the equations.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        density: Optional[float] = 0.03,
        alpha: float = 32.0,
        bias: bool = True,
        *,
        support: str | Tensor = "random",
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
        device: torch.device | str | None = None,
        dtype: Optional[torch.dtype] = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = check_features(in_features, out_features)
        self.rank = check_rank_for(rank, self.in_features, self.out_features)
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha == 0:
            raise ValueError(f"alpha must be a finite non-zero number, got {alpha!r}")
        self.alpha = float(alpha)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        if generator is not None and seed is not None:
            raise ValueError("give generator or seed, not both")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
                raise ValueError(f"seed must be an integer, got {seed!r}")
            generator = torch.Generator().manual_seed(int(seed))
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if isinstance(support, str):
            if support != "random":
                raise ValueError(f"support must be 'random' or a tensor of positions, got {support!r}")
            self.density = _check_density(density)
            nnz = n_nonzeros(self.density, self.out_features, self.in_features)
        else:
            index = check_support(support, self.out_features, self.in_features)
            nnz = index.numel()
            if density is None:
                self.density = nnz / (self.out_features * self.in_features)
            else:
                self.density = _check_density(density)
                want = n_nonzeros(self.density, self.out_features, self.in_features)
                if want != nnz:
                    raise ValueError(f"support holds {nnz} positions but density {density!r} asks for {want} "
                                     f"(floor(density * {self.out_features} * {self.in_features})); "
                                     "pass density=None to take the support's size")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        if not isinstance(backend, str) or backend not in BACKENDS:  # fail here, not at the first forward
            raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(map(repr, BACKENDS))}")
        self.backend = backend
        self.A = nn.Parameter(torch.empty(self.rank, self.in_features, device=device, dtype=dtype))  # (r, n)
        self.B = nn.Parameter(torch.empty(self.out_features, self.rank, device=device, dtype=dtype))  # (m, r)
        self.values = nn.Parameter(torch.empty(nnz, device=device, dtype=dtype))  # (nnz,)
        self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("index", torch.empty(nnz, device=device, dtype=torch.int64))  # (nnz,)
        self._offsets_cache: Optional[tuple[tuple[Any, ...], Tensor]] = None
        self._adopt_support = False
        self._init_parameters(generator, None if isinstance(support, str) else index)

    # -- initialisation -----------------------------------------------------------------------
    @torch.no_grad()
    def _init_parameters(self, generator: Optional[torch.Generator], index: Optional[Tensor]) -> None:
        """The official draws, in the official order (bias, A, support, values), on CPU."""
        n, m = self.in_features, self.out_features
        if self.bias is not None:
            self.bias.copy_(torch.empty(m).uniform_(-1 / math.sqrt(m), 1 / math.sqrt(m), generator=generator))
        a = torch.empty(self.rank, n)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # U(±1/√n)
        self.A.copy_(a)
        self.B.zero_()
        if index is None:
            index = random_support(m, n, self.density, generator=generator)
        self.index.copy_(index)
        self.values.copy_(torch.empty(self.values.numel()).uniform_(-1 / math.sqrt(n), 1 / math.sqrt(n),
                                                                    generator=generator))

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor of the low-rank product."""
        return self.alpha / self.rank

    @property
    def nnz(self) -> int:
        """Number of non-zeros of S (the support's size)."""
        return self.index.numel()

    # -- weights ------------------------------------------------------------------------------
    def low_rank_weight(self) -> Tensor:
        """``(α/r)·B A`` (out × in), differentiable."""
        return (self.B @ self.A) * self.scale

    def sparse_weight(self) -> Tensor:
        """``S`` as a dense (out × in) tensor, differentiable in ``values``."""
        s = torch.zeros(self.out_features * self.in_features, device=self.values.device, dtype=self.values.dtype)
        return s.index_add(0, self.index, self.values).view(self.out_features, self.in_features)

    def dense_weight(self) -> Tensor:
        """The weight ``W = (α/r)·B A + S`` (out × in) this layer applies, built with autograd ops
        (differentiable: the dense reference the tests compare the hand-written backward with)."""
        return self.low_rank_weight() + self.sparse_weight()

    def _tile_offsets(self) -> Tensor:
        key = (self.index.device, self.index.data_ptr(), self.index._version, self.index.numel())
        if self._offsets_cache is None or self._offsets_cache[0] != key:
            self._offsets_cache = (key, tile_offsets(self.index, self.out_features, self.in_features))
        return self._offsets_cache[1]

    def forward(self, x: Tensor) -> Tensor:  # x (..., in) -> (..., out)
        """``y = x Wᵀ + b``; W is built by the kernel (or its reference) and never stored.

        Under ``torch.autocast`` the layer computes as ``nn.Linear`` does: input, factors, values
        and bias are cast to autocast's dtype (differentiably, so the parameters' gradients come
        back in their own dtype) and the output has that dtype.
        """
        A, B, values, bias = self.A, self.B, self.values, self.bias
        dtype = autocast_dtype(x)
        if dtype is not None:
            x, A, B, values = x.to(dtype), A.to(dtype), B.to(dtype), values.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            with torch.autocast(x.device.type, enabled=False):  # the ops below run in `dtype`
                return self._linear(x, A, B, values, bias)
        return self._linear(x, A, B, values, bias)

    def _linear(self, x: Tensor, A: Tensor, B: Tensor, values: Tensor, bias: Optional[Tensor]) -> Tensor:
        _check_input(x, A)
        concrete = _concrete_backend(self.backend, x.device, x.dtype)
        offsets = self._tile_offsets() if concrete != "reference" else None
        return sparse_lowrank_linear(x, A, B, values, self.index, bias, self.scale,
                                     backend=concrete, tile_offsets=offsets)

    # -- checkpoints --------------------------------------------------------------------------
    def get_extra_state(self) -> Tensor:
        """The hyperparameters that change the function, saved in the state dict (``_extra_state``).

        A float64 tensor ``[version, alpha, rank, in_features, out_features, nnz]`` (a tensor, so
        the state dict stays loadable with ``torch.load(weights_only=True)`` and savable as
        safetensors; float64 holds α and the sizes exactly). The factors' and values' shapes fix
        rank, sizes and nnz; α is only here.
        """
        return torch.tensor([_HPARAMS_VERSION, self.alpha, self.rank, self.in_features, self.out_features,
                             self.nnz], dtype=torch.float64)

    def set_extra_state(self, state: Any) -> None:
        """Checked in ``_load_from_state_dict`` before anything is loaded (see :meth:`get_extra_state`)."""

    def _check_hparams(self, saved: Any, key: str, index: Optional[Tensor]) -> None:
        """Raise, before anything is loaded, when the checkpoint's hyperparameters differ from the layer's."""
        hp = _read_hparams(saved, key)
        if hp["alpha"] != self.alpha:
            raise ValueError(
                f"cannot load {key}: the checkpoint was trained with alpha={hp['alpha']:g} (low-rank product "
                f"scaled by alpha/rank = {hp['alpha'] / hp['rank']:g}), this layer has alpha={self.alpha:g} "
                f"(scale {self.scale:g}): the same weights would compute a different function. Build the layer "
                f"with alpha={hp['alpha']:g}, or SparseLowRankLinear.from_state_dict(state) (which reads alpha "
                "from the checkpoint)"
            )
        for name in ("rank", "in_features", "out_features"):
            if hp[name] != getattr(self, name):
                raise ValueError(f"cannot load {key}: the checkpoint has {name}={hp[name]}, this layer "
                                 f"{name}={getattr(self, name)}")
        if index is not None and hp["nnz"] != index.numel():
            raise ValueError(f"cannot load {key}: it records {hp['nnz']} support positions, the checkpoint's "
                             f"index holds {index.numel()}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        shapes = {"A": (self.rank, self.in_features), "B": (self.out_features, self.rank)}
        if self.bias is not None:
            shapes["bias"] = (self.out_features,)
        for name, want in shapes.items():
            key = prefix + name
            if key in state_dict and tuple(state_dict[key].shape) != want:
                raise ValueError(
                    f"cannot load {key}: the checkpoint has shape {tuple(state_dict[key].shape)}, the layer "
                    f"{want} (in_features={self.in_features}, out_features={self.out_features}, rank={self.rank})"
                )
        ikey, vkey = prefix + "index", prefix + "values"
        hkey = prefix + "_extra_state"
        if hkey in state_dict:  # α (and the sizes) before anything is loaded or adopted
            index = state_dict.get(ikey)
            self._check_hparams(state_dict[hkey], hkey, index if isinstance(index, Tensor) else None)
        if ikey in state_dict:
            theirs = state_dict[ikey]
            if not isinstance(theirs, Tensor) or theirs.dtype.is_floating_point or theirs.dim() != 1:
                raise ValueError(f"cannot load {ikey}: expected a 1-D integer tensor of positions")
            if vkey in state_dict and tuple(state_dict[vkey].shape) != tuple(theirs.shape):
                raise ValueError(f"cannot load {vkey}: the checkpoint has {tuple(state_dict[vkey].shape)} "
                                 f"values for {theirs.numel()} support positions")
            same = theirs.numel() == self.index.numel() and torch.equal(
                theirs.to(device=self.index.device, dtype=torch.int64), self.index)
            if not same:
                if not self._adopt_support:
                    if theirs.numel() != self.index.numel():
                        what = f"it holds {theirs.numel()} positions, the layer {self.index.numel()}"
                    else:
                        differ = int((theirs.to(device=self.index.device, dtype=torch.int64) != self.index).sum())
                        what = f"{differ} of {self.index.numel()} positions differ"
                    raise ValueError(
                        f"cannot load {ikey}: the checkpoint's sparse support does not match the layer's "
                        f"({what}). Build the layer with the seed the checkpoint was trained with, or adopt "
                        "the checkpoint's support: SparseLowRankLinear.from_state_dict(...), "
                        "layer.load_state_dict(..., adopt_support=True) or "
                        "mini.sltrain.load_sltrain_state_dict(model, ..., adopt_support=True)"
                    )
                index = check_support(theirs, self.out_features, self.in_features, name=ikey)
                with torch.no_grad():
                    self.index = index.to(self.index.device)
                    if index.numel() != self.values.numel():
                        self.values = nn.Parameter(self.values.new_empty(index.numel()))
                    self.density = index.numel() / (self.out_features * self.in_features)
                self._offsets_cache = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if hkey not in state_dict and hkey in missing_keys and any(k.startswith(prefix) for k in state_dict):
            # a checkpoint written before the hyperparameters were saved: load it, but say α is unchecked
            missing_keys.remove(hkey)
            warnings.warn(f"{prefix or 'the state dict'}: no saved hyperparameters ({hkey}); alpha cannot be "
                          f"checked (this layer uses alpha={self.alpha:g})", stacklevel=4)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False,
                        *, adopt_support: bool = False):
        """``nn.Module.load_state_dict``; with ``adopt_support`` a checkpoint whose support differs
        from the layer's replaces it (``values`` is re-created when its size changes: build the
        optimizer after loading). Without it a different support is a ValueError."""
        self._adopt_support = bool(adopt_support)
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            self._adopt_support = False

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor], alpha: Optional[float] = None, *, prefix: str = "",
                        backend: str = "auto") -> "SparseLowRankLinear":
        """A layer rebuilt from a state dict, its support adopted: shapes from ``A`` and ``B``,
        the support from ``index``, a bias if the state has one, ``alpha`` from the saved
        hyperparameters (``_extra_state``). Passing ``alpha`` checks it against them; a state dict
        saved before they were (no ``_extra_state``) needs ``alpha``."""
        try:
            A, B, index = state_dict[prefix + "A"], state_dict[prefix + "B"], state_dict[prefix + "index"]
        except KeyError as e:
            raise ValueError(f"state_dict lacks {e.args[0]!r}: not a SparseLowRankLinear state "
                             f"(keys: {sorted(state_dict)[:8]})") from None
        hkey = prefix + "_extra_state"
        if alpha is None:
            if hkey not in state_dict:
                raise ValueError(f"state_dict has no saved hyperparameters ({hkey!r}): pass the alpha the "
                                 "checkpoint was trained with, from_state_dict(state, alpha=...)")
            alpha = _read_hparams(state_dict[hkey], hkey)["alpha"]
        rank, n = A.shape
        m = B.shape[0]
        layer = cls(n, m, rank, density=None, alpha=alpha, bias=prefix + "bias" in state_dict,
                    support=index.cpu(), device=A.device, dtype=A.dtype, backend=backend)
        sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        layer.load_state_dict(sub)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"density={self.density:.4g}, nnz={self.nnz}, alpha={self.alpha:g}, "
                f"bias={self.bias is not None}")


def load_sltrain_state_dict(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True,
                            adopt_support: bool = False):
    """``model.load_state_dict(state_dict, strict)``; with ``adopt_support`` every
    :class:`SparseLowRankLinear` of the model takes the checkpoint's support instead of raising
    on a mismatch (resume without the conversion seed). Build the optimizer afterwards.

    Explained in :doc:`/book/sltrain/theory`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, SparseLowRankLinear)]
    for m in layers:
        m._adopt_support = bool(adopt_support)
    try:
        return model.load_state_dict(state_dict, strict=strict)
    finally:
        for m in layers:
            m._adopt_support = False
