"""Replacing a model's linear layers: the low-rank baseline W = B A, LoRA, and the converter.

Used by Part II: the GaLore chapter's pretraining lab (``labs/galore/pretraining.ipynb``) compares
GaLore with a low-rank factorized model and LoRA, as Zhao et al. (GaLore, arXiv 2403.03507,
Table 2) do; :mod:`mini.sltrain` replaces the same layers with its sparse-plus-low-rank layer
through :func:`replace_linears`.

- :class:`LowRankLinear`: ``y = x Aᵀ Bᵀ + b`` with ``A`` (r × in) and ``B`` (out × r), both
  trained from a random start: the "Low-Rank" row of the GaLore paper's Table 2 (the model
  can never leave the rank-r manifold, which is why it trails full-rank training).
- :func:`replace_linears`: every ``nn.Linear`` whose qualified name matches a pattern is
  replaced by ``factory(name, linear)``; the parameter counts before and after are reported.
  By default the patterns are the attention and MLP projections
  (:data:`~mini.lm.config.PROJECTED_MODULES`); embeddings and the head stay dense.
- :func:`apply_lora`: LoRA adapters (Hu et al., arXiv 2106.09685) through the official ``peft``
  library on the same projections; in the pretraining comparison the embeddings, norms and
  head stay trainable, as in the GaLore paper's LoRA baseline.

Explained in :doc:`/labs/galore/pretraining`.
"""
from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mini.lm.config import PROJECTED_MODULES

__all__ = [
    "LowRankLinear",
    "ConversionReport",
    "replace_linears",
    "to_low_rank",
    "apply_lora",
    "best_rank_approximation",
    "check_features",
    "check_rank_for",
    "DEFAULT_PATTERNS",
]

#: Qualified-name patterns (regular expressions, ``re.search``) of the layers converted by default:
#: the attention and MLP projections of a Llama (``...self_attn.q_proj``, ``...mlp.down_proj``).
DEFAULT_PATTERNS: tuple[str, ...] = tuple(rf"\.{m}$" for m in PROJECTED_MODULES)


def check_rank_for(rank: Any, in_features: int, out_features: int, *, name: str = "rank") -> int:
    """``rank`` as an int in ``[1, min(in_features, out_features)]``, or a ValueError naming it.

    Explained in :doc:`/labs/galore/pretraining`.
    """
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise ValueError(f"{name} must be a positive integer, got {rank!r}")
    limit = min(int(in_features), int(out_features))
    if not 1 <= int(rank) <= limit:
        raise ValueError(
            f"{name} must be in [1, min(in_features, out_features)] = [1, {limit}] for a "
            f"{out_features} x {in_features} weight, got {rank!r}"
        )
    return int(rank)


def check_features(in_features: Any, out_features: Any) -> tuple[int, int]:
    """``(in_features, out_features)`` as ints, or a ValueError naming the one that is not positive.

    Explained in :doc:`/labs/galore/pretraining`.
    """
    for n, v in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{n} must be a positive integer, got {v!r}")
    return int(in_features), int(out_features)


