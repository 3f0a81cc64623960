"""Measuring a training run so its memory can be trusted: a fresh process, peak RSS, state bytes.

Used by Part II, GaLore chapter (``book/galore/``): the pretraining lab
(``labs/galore/pretraining.ipynb``) trains every method of Zhao et al. (GaLore, arXiv 2403.03507,
Table 2) with this module and sets the measured bytes beside :func:`mini.lm.memory.estimate_memory`.

Why a fresh process. The peak resident memory of a process only grows; inside a notebook
kernel it holds every earlier run, the plots and the libraries. Here each run happens in its
own child process, which reports ``ru_maxrss`` (its peak resident set size) when it ends. A
*baseline* child imports the same libraries, builds the same data and model and evaluates the
validation batches once, but does not train; the difference ::

    training memory = peak RSS(run) − peak RSS(baseline)

is what training itself added: gradients, optimizer states, projectors, activations kept for
backward, the SVD's workspace, and whatever the allocator did not return. So that the last
term is small and does not depend on what ran before, each child first fixes glibc's mmap
threshold at 64 KiB (:func:`fix_malloc_thresholds`, ``RunSpec.mmap_threshold``): tensors of
64 KiB and more are then returned to the system when freed. It is a measurement,
not an estimate: at the tiny model's scale (a few MB of states) activations and allocator
rounding are of the same size as the differences between methods, which the lab shows.

Children are started by ``multiprocessing`` with the ``"forkserver"`` method where the
platform has it: a server process imports torch, transformers and ``preload`` once, and each
child is forked from it, so a run costs milliseconds to start rather than the seconds of
importing torch and transformers again; every child still starts from the same state (the
server's), which is what makes the baseline subtraction fair. ``"spawn"`` (a new interpreter per
run, which imports everything again: seconds per run) is available everywhere. Scripts that
start runs need the usual ``if __name__ == "__main__":`` guard (notebooks do not).

**Optimizer-state bytes** (:func:`state_bytes`) are counted from the tensors an optimizer
actually holds: every tensor in ``optimizer.state`` (moments, 8-bit codes and their absmax,
projector bases: a projector object is read through its ``state_dict()``, so an INT4 basis counts
its packed bytes), except the ``step`` counters. Objects that are not ``torch.optim.Optimizer``
(per-layer hook optimizers) are read through ``state_dict()``.

What a run does is given by a *setup* function ``setup(model, **kwargs) -> TrainSetup`` that
builds the optimizer (and may convert the model, e.g. to LoRA); it must be a module-level
function so it can be sent to the child (see :mod:`mini.pretraining` for the GaLore chapter's).

Explained in :doc:`/labs/galore/pretraining`.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import multiprocessing as mp
import numbers
import os
import random
import resource
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mini.lm.config import build_model, tiny_llama_config
from mini.lm.data import eval_batches, synthetic_lm_data
from mini.lm.trainer import History, TrainerConfig, evaluate_lm, place_model, train_lm
from mini.runtime import cpu_budget, resolve_device

__all__ = [
    "DEFAULT_PRELOAD",
    "DEFAULT_MMAP_THRESHOLD",
    "TrainSetup",
    "RunSpec",
    "RunResult",
    "peak_rss_bytes",
    "fix_malloc_thresholds",
    "state_bytes",
    "training_step_bytes",
    "run_in_fresh_process",
    "start_fork_server",
    "measure_training",
    "measure_in_fresh_process",
    "measure_in_fresh_processes",
]

#: Modules every child imports before it builds anything (and the fork server preloads), so the
#: baseline and the runs carry the same libraries.
DEFAULT_PRELOAD: tuple[str, ...] = ("torch", "transformers", "mini.lm")

START_METHODS = ("forkserver", "spawn", "fork")

DEFAULT_MMAP_THRESHOLD = 1 << 16
"""The glibc mmap threshold in bytes that a measured child fixes by default (64 KiB); see
:func:`fix_malloc_thresholds`."""


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (``ru_maxrss``; kB on Linux,
    bytes on macOS). Host memory only: tensors on a GPU are not in it.

    Explained in :doc:`/labs/galore/pretraining`.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _tensor_bytes(obj: Any, skip_keys: tuple[str, ...] = ("step",), _seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable through dicts, lists, tuples and ``state_dict()``."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return 0
    if isinstance(obj, torch.Tensor):
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v, skip_keys, seen) for k, v in obj.items() if k not in skip_keys)
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, skip_keys, seen) for v in obj)
    if hasattr(obj, "state_dict") and callable(obj.state_dict) and not isinstance(obj, nn.Module):
        seen.add(id(obj))
        return _tensor_bytes(obj.state_dict(), skip_keys, seen)
    return 0


def state_bytes(optimizer: Any) -> int:
    """Bytes of the tensors an optimizer holds as state, ``step`` counters excluded.

    ``torch.optim.Optimizer``: everything in ``optimizer.state`` (objects such as GaLore's
    projectors through their ``state_dict()``); any other object with ``state_dict()`` (e.g.
    per-layer hook optimizers): the tensors of its state dict.

    Explained in :doc:`/labs/galore/pretraining`.
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        return _tensor_bytes(list(optimizer.state.values()))
    if hasattr(optimizer, "state_dict") and callable(optimizer.state_dict):
        return _tensor_bytes(optimizer.state_dict())
    raise TypeError(
        f"optimizer must be a torch.optim.Optimizer or have a state_dict() method, got {type(optimizer).__name__}"
    )


