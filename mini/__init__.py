"""mini: the library of the book.

Each part of the book has its method here, next to the kernels and helpers every part shares:

- :mod:`mini.kernels`: one way to write, dispatch, test and benchmark a Triton kernel.
- :mod:`mini.cogo`: Part I, composing global optimizers for modular addition (Tian, 2024).
- :mod:`mini.lm`: the tiny-LLM substrate of Parts II-IV (configs, corpus, trainer, memory).
- :mod:`mini.quant`: block-wise 8-bit and group-wise INT4/INT8 quantization.
- :mod:`mini.galore`, :mod:`mini.qgalore`, :mod:`mini.sltrain`, :mod:`mini.welore`: Part II,
  low-rank training (GaLore, Q-GaLore, SLTrain, WeLore); :mod:`mini.pretraining` sets up their
  pretraining comparison.

- :mod:`mini.runtime`: :func:`~mini.runtime.setup`, every notebook's first call (threads, seeds, device,
  FULL); :mod:`mini.claims`:
  the claims record each lab writes; :func:`~mini.display.table`: results as rendered tables.

``import mini`` works where triton is not installed: every kernel has a PyTorch reference.

See the book's :doc:`introduction </book/intro>`.
"""
from __future__ import annotations

import logging

__version__ = "0.1.0"

# bitsandbytes (imported by peft and by transformers' Trainer) warns at import, on CPUs with
# AVX512-BF16, that the optional `kernels` package for its 4-bit CPU matmul is missing; mini never
# runs that matmul. Only that module's logger is quieted, and only below ERROR.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = ["__version__", "versions", "setup", "table"]

from mini.display import table  # noqa: E402  (results as rendered tables)
from mini.runtime import setup  # noqa: E402  (the first call of every notebook)


def versions() -> dict[str, str]:
    """Versions of python, torch, triton (or ``"not installed"``) and mini, for a lab's printout.

    See the book's :doc:`introduction </book/intro>`.
    """
    import platform

    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # macOS, or a user environment without triton
        triton_version = "not installed"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "mini": __version__,
    }
