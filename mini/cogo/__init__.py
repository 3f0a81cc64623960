"""CoGO: composing global optimizers for modular addition (Part I of the book).

Paper: Yuandong Tian, "Composing Global Optimizers to Reasoning Tasks via Algebraic Objects in
Neural Nets", 2024, arXiv:2410.01779. The chapter ``book/cogo/theory.ipynb`` (Part I, CoGO
theory) explains the theory; the Part I lab trains and analyses networks.

- :mod:`mini.cogo.model`: the network ``o = Wc (Wa e_a + Wb e_b)^2`` and its centred MSE loss.
- :mod:`mini.cogo.fourier`: Fourier coefficients, the potentials r, r_a, r_b, the exact loss
  decomposition, the sufficient conditions and the constraint sets R_c, R_n, R*.
- :mod:`mini.cogo.semiring`: add (concatenate), mul (Khatri–Rao), zero, one, scale.
- :mod:`mini.cogo.constructions`: partial solutions and the global constructions F6, F6_ab,
  F4/6 (and the non-global F4), perfect memorization.
- :mod:`mini.cogo.analysis`: the official per-frequency factorization analysis.
- :mod:`mini.cogo.trainer`, :mod:`mini.cogo.kernel`: training and the fused loss/gradient kernel.

The modules are ``analysis`` and ``trainer``, so that the functions :func:`~mini.cogo.analysis.analyze`
and :func:`~mini.cogo.trainer.train` re-exported here do not shadow them.

Explained in :doc:`/book/cogo/theory`.
"""
from __future__ import annotations

from .analysis import (
    NAMED_TYPES,
    Analysis,
    analyze,
    analyze_batch,
    classify_factor,
    factorize_block,
    pooled_summary,
)
from .constructions import (
    CONSTRUCTIONS,
    DEFAULT_PARAMS,
    PARTIALS,
    construct,
    memorization,
    n_nodes,
    partial,
    partial_coefficients,
    partial_constraints,
)
from .fourier import (
    center,
    coefficients,
    constraint_sets,
    from_coefficients,
    loss_from_potentials,
    per_frequency_loss,
    potentials,
    sufficient_conditions,
)
from .model import accuracy, as_weights, check_d, check_weights, forward, loss
from .semiring import Weights, add, mul, one, scale, symbolic_homomorphism_check, zero

from .kernel import fused_loss_and_grads, loss_and_grads_reference
from .trainer import TrainConfig, TrainResult, evaluate, init_weights, make_masks, train

__all__ = [
    # model
    "check_d", "check_weights", "as_weights", "forward", "loss", "accuracy",
    # fourier
    "coefficients", "from_coefficients", "center", "potentials", "per_frequency_loss",
    "loss_from_potentials", "sufficient_conditions", "constraint_sets",
    # semiring
    "Weights", "add", "mul", "zero", "one", "scale", "symbolic_homomorphism_check",
    # constructions
    "PARTIALS", "CONSTRUCTIONS", "DEFAULT_PARAMS", "partial_coefficients", "partial",
    "partial_constraints", "construct", "n_nodes", "memorization",
    # analyze
    "NAMED_TYPES", "Analysis", "factorize_block", "classify_factor", "analyze",
    "analyze_batch", "pooled_summary",
    # train, kernel
    "TrainConfig", "TrainResult", "train", "evaluate", "init_weights", "make_masks",
    "fused_loss_and_grads", "loss_and_grads_reference",
]

# per-node purity and layer balance (the weight-decay lab)
from .nodes import balance_ratio, layer_norms, node_energy, node_purity

__all__ += ["node_energy", "node_purity", "layer_norms", "balance_ratio"]

# width sweeps and trajectories of the potentials during training (the dynamics lab)
from .dynamics import PotentialRecorder, WidthSweep, frequency_orders, settle_steps, width_sweep

__all__ += ["PotentialRecorder", "WidthSweep", "width_sweep", "frequency_orders", "settle_steps"]
