"""One call that every notebook of the book makes first: threads, seeds, device, the FULL switch.

Which numbers a notebook prints depends on the machine's float arithmetic in the last digits,
and a training run amplifies those digits into different losses, ranks and correlations. Two
causes are known:

- **The CPU kernels torch picks.** On an x86 CPU torch dispatches to AVX-512 or AVX2 kernels
  (:func:`cpu_kernels`, ``torch.backends.cpu.get_cpu_capability()``), which round differently.
  The WeLore compression lab, run on one AVX-512 machine, prints Spearman -0.286 with its
  default kernels and -0.568 with ``ATEN_CPU_CAPABILITY=avx2``, the value committed from an
  AVX2 machine. We do not force one kind: AVX2 kernels cost the labs about a third more time,
  and another processor (ARM) has neither. Claims are asserted with margin instead (see
  :mod:`mini.claims`), and each claim records the machine it was measured on (:func:`machine`).
- **The thread count.** Some kernels split a reduction over threads, and then the thread
  count changes the order of the additions. On our machines the labs' models give the same
  bits on one and on two threads. So that no route or machine depends on that,
  :func:`setup` fixes torch's intra-op threads to :func:`notebook_threads` (one by default,
  ``MINI_THREADS`` to change it) on every route: ``make test`` (nbval), ``make book`` and
  ``jupyter execute``, two of which run two notebooks side by side.

:func:`cpu_budget` is the number of cores a notebook may keep busy (``MINI_CPUS``, set by the
test harness when it runs notebooks side by side; else the cores of the machine): helpers that
start processes of their own (:func:`mini.lm.measure.measure_in_fresh_processes`) start no more
than it allows, so running notebooks side by side never oversubscribes the cores.

See the book's :doc:`introduction </book/intro>`.
"""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: reading the environment needs none
    import torch

__all__ = ["Setup", "setup", "resolve_device", "DEVICE_TYPES", "notebook_threads", "cpu_budget", "cpu_kernels",
           "cpu_model", "machine", "autocast_dtype", "ENV_THREADS", "ENV_CPUS"]

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
    """Torch threads a notebook runs with: ``MINI_THREADS``, else 1 (see the module docstring).

    See the book's :doc:`introduction </book/intro>`.
    """
    return _positive_int_env(ENV_THREADS, 1)


def cpu_budget() -> int:
    """Cores this process may keep busy: ``MINI_CPUS``, else the cores of the machine.

    Explained in :doc:`/labs/galore/pretraining`.
    """
    return min(_positive_int_env(ENV_CPUS, _machine_cores()), _machine_cores())


#: Device types that the library's ``device=`` arguments accept; "meta" (shapes, no data) serves tests.
DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda", "meta")


def autocast_dtype(x: "torch.Tensor") -> "torch.dtype | None":
    """The dtype ``torch.autocast`` would run a linear layer in for input ``x``, or None.

    None when autocast is off on ``x``'s device type or ``x`` is not eligible (autocast casts
    floating tensors other than float64), so the layer then runs in its own dtypes. mini's
    custom-autograd layers (SLTrain's, Q-GaLore's INT8 layer) call it to behave like
    ``nn.Linear`` under autocast; it reads torch >= 2.4's API and falls back to the older one.

    Explained in :doc:`/book/sltrain/theory`.
    """
    import torch

    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == torch.float64:
        return None
    device_type = x.device.type
    try:  # torch >= 2.4
        enabled, dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):
        if device_type == "cpu":
            enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        elif device_type == "cuda":
            enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
        else:
            return None
    return dtype if enabled else None


def resolve_device(device: str | torch.device | None, *, name: str = "device") -> torch.device | None:
    """Check a ``device=`` argument and return it as a ``torch.device`` (None stays None).

    None means "where the model already is" (the CPU unless it was moved). Allowed: ``"cpu"``,
    ``"cuda"``, ``"cuda:<index>"``, ``"meta"`` or such a ``torch.device``; CUDA only where
    ``torch.cuda.is_available()``. Every public function of Part II that takes ``device`` calls
    this first, so a typo or a missing GPU fails at once with one message, not deep in a model.

    See the book's :doc:`introduction </book/intro>`.
    """
    import torch

    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{name} must be None, a str or a torch.device, got {type(device).__name__} {device!r}")
    allowed = "'cpu', 'cuda', 'cuda:<index>' or 'meta' (or None: where the model already is)"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{name} must be one of {allowed}, got {device!r}") from None
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"{name} must be one of {allowed}, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={device!r} needs CUDA, which is not available here "
                             "(torch.cuda.is_available() is False); use 'cpu' (mini.setup().device "
                             "picks 'cuda' only where there is a GPU)")
        n = torch.cuda.device_count()
        if dev.index is not None and not 0 <= dev.index < n:
            raise ValueError(f"{name}={device!r} names CUDA device {dev.index}, but this machine has {n} "
                             f"(indices 0 to {n - 1})")
    return dev


def cpu_kernels() -> str:
    """The CPU kernels torch dispatches to here, e.g. ``"AVX512"``, ``"AVX2"`` or ``"DEFAULT"``.

    See the book's :doc:`introduction </book/intro>`.
    """
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:  # torch before 2.1
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one).

    See the book's :doc:`introduction </book/intro>`.
    """
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """The CPU model and torch's CPU kernels, e.g. ``"AMD EPYC / AVX512"``: machines with the same
    key compute the same bits; others differ in the last digits (see the module docstring).

    See the book's :doc:`introduction </book/intro>`.
    """
    return f"{cpu_model()} / {cpu_kernels()}"


@dataclass(frozen=True)
class Setup:
    """What :func:`setup` fixed, for a notebook's first cell.

    See the book's :doc:`introduction </book/intro>`.
    """

    seed: int  #: the seed of python, numpy and torch
    device: str  #: "cuda" when a GPU is visible, else "cpu"
    full: bool  #: True when FULL=1 is set in the environment (a lab's paper-scale settings)
    threads: int  #: torch intra-op threads

    def summary(self) -> dict[str, object]:
        """Versions, device, CPU kernels, threads and FULL: the line a lab prints first."""
        import torch

        from mini import versions

        name = torch.cuda.get_device_name() if self.device == "cuda" else "cpu"
        return {**versions(), "device": name, "cpu_kernels": cpu_kernels(), "threads": self.threads,
                "FULL": self.full}

    def describe(self) -> str:
        """:meth:`summary` as two short lines that fit the book's code column."""
        s = self.summary()
        threads = f"{s['threads']} torch thread" + ("s" if s["threads"] != 1 else "")
        return (
            f"python {s['python']} | torch {s['torch']} | triton {s['triton']} | mini {s['mini']}\n"
            f"device {s['device']} | CPU kernels {s['cpu_kernels']} | {threads} | FULL={int(s['FULL'])}"
        )


def setup(seed: int = 0, *, verbose: bool = True) -> Setup:
    """Pin torch's threads, seed python, numpy and torch, pick the device, read ``FULL``.

    Call it once at the top of a notebook. ``verbose`` prints :meth:`~mini.runtime.Setup.describe`.
    Environment: ``FULL=1`` (a lab's paper-scale settings), ``MINI_THREADS`` (default 1).

    See the book's :doc:`introduction </book/intro>`.
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
        print(result.describe())
        sys.stdout.flush()
    return result