def training_step_bytes(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, int]:
    """The bytes one training step of ``model`` on ``batch`` holds, counted tensor by tensor.

    Where a CPU has no allocator counter (``torch.cuda.max_memory_allocated``), this counts the
    part of a step's memory a GPU comparison is about: ``"weights"`` (every parameter),
    ``"gradients"`` (of the parameters that require grad), ``"optimizer state"`` (after one step,
    :func:`state_bytes`; default optimizer :class:`torch.optim.AdamW`) and ``"saved activations"``:
    the tensors autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``), each
    storage once, parameters excluded. ``"total"`` is their sum. Allocator slack, temporaries and
    workspaces are not counted. The step runs on a deep copy: ``model`` is not changed.
    ``loss_fn(model, x, y)`` defaults to :func:`~mini.lm.trainer.lm_loss`. ``device``: where the
    copy and the batch go (None: where the model is); the counts do not depend on it, but
    ``"meta"`` is refused (its tensors have no storage to tell apart).

    Explained in :doc:`/labs/welore/finetuning`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError("batch must be a pair (inputs, targets) of tensors")
    dev = resolve_device(device)
    from mini.lm.trainer import lm_loss

    loss_fn = lm_loss if loss_fn is None else loss_fn
    model = copy.deepcopy(model)  # this step must not train the caller's model
    dev = place_model(model, dev)
    if dev.type == "meta":
        raise ValueError(f"device must not be 'meta' here (got {device!r}, model on {dev}): meta tensors "
                         "have no storage addresses to tell apart; use 'cpu', 'cuda' or None")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameter that requires grad: there is no training step to count")
    optimizer = torch.optim.AdamW(params) if optimizer_factory is None else optimizer_factory(params)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x, y = batch[0].to(dev), batch[1].to(dev)  # (B, T) each
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model, x, y)
    loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    optimizer.step()
    out = {
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
        "gradients": grads,
        "optimizer state": state_bytes(optimizer),
        "saved activations": sum(saved.values()),
    }
    out["total"] = sum(out.values())
    return out


@dataclass
class TrainSetup:
    """What a setup function returns: the (possibly converted) model and what updates it.

    Explained in :doc:`/labs/galore/pretraining`.
    """

    model: nn.Module  #: the model to train, converted by the setup where the method needs it
    #: goes to :func:`~mini.lm.trainer.train_lm` (None when per-layer hooks do every update)
    optimizer: torch.optim.Optimizer | None
    #: the objects whose state :func:`state_bytes` counts (by default the optimizer)
    state_holders: list[Any] = field(default_factory=list)
    scheduler: Any | None = None  #: stepped once per step
    #: called after training for extra numbers to report (e.g. the number of SVDs)
    info: Callable[[], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(self.model).__name__}")
        if self.optimizer is not None and not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(self.optimizer).__name__}")
        if not self.state_holders and self.optimizer is not None:
            self.state_holders = [self.optimizer]


@dataclass
class RunSpec:
    """One measured run: the data, the model, the trainer settings and the setup to call.

    With ``setup=None`` the run is the baseline: build everything, evaluate once, train nothing.

    Explained in :doc:`/labs/galore/pretraining`.
    """

    name: str  #: the run's label in tables and results files
    #: ``setup(model, **setup_kwargs)`` returns the :class:`TrainSetup`; None is the baseline
    setup: Callable[..., TrainSetup] | None
    setup_kwargs: dict[str, Any] = field(default_factory=dict)  #: keyword arguments of ``setup``
    model: dict[str, Any] = field(default_factory=dict)  #: :func:`~mini.lm.config.tiny_llama_config` overrides
    model_seed: int = 0  #: seed of the model's initialization
    n_documents: int = 2000  #: documents of the :func:`~mini.lm.data.synthetic_lm_data` corpus
    data_seed: int = 0  #: seed of the corpus
    #: the trainer's settings (no progress bar in the child by default)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(progress=False))
    preload: tuple[str, ...] = DEFAULT_PRELOAD  #: modules the child imports first
    threads: int | None = None  #: torch threads in the child, or None for torch's default
    #: glibc's mmap threshold fixed in the child by :func:`measure_in_fresh_process` (bytes; None:
    #: glibc's adaptive default; :func:`measure_training` in the caller's process leaves the
    #: allocator alone). See :func:`fix_malloc_thresholds`: it makes the peak RSS follow the live tensors.
    mmap_threshold: int | None = DEFAULT_MMAP_THRESHOLD
    #: where the child trains and evaluates, checked by :func:`mini.runtime.resolve_device` (None
    #: means the CPU; a ``torch.device`` is stored as its string). The peak RSS is host memory, so
    #: a run on another device must set ``mmap_threshold=None``, the mark of a run whose memory is
    #: not read.
    device: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if self.setup is not None and not callable(self.setup):
            raise TypeError(f"setup must be callable or None (the baseline), got {type(self.setup).__name__}")
        if not isinstance(self.trainer, TrainerConfig):
            raise TypeError(f"trainer must be a TrainerConfig, got {type(self.trainer).__name__}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, numbers.Integral)
                                         or self.threads < 1):
            raise ValueError(f"threads must be None or a positive integer, got {self.threads!r}")
        if self.mmap_threshold is not None and (isinstance(self.mmap_threshold, bool)
                                                or not isinstance(self.mmap_threshold, numbers.Integral)
                                                or self.mmap_threshold < 1):
            raise ValueError(f"mmap_threshold must be None or a positive number of bytes, got {self.mmap_threshold!r}")
        self.preload = tuple(self.preload)
        dev = resolve_device(self.device)
        self.device = None if dev is None else str(dev)  # a plain string crosses to the child
        if dev is not None and dev.type != "cpu" and self.mmap_threshold is not None:
            raise ValueError(
                f"device={self.device!r} keeps the run's tensors outside host memory, so the peak RSS "
                "this run measures would not count them: measure memory on device='cpu' (or None), or "
                "pass mmap_threshold=None for a run whose memory is not read (perplexity, state bytes)"
            )


@dataclass
class RunResult:
    """What a measured run reports (plain data: it crosses the process boundary by pickle).

    Explained in :doc:`/labs/galore/pretraining`.
    """

    name: str  #: the :class:`RunSpec`'s name
    history: History  #: the trainer's history (empty for the baseline)
    n_params: int  #: parameters of the (converted) model, frozen ones included
    n_trainable: int  #: parameters that require grad (Int8 hook-trained weights not included)
    state_bytes: int  #: bytes of the optimizers' state tensors after training
    peak_rss: int  #: peak resident set size of the process, bytes
    start_rss: int  #: peak RSS when the child started (inherited from its parent), bytes
    wall_s: float  #: seconds in the child, from start to the end of training
    train_s: float  #: wall seconds of ``train_lm``
    train_cpu_s: float  #: CPU seconds of ``train_lm`` (all threads; on a busy machine < wall)
    pid: int  #: the child's process id (each run has its own)
    info: dict[str, Any] = field(default_factory=dict)  #: what the setup's ``info`` returned
    warnings: list[str] = field(default_factory=list)  #: warnings the child raised (deduplicated)
    device: str = "cpu"  #: where the run trained (its peak RSS counts host memory only)

    @property
    def final_val_ppl(self) -> float:
        """Validation perplexity after the last step (NaN for the baseline)."""
        return self.history.val_ppl[-1] if self.history.val_ppl else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers, for a JSON results file."""
        d = dataclasses.asdict(self)
        d["history"] = self.history.to_dict()
        return d


