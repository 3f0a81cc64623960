"""Param groups for GaLore the way the Hugging Face Trainer builds them: one rank for every target.

Part II, GaLore chapter (``book/galore/``); Zhao et al., ICML 2024, arXiv 2403.03507, Sec. 5.
The paper projects every ``nn.Linear`` inside attention and MLP blocks and trains embeddings,
the LM head, norms and biases with plain Adam. The Trainer's GaLore option (``optim="galore_adamw"``,
``optim_target_modules=[...]``) selects the Linear modules whose name matches a target and gives
them all one rank, gap, scale and proj_type; :func:`galore_param_groups` returns the same two
groups, ready for :class:`mini.galore.adamw.GaLoreAdamW` or galore-torch's.

Difference from the Trainer: matching is by substring of the module's qualified name (or a
predicate you pass), not by regular expression, and a target list that matches nothing raises
instead of silently training without projection.

Explained in :doc:`/book/galore/theory`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from .projector import check_proj_type, check_rank, check_scale, check_update_proj_gap

__all__ = ["GaLoreConfig", "galore_param_groups"]


@dataclass(frozen=True)
class GaLoreConfig:
    """GaLore's per-matrix hyperparameters, validated; defaults from the paper's LLaMA-60M recipe.

    Explained in :doc:`/book/galore/theory`.
    """

    #: r = 128 (paper, 60M; 256 for 130M/350M, 512 (paper) or 1024 (scripts) for 1B)
    rank: int = 128
    update_proj_gap: int = 200  #: T = 200 (paper and galore-torch scripts; 500 for 7B)
    scale: float = 0.25  #: α = 0.25 (paper and scripts)
    proj_type: str = "std"  #: one of :data:`~mini.galore.projector.PROJ_TYPES` ("std" is galore-torch's default)

    def __post_init__(self) -> None:
        # frozen: store the checked values as plain ints (numpy ranks, integral float gaps)
        object.__setattr__(self, "rank", check_rank(self.rank))
        object.__setattr__(self, "update_proj_gap", check_update_proj_gap(self.update_proj_gap))
        check_scale(self.scale)
        check_proj_type(self.proj_type)

    def group(self, params: Sequence[Any]) -> dict[str, Any]:
        """A projected param group (galore-torch's convention) over ``params``."""
        return {"params": list(params), **asdict(self)}

    def param_groups(
        self, model: nn.Module, target_modules: Sequence[str] | Callable[[str, nn.Module], bool] = ("attn", "mlp")
    ) -> list[dict[str, Any]]:
        """:func:`galore_param_groups` with these hyperparameters."""
        return galore_param_groups(model, target_modules=target_modules, **asdict(self))


def _matcher(target_modules: Sequence[str] | Callable[[str, nn.Module], bool]) -> Callable[[str, nn.Module], bool]:
    if callable(target_modules):
        return target_modules
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    targets = tuple(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise TypeError(
            f"target_modules must be a non-empty sequence of non-empty strings or a predicate (name, module) -> bool, "
            f"got {target_modules!r}"
        )
    return lambda name, module: any(t in name for t in targets)


def galore_param_groups(
    model: nn.Module,
    rank: int,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    target_modules: Sequence[str] | Callable[[str, nn.Module], bool] = ("attn", "mlp"),
) -> list[dict[str, Any]]:
    """Two param groups: the targeted Linear weights (projected) and everything else (plain AdamW).

    Explained in :doc:`/book/galore/theory`.

    Args:
        model: the model; its trainable parameters are split, each exactly once (tied ones too).
        rank, update_proj_gap, scale, proj_type: GaLore hyperparameters for every targeted matrix
            (paper: α = 0.25, T = 200; rank 128 for LLaMA-60M … 1024 for 7B).
        target_modules: substrings of module names (default ``("attn", "mlp")``: Llama's
            ``self_attn.q_proj`` … and ``mlp.gate_proj`` …) or a predicate ``(name, module) -> bool``.
            Only ``nn.Linear`` modules are projected, and only their weight; their biases go
            to the plain group.

    Returns:
        ``[{"params": regular}, {"params": projected, "rank", "update_proj_gap", "scale", "proj_type"}]``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    rank = check_rank(rank)
    update_proj_gap = check_update_proj_gap(update_proj_gap)
    check_scale(scale)
    check_proj_type(proj_type)
    match = _matcher(target_modules)
    projected_ids: set[int] = set()
    projected = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and match(name, module) and module.weight.requires_grad:
            if id(module.weight) not in projected_ids:
                projected_ids.add(id(module.weight))
                projected.append(module.weight)
    if not projected:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear module of the model")
    seen = set(projected_ids)
    regular = []
    for p in model.parameters():  # deduplicated by torch; keep order
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            regular.append(p)
    return [
        {"params": regular},
        {"params": projected, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, "proj_type": proj_type},
    ]
