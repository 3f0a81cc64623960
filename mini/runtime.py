"""One call that every notebook of the book makes first: threads, seeds, device, the FULL switch.

Why the thread count is pinned. A float reduction split over two threads adds its terms in
another order than one thread does, so the last digits of a matmul depend on the thread count;
a training run then amplifies those digits into different losses, ranks and correlations. The
book's numbers are printed by notebooks that run by three routes (``make test`` under nbval,
``make book``, ``jupyter execute``), two of which run two notebooks side by side. So that every
route prints the same numbers, :func:`setup` fixes torch's intra-op threads to
:func:`notebook_threads` (one by default, ``MINI_THREADS`` to change it) on every route and every
machine. On a GPU the CPU thread count hardly matters.

:func:`cpu_budget` is the number of cores a notebook may keep busy (``MINI_CPUS``, set by the
test harness when it runs notebooks side by side; else the cores of the machine): helpers that
start processes of their own (:func:`mini.lm.measure.measure_in_fresh_processes`) start no more
than it allows, so running notebooks side by side never oversubscribes the cores.
"""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass

__all__ = ["Setup", "setup", "notebook_threads", "cpu_budget", "ENV_THREADS", "ENV_CPUS"]

ENV_THREADS = "MINI_THREADS"  # torch threads of a notebook (default 1)
ENV_CPUS = "MINI_CPUS"  # cores a notebook may keep busy (default: the machine's)


def _positive_int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"environment variable {name} must be a positive integer, got {raw!r}")
    return value


def _machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def notebook_threads() -> int:
    """Torch threads a notebook runs with: ``MINI_THREADS``, else 1 (see the module docstring)."""
    return _positive_int_env(ENV_THREADS, 1)


def cpu_budget() -> int:
    """Cores this process may keep busy: ``MINI_CPUS``, else the cores of the machine."""
    return min(_positive_int_env(ENV_CPUS, _machine_cores()), _machine_cores())


@dataclass(frozen=True)
class Setup:
    """What :func:`setup` fixed, for a notebook's first cell."""

    seed: int
    device: str  # "cuda" when a GPU is visible, else "cpu"
    full: bool  # FULL=1 in the environment: the paper-scale settings of a lab
    threads: int  # torch intra-op threads

    def summary(self) -> dict[str, object]:
        """Versions, device, threads and FULL: the line a lab prints first."""
        import torch

        from mini import versions

        name = torch.cuda.get_device_name() if self.device == "cuda" else "cpu"
        return {**versions(), "device": name, "threads": self.threads, "FULL": self.full}


def setup(seed: int = 0, *, verbose: bool = True) -> Setup:
    """Pin torch's threads, seed python, numpy and torch, pick the device, read ``FULL``.

    Call it once at the top of a notebook. ``verbose`` prints :meth:`~mini.runtime.Setup.summary`.
    Environment: ``FULL=1`` (a lab's paper-scale settings), ``MINI_THREADS`` (default 1).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    import numpy as np
    import torch

    threads = notebook_threads()
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # for processes the notebook starts
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    full = os.environ.get("FULL", "0") == "1"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = Setup(seed=seed, device=device, full=full, threads=threads)
    if verbose:
        print(result.summary())
        sys.stdout.flush()
    return result