def best_rank_approximation(weight: Tensor, rank: int) -> Tensor:
    """``[W]_r``, the best rank-``rank`` approximation of a 2-D ``weight`` (truncated SVD, float64).

    Eckart-Young: ``U_r diag(s_r) V_rᵀ`` minimises ``‖W − X‖_F`` over rank-``r`` matrices ``X``;
    ``weight − [W]_r`` is what ``r`` singular directions miss.

    Explained in :doc:`/labs/sltrain/support`.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    m, n = weight.shape
    r = check_rank_for(rank, n, m)
    U, s, Vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)  # (m, k), (k,), (k, n)
    return (U[:, :r] * s[:r]) @ Vh[:r]  # (m, n)


class LowRankLinear(nn.Module):
    """``y = x (B A)ᵀ + b``: a linear layer whose weight is a product of two trained factors.

    ``A`` (rank × in) and ``B`` (out × rank) start as ``nn.Linear``'s default init of each factor
    (U(±1/√in) and U(±1/√rank)), so the product is random but not zero: the baseline trains both.
    Its entries then have variance ``1/(9·in)``, a third of a default ``nn.Linear``'s.
    ``device`` and ``dtype`` place the parameters, as for ``nn.Linear``.

    Explained in :doc:`/labs/galore/pretraining`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = check_features(in_features, out_features)
        self.rank = check_rank_for(rank, self.in_features, self.out_features)
        kw = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(self.rank, self.in_features, **kw))  # (r, in)
        self.B = nn.Parameter(torch.empty(self.out_features, self.rank, **kw))  # (out, r)
        self.bias = nn.Parameter(torch.empty(self.out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform init: ``A`` in ±1/√in, ``B`` in ±1/√r, the bias in ±1/√in."""
        nn.init.uniform_(self.A, -1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))
        nn.init.uniform_(self.B, -1 / math.sqrt(self.rank), 1 / math.sqrt(self.rank))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def dense_weight(self) -> Tensor:
        """The weight ``B A`` (out × in) this layer applies."""
        return self.B @ self.A

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        """``x Aᵀ Bᵀ + b``, two thin matrix products (the dense ``B A`` is never formed)."""
        h = x @ self.A.t()  # (..., r)
        y = h @ self.B.t()  # (..., out)
        return y if self.bias is None else y + self.bias.to(y.dtype)  # autocast: y's dtype

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


@dataclass
class ConversionReport:
    """What :func:`replace_linears` did: the replaced names and the parameter counts.

    Explained in :doc:`/labs/galore/pretraining`.
    """

    replaced: list[str] = field(default_factory=list)  #: qualified names, in model order
    params_before: int = 0  #: all parameters of the model before
    params_after: int = 0  #: all parameters after (buffers such as a sparse index not counted)

    @property
    def ratio(self) -> float:
        """``params_after / params_before``."""
        return self.params_after / self.params_before

    def __str__(self) -> str:
        return (f"replaced {len(self.replaced)} linear layers; parameters "
                f"{self.params_before:,} -> {self.params_after:,} ({self.ratio:.1%})")


def _compile(patterns: str | Sequence[str]) -> list[re.Pattern[str]]:
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, Sequence) or len(patterns) == 0:
        raise ValueError(f"patterns must be a non-empty sequence of regular expressions, got {patterns!r}")
    out = []
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"patterns must hold strings, got {type(p).__name__}")
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"patterns holds an invalid regular expression {p!r}: {e}") from None
    return out


def replace_linears(
    model: nn.Module,
    factory: Callable[[str, nn.Linear], nn.Module],
    patterns: str | Sequence[str] = DEFAULT_PATTERNS,
) -> ConversionReport:
    """Replace, in place, every ``nn.Linear`` whose qualified name matches one of ``patterns``.

    ``factory(name, linear)`` builds the new module (it may copy from ``linear``). Patterns are
    regular expressions searched in the qualified module name. A pattern list that matches no
    ``nn.Linear`` of the model is an error listing some of the model's linear names.

    Explained in :doc:`/labs/galore/pretraining`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    regexes = _compile(patterns)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    targets = [(n, m) for n, m in linears if any(r.search(n) for r in regexes)]
    if not targets:
        names = [n for n, _ in linears]
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(
            f"patterns {list(patterns) if not isinstance(patterns, str) else [patterns]} match no "
            f"nn.Linear of the model; its linear layers are: {shown or 'none'}"
        )
    report = ConversionReport(params_before=sum(p.numel() for p in model.parameters()))
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = factory(name, lin)
        if not isinstance(new, nn.Module):
            raise TypeError(f"factory must return an nn.Module, got {type(new).__name__} for {name}")
        new.to(device=lin.weight.device)
        setattr(parent, child, new)
        report.replaced.append(name)
    report.params_after = sum(p.numel() for p in model.parameters())
    return report


def to_low_rank(
    model: nn.Module, rank: int, patterns: str | Sequence[str] = DEFAULT_PATTERNS, seed: int = 0
) -> ConversionReport:
    """Replace the matching linears by :class:`LowRankLinear` of ``rank`` (capped per layer at
    ``min(in, out)``), initialised from ``seed``; the GaLore paper's low-rank baseline.

    The factors are drawn on the CPU and then moved to the model's device, so a seed gives the
    same factors on every device (as :func:`~mini.lm.config.build_model` does).

    Explained in :doc:`/labs/galore/pretraining`.
    """
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")

    def factory(name: str, lin: nn.Linear) -> nn.Module:
        r = min(int(rank), lin.in_features, lin.out_features)
        return LowRankLinear(lin.in_features, lin.out_features, r, bias=lin.bias is not None,
                             dtype=lin.weight.dtype)  # on the CPU; replace_linears moves it

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return replace_linears(model, factory, patterns)


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    target_modules: Sequence[str] = PROJECTED_MODULES,
    train_other: bool = True,
    dropout: float = 0.0,
) -> nn.Module:
    """LoRA adapters of ``rank`` on ``target_modules`` through ``peft``; returns the peft model.

    ``alpha`` defaults to ``2 * rank`` (scale α/r = 2). With ``train_other`` the embeddings,
    norms and head stay trainable (the GaLore paper's LoRA pretraining baseline); without it
    only the adapters train (fine-tuning). The base projection weights are frozen either way.
    A name in ``target_modules`` that is no ``nn.Linear`` of the model is an error.

    Explained in :doc:`/labs/galore/pretraining`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0):
        raise ValueError(f"alpha must be a positive number or None (2 * rank), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if isinstance(target_modules, str) or not all(isinstance(t, str) and t for t in target_modules):
        raise TypeError(f"target_modules must be a sequence of module names, got {target_modules!r}")
    names = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in target_modules if t not in names]
    if missing:
        raise ValueError(
            f"target_modules {missing} name no nn.Linear of the model; its linear module names are "
            f"{sorted(names)}"
        )
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - peft is pinned in requirements.txt
        raise ImportError("apply_lora needs the peft package: pip install peft") from e
    cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else 2 * rank),
                     target_modules=list(target_modules), lora_dropout=float(dropout), bias="none")
    peft_model = get_peft_model(model, cfg)
    if train_other:
        for name, p in peft_model.named_parameters():
            if "lora_" not in name and not any(f".{m}." in name for m in target_modules):
                p.requires_grad_(True)
    return peft_model