def measure_training(spec: RunSpec) -> RunResult:
    """Run ``spec`` in this process and report it (call it in a fresh process: see
    :func:`measure_in_fresh_process`). Warnings are collected into the result, not printed.

    Explained in :doc:`/labs/galore/pretraining`.
    """
    if not isinstance(spec, RunSpec):
        raise TypeError(f"spec must be a RunSpec, got {type(spec).__name__}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _measure(spec)
    seen: dict[str, None] = {}
    for w in caught:
        seen.setdefault(f"{w.category.__name__}: {w.message}", None)
    result.warnings = list(seen)
    return result


def fix_malloc_thresholds(nbytes: int) -> bool:
    """Make glibc serve every allocation of ``nbytes`` or more by ``mmap`` and return it at free.

    glibc's default threshold adapts: after a large block is freed it rises (up to 32 MiB), and
    later blocks of that size come from the heap, where freed memory stays resident. The peak
    RSS then depends on the order of earlier allocations, not only on what was alive: the same
    run measured 69 MiB over its baseline from a script and 84 MiB from a Jupyter kernel. A fixed
    threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns the adaptation off) and a trim
    threshold of the same size make resident memory follow the live tensors. Returns False
    where the C library has no ``mallopt`` (not glibc), doing nothing.

    Explained in :doc:`/labs/galore/pretraining`.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_threshold, int(nbytes))) and bool(mallopt(m_trim_threshold, int(nbytes)))


def _measure_in_child(spec: RunSpec) -> RunResult:
    """:func:`measure_training` in a fresh child, after fixing its allocator's thresholds (the
    process is the run's alone, so changing its allocator affects nothing else)."""
    if spec.mmap_threshold is not None:
        fix_malloc_thresholds(spec.mmap_threshold)
    return measure_training(spec)


def _measure(spec: RunSpec) -> RunResult:
    t0 = time.perf_counter()
    start_rss = peak_rss_bytes()
    for module in spec.preload:
        importlib.import_module(module)
    if spec.threads is not None:
        torch.set_num_threads(int(spec.threads))
    data = synthetic_lm_data(spec.n_documents, seed=spec.data_seed)
    config = tiny_llama_config(vocab_size=data.tokenizer.vocab_size, **spec.model)
    model = build_model(config, seed=spec.model_seed)  # on the CPU: the same weights on every device
    device = str(place_model(model, spec.device))
    tc = spec.trainer
    if spec.setup is None:  # the baseline: the same objects, one evaluation, no training
        evaluate_lm(model, eval_batches(data.val_ids, tc.batch_size, tc.seq_len, tc.eval_batches))
        n = sum(p.numel() for p in model.parameters())
        return RunResult(spec.name, History(), n, n, 0, peak_rss_bytes(), start_rss,
                         time.perf_counter() - t0, 0.0, 0.0, os.getpid(), device=device)
    # Seeded before the setup too: a setup that draws from the global generators (an adapter's
    # init, say) must not depend on the state this process inherited.
    random.seed(spec.model_seed)
    np.random.seed(spec.model_seed)
    torch.manual_seed(spec.model_seed)
    setup = spec.setup(model, **spec.setup_kwargs)
    if not isinstance(setup, TrainSetup):
        raise TypeError(f"setup must return a TrainSetup, got {type(setup).__name__}")
    t1, c1 = time.perf_counter(), time.process_time()
    history = train_lm(setup.model, setup.optimizer, data, tc, scheduler=setup.scheduler)
    train_s, train_cpu_s = time.perf_counter() - t1, time.process_time() - c1
    info = dict(setup.info()) if setup.info is not None else {}
    return RunResult(
        name=spec.name,
        history=history,
        n_params=sum(p.numel() for p in setup.model.parameters()),
        n_trainable=sum(p.numel() for p in setup.model.parameters() if p.requires_grad),
        state_bytes=sum(state_bytes(h) for h in setup.state_holders),
        peak_rss=peak_rss_bytes(),
        start_rss=start_rss,
        wall_s=time.perf_counter() - t0,
        train_s=train_s,
        train_cpu_s=train_cpu_s,
        pid=os.getpid(),
        info=info,
        device=device,
    )


def _context(start_method: str | None, preload: Sequence[str]) -> Any:
    if start_method is None:
        start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {START_METHODS} or None, got {start_method!r}")
    if start_method not in mp.get_all_start_methods():
        raise ValueError(f"start_method {start_method!r} is not available here; available: {mp.get_all_start_methods()}")
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        # Takes effect when the server starts (the first forkserver child of this process); a
        # server already running keeps its modules, and the child imports the rest itself.
        ctx.set_forkserver_preload(list(preload))
    return ctx


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and not (isinstance(timeout, numbers.Real) and timeout > 0):
        raise ValueError(f"timeout must be None or a positive number of seconds, got {timeout!r}")


def start_fork_server(preload: Sequence[str] = DEFAULT_PRELOAD) -> bool:
    """Start the fork server now, in the background, so its imports overlap the caller's work.

    Returns False (and does nothing) where the platform has no ``"forkserver"`` method. Later
    :func:`run_in_fresh_process` calls use the running server (whose preload list is then fixed).

    Explained in :doc:`/labs/galore/pretraining`.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return False
    from multiprocessing import forkserver

    _context("forkserver", preload)
    forkserver.ensure_running()  # spawns the server and returns; the server imports on its own
    return True


def run_in_fresh_process(
    fn: Callable[..., Any],
    *args: Any,
    start_method: str | None = None,
    preload: Sequence[str] = DEFAULT_PRELOAD,
    timeout: float | None = None,
) -> Any:
    """``fn(*args)`` in a new child process; its return value (pickled back), or its exception.

    ``fn`` must be picklable (a module-level function). ``start_method``: ``"forkserver"``
    (default where available), ``"spawn"`` or ``"fork"``; ``timeout`` in seconds (None: wait).

    Explained in :doc:`/labs/galore/pretraining`.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    _check_timeout(timeout)
    ctx = _context(start_method, preload)
    with ctx.Pool(1, maxtasksperchild=1) as pool:  # one task, then the worker exits
        return pool.apply_async(fn, args).get(timeout)


def measure_in_fresh_process(
    spec: RunSpec, start_method: str | None = None, timeout: float | None = None
) -> RunResult:
    """:func:`measure_training` of ``spec`` in a new child process (see the module docstring).

    Explained in :doc:`/labs/galore/pretraining`.
    """
    if not isinstance(spec, RunSpec):
        raise TypeError(f"spec must be a RunSpec, got {type(spec).__name__}")
    return measure_in_fresh_processes([spec], start_method=start_method, timeout=timeout)[0]


def measure_in_fresh_processes(
    specs: Sequence[RunSpec], processes: int = 1, start_method: str | None = None, timeout: float | None = None
) -> list[RunResult]:
    """:func:`measure_training` of every spec, each in its own new child process, ``processes``
    at a time; the results in the order of ``specs``.

    Small models use two cores poorly (the tiny Llama's step is 1.25x faster on two threads
    than on one), so two one-thread runs side by side finish sooner than two two-thread runs in
    turn. With ``processes > 1`` every spec must set ``threads``, and ``threads x processes``
    must not exceed the machine's cores: oversubscribed threads make small tensor ops many times
    slower, and the runs would then measure each other. Peak RSS stays per process, so the
    baseline subtraction is unchanged; step times are those of a machine running
    ``processes`` runs. Fewer processes run at a time where :func:`mini.runtime.cpu_budget` (the
    cores this notebook may use: one each when the test harness runs two notebooks side by
    side) allows fewer; each run is alone in its process, so its results do not change.

    Explained in :doc:`/labs/galore/pretraining`.
    """
    specs = list(specs)
    if not specs or not all(isinstance(s, RunSpec) for s in specs):
        raise TypeError("specs must be a non-empty sequence of RunSpec")
    if isinstance(processes, bool) or not isinstance(processes, numbers.Integral) or processes < 1:
        raise ValueError(f"processes must be a positive integer, got {processes!r}")
    _check_timeout(timeout)
    if processes > 1:
        cores = os.cpu_count() or 1
        unset = [s.name for s in specs if s.threads is None]
        if unset:
            raise ValueError(f"with processes={processes} every spec must set threads (e.g. 1); unset in {unset}")
        over = [s.name for s in specs if s.threads * processes > cores]
        if over:
            raise ValueError(f"threads x processes exceeds the {cores} cores of this machine for {over}: "
                             "the runs would oversubscribe the CPU")
        processes = max(1, min(processes, cpu_budget() // max(s.threads for s in specs)))
    # The server preloads the first spec's modules; every child still imports its own spec's preload.
    ctx = _context(start_method, specs[0].preload)
    with ctx.Pool(processes, maxtasksperchild=1) as pool:  # each worker runs one spec, then exits
        pending = [pool.apply_async(_measure_in_child, (s,)) for s in specs]
        return [p.get(timeout) for p in pending]
