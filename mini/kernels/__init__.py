"""The hall every kernel of the book uses.

- :mod:`mini.kernels.dispatch`: :class:`~mini.kernels.dispatch.KernelOp`, one kernel with three backends (compiled
  Triton on CUDA, the Triton interpreter, a PyTorch reference), ``use_backend`` and
  ``$MINI_BACKEND``, and the argument checks of a wrapper's boundary.
- :mod:`mini.kernels.testing`: :func:`~mini.kernels.testing.check_against_reference`, kernel vs reference on random
  inputs with poisoned outputs.
- :mod:`mini.kernels.bench`: ``time_op``, ``device_info``, ``measured_ceiling``, ``write_result``.

Importing this package works without triton (``HAS_TRITON`` is then False and every op runs its
reference).

See the book's :doc:`introduction </book/intro>`.
"""
from __future__ import annotations

from .dispatch import (
    BACKENDS,
    ENV_VAR,
    HAS_TRITON,
    KernelOp,
    check_contiguous,
    check_dtype,
    check_same_device,
    check_shape,
    check_tensor,
    current_backend,
    interpreted,
    kernel_op,
    resolve_backend,
    use_backend,
)
from .testing import check_against_reference

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "HAS_TRITON",
    "KernelOp",
    "kernel_op",
    "use_backend",
    "current_backend",
    "resolve_backend",
    "interpreted",
    "check_same_device",
    "check_dtype",
    "check_contiguous",
    "check_shape",
    "check_tensor",
    "check_against_reference",
]
