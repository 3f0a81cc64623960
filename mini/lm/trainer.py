"""A small causal-LM training loop with validation perplexity, logging and exact-resume checkpoints.

Used by Part II, GaLore chapter (``book/galore/``) and its labs, and by every later LLM chapter.

One step: draw batch ``k`` of the seeded :class:`~mini.lm.data.BatchStream`, compute the mean
next-token cross-entropy ``L = -(1/BT) Σ log softmax(logits)[y]``, backpropagate, clip the
gradient norm (optional), ``optimizer.step()``, ``optimizer.zero_grad()``, ``scheduler.step()``.
Every ``eval_every`` steps (and after the last) the validation perplexity
``exp(mean cross-entropy)`` over fixed windows is recorded. :class:`History` holds lists the labs
plot (step, train loss, learning rate, step time, validation loss and perplexity).

**Any optimizer.** The loop needs only ``step``, ``zero_grad``, ``param_groups``, ``state_dict``
and ``load_state_dict`` of a ``torch.optim.Optimizer``: what the optimizer keeps (GaLore's
projectors, Q-GaLore's queues) is its own business, saved through its ``state_dict``.

**Per-layer updates.** With ``optimizer=None`` the loop only runs forward and backward: the
model's parameters are expected to be updated inside gradient hooks (e.g.
``register_post_accumulate_grad_hook``), so full gradients never all live at once. Gradient
clipping is then impossible (each gradient is consumed before the others exist) and is refused;
the hooks' own optimizers are checkpointed by passing them in ``extra_state``.

**Exact resume.** A checkpoint (``torch.save``; loads with ``torch.load(weights_only=True)``)
holds the model, optimizer and scheduler state dicts, the python, numpy and torch RNG states
(as lists and tensors), the data stream's position, the step, the history, and any objects in
``extra_state``. On CPU a run stopped at step s and resumed into *new* model, optimizer and
scheduler objects gives bitwise the same parameters and optimizer states as the uninterrupted
run (tested with AdamW and a cosine LambdaLR). Not bitwise: step times, and runs on a different
thread count or BLAS.

Explained in :doc:`/book/part2`.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mini.lm.data import BatchStream, LMData, eval_batches
from mini.runtime import resolve_device

__all__ = [
    "TrainerConfig",
    "History",
    "train_lm",
    "evaluate_lm",
    "model_device",
    "place_model",
    "lm_loss",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "get_rng_state",
    "set_rng_state",
]


@dataclass
class TrainerConfig:
    """Settings of :func:`train_lm` (defaults: the book's fast CPU run, not a paper recipe).

    Explained in :doc:`/book/part2`.
    """

    steps: int = 200  #: total optimizer steps (a resumed run continues up to this)
    batch_size: int = 8  #: sequences per step
    seq_len: int = 64  #: tokens per sequence
    eval_every: int = 50  #: validation every this many steps (and after the last)
    eval_batches: int = 4  #: validation batches of ``batch_size`` fixed windows
    log_every: int = 10  #: progress-bar refresh period; every step is recorded in History
    grad_clip: float | None = 1.0  #: max global gradient norm (None or 0 means no clipping)
    seed: int = 0  #: seeds torch/numpy/python at the start and the batch stream
    progress: bool = True  #: tqdm progress bar
    checkpoint_dir: str | None = None  #: where ``step_XXXXXX.pt`` files go
    checkpoint_every: int | None = None  #: checkpoint period in steps (None means none)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.grad_clip is not None and not (self.grad_clip >= 0):
            raise ValueError(f"grad_clip must be None or >= 0, got {self.grad_clip!r}")
        if self.checkpoint_every is not None:
            v = self.checkpoint_every
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"checkpoint_every must be None or a positive integer, got {v!r}")
            if self.checkpoint_dir is None:
                raise ValueError("checkpoint_every needs checkpoint_dir to be set")


@dataclass
class History:
    """Per-step and per-evaluation records of a run (plain lists, ready to plot).

    Explained in :doc:`/book/part2`.
    """

    step: list[int] = field(default_factory=list)  #: 1-based step numbers
    train_loss: list[float] = field(default_factory=list)  #: mean cross-entropy (nats/token)
    lr: list[float] = field(default_factory=list)  #: learning rate of the first group used
    step_time: list[float] = field(default_factory=list)  #: wall seconds of the step
    val_step: list[int] = field(default_factory=list)  #: steps at which validation ran
    val_loss: list[float] = field(default_factory=list)  #: validation cross-entropy
    val_ppl: list[float] = field(default_factory=list)  #: exp(val_loss)

    def to_dict(self) -> dict[str, list]:
        """The lists by field name (what a checkpoint or a results file stores)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, list]) -> "History":
        """The history :meth:`to_dict` wrote."""
        return cls(**{f.name: list(d[f.name]) for f in dataclasses.fields(cls)})


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on inputs ``x`` and targets ``y`` (B, T).

    Explained in :doc:`/book/part2`.
    """
    logits = model(input_ids=x).logits  # (B, T, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); the CPU for a module without tensors.

    Explained in :doc:`/book/part2`.
    """
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def place_model(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    """Move ``model`` to ``device`` (checked by :func:`mini.runtime.resolve_device`) and return
    where it now is; ``device=None`` leaves it where it is. ``Module.to`` keeps the parameter
    objects where it can swap their data (CPU and CUDA) and makes new ones where it cannot (to
    ``"meta"``): build optimizers after the move.

    Explained in :doc:`/book/part2`.
    """
    dev = resolve_device(device)
    if dev is not None:
        model.to(dev)
    return model_device(model)


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: str | torch.device | None = None,
) -> float:
    """Token-weighted mean cross-entropy over ``batches`` (model put back in its mode after).

    ``device``: move the model there first (None: leave it where it is); the batches go to the
    model's device, and only the per-batch loss comes back (``.item()``).

    Explained in :doc:`/book/part2`.
    """
    dev = place_model(model, device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(dev), y.to(dev)  # (B, T) each; no copy where they already are
        total += lm_loss(model, x, y).item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count


def get_rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as lists/tensors (loadable with ``weights_only=True``).

    Explained in :doc:`/book/part2`.
    """
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned.

    Explained in :doc:`/book/part2`.
    """
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    stream: BatchStream,
    step: int,
    history: History,
    extra_state: Mapping[str, Any] | None = None,
) -> None:
    """Write everything a bitwise-exact resume needs to ``path`` with ``torch.save``.

    Explained in :doc:`/book/part2`.
    """
    ckpt = {
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": get_rng_state(),
        "data": stream.state_dict(),
        "history": history.to_dict(),
        "extra": {k: v.state_dict() for k, v in (extra_state or {}).items()},
    }
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    tmp = os.fspath(path) + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict at ``path`` (``torch.load(weights_only=True)``, on CPU).

    Explained in :doc:`/book/part2`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resume_from {path!r} is not an existing checkpoint file")
    return torch.load(path, map_location="cpu", weights_only=True)


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> str | None:
    """The ``step_XXXXXX.pt`` file with the highest step in a directory, or None.

    Explained in :doc:`/book/part2`.
    """
    d = os.fspath(checkpoint_dir)
    if not os.path.isdir(d):
        return None
    files = sorted(f for f in os.listdir(d) if f.startswith("step_") and f.endswith(".pt"))
    return os.path.join(d, files[-1]) if files else None


def _current_lr(optimizer: torch.optim.Optimizer | None, scheduler: Any | None) -> float:
    if optimizer is not None:
        return float(optimizer.param_groups[0]["lr"])
    if scheduler is not None and hasattr(scheduler, "get_last_lr"):
        return float(scheduler.get_last_lr()[0])
    return math.nan


def train_lm(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    data: LMData,
    config: TrainerConfig | None = None,
    scheduler: Any | None = None,
    resume_from: str | os.PathLike | None = None,
    extra_state: Mapping[str, Any] | None = None,
    on_gradients: Callable[[int, torch.nn.Module], None] | None = None,
    device: str | torch.device | None = None,
) -> History:
    """Train ``model`` on ``data`` for ``config.steps`` steps; return the :class:`History`.

    ``optimizer=None``: parameters are updated in gradient hooks (see the module docstring).
    ``resume_from``: a checkpoint written by this function; the run continues from its step with
    the saved model, optimizer, scheduler, RNG, data position and history (the objects passed
    in are overwritten). ``extra_state``: name → object with ``state_dict``/``load_state_dict``
    saved and restored alongside (e.g. per-layer optimizers). ``on_gradients(step, model)``:
    called after ``backward`` and before the optimizer step, while every ``.grad`` is alive (not
    with per-layer hook updates, whose hooks consume the gradients during ``backward``); e.g. a
    :class:`~mini.lm.spectra.GradientSpectrumRecorder` measuring the gradients' stable rank.
    ``device``: ``"cpu"``, ``"cuda"`` or ``"meta"`` (:func:`mini.runtime.resolve_device`); the
    model is moved there in place and every batch follows it; None trains where the model already
    is. Build the optimizer once the model is on its device: a move that makes new parameter
    objects (as ``Module.to("meta")`` does) would leave it holding the old ones, and is refused
    with a ValueError. The batches are drawn on the CPU either way, so a seed gives the same
    batches on every device; what comes back per step is the loss (``.item()``, which also
    waits for the device, so ``step_time`` is the step's true time). Exact resume is CPU-only
    (the CUDA generators are not saved).

    Explained in :doc:`/book/part2`.
    """
    dev = resolve_device(device)
    config = config or TrainerConfig()
    if not isinstance(config, TrainerConfig):
        raise TypeError(f"config must be a TrainerConfig, got {type(config).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None (per-layer hook updates), "
            f"got {type(optimizer).__name__}"
        )
    if not isinstance(data, LMData):
        raise TypeError(f"data must be an LMData, got {type(data).__name__}")
    if on_gradients is not None and not callable(on_gradients):
        raise TypeError(f"on_gradients must be callable or None, got {type(on_gradients).__name__}")
    if optimizer is None and on_gradients is not None:
        raise ValueError(
            "on_gradients must be None when optimizer is None: per-layer hook updates free each "
            "gradient during backward, so none is left to inspect"
        )
    if optimizer is None and config.grad_clip:
        raise ValueError(
            f"grad_clip must be None or 0 when optimizer is None (per-layer hook updates consume "
            f"each gradient before the others exist), got {config.grad_clip!r}"
        )
    from tqdm.auto import tqdm

    before = {id(p) for p in model.parameters()}
    dev = place_model(model, dev)
    replaced = before - {id(p) for p in model.parameters()}  # Module.to made new parameter objects
    if optimizer is not None and any(id(p) in replaced for g in optimizer.param_groups for p in g["params"]):
        raise ValueError(
            f"device={device!r}: moving the model there replaced its parameter objects, and the optimizer "
            "still holds the old ones; build the optimizer after moving the model (model.to(device) first, "
            "or mini.pretraining.setup_method(..., device=device))"
        )
    stream = BatchStream(data.train_ids, config.batch_size, config.seq_len, seed=config.seed)
    val = [(x.to(dev), y.to(dev)) for x, y in  # (B, T) each, moved once
           eval_batches(data.val_ids, config.batch_size, config.seq_len, config.eval_batches)]
    history = History()
    start = 0
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        model.load_state_dict(ckpt["model"])
        if (ckpt["optimizer"] is None) != (optimizer is None):
            raise ValueError("optimizer must be None exactly when the checkpoint's optimizer was None")
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            if ckpt["scheduler"] is None:
                raise ValueError("scheduler was given but the checkpoint holds no scheduler state")
            scheduler.load_state_dict(ckpt["scheduler"])
        for name, obj in (extra_state or {}).items():
            if name not in ckpt["extra"]:
                raise ValueError(
                    f"extra_state key {name!r} is not in the checkpoint, which holds "
                    f"{sorted(ckpt['extra'])}"
                )
            obj.load_state_dict(ckpt["extra"][name])
        stream.load_state_dict(ckpt["data"])
        history = History.from_dict(ckpt["history"])
        start = int(ckpt["step"])
        set_rng_state(ckpt["rng"])
    else:
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)

    def checkpoint(step: int) -> None:
        save_checkpoint(
            os.path.join(config.checkpoint_dir, f"step_{step:06d}.pt"), model=model,
            optimizer=optimizer, scheduler=scheduler, stream=stream, step=step,
            history=history, extra_state=extra_state,
        )

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps,
               disable=not config.progress, desc="train", leave=False)
    for i in bar:
        step = i + 1
        t0 = time.perf_counter()
        lr = _current_lr(optimizer, scheduler)
        x, y = next(stream)  # (B, T), (B, T), drawn on the CPU
        x, y = x.to(dev), y.to(dev)  # no copy where they already are
        loss = lm_loss(model, x, y)
        loss.backward()
        if on_gradients is not None:
            on_gradients(step, model)
        if optimizer is not None:
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)  # hooks normally free them already
        if scheduler is not None:
            scheduler.step()
        history.step.append(step)
        history.train_loss.append(loss.item())
        history.lr.append(lr)
        history.step_time.append(time.perf_counter() - t0)
        if step % config.eval_every == 0 or step == config.steps:
            v = evaluate_lm(model, val)
            history.val_step.append(step)
            history.val_loss.append(v)
            history.val_ppl.append(math.exp(v))
        if step % config.log_every == 0 or step == config.steps:
            post = {"loss": f"{history.train_loss[-1]:.3f}"}
            if history.val_ppl:
                post["val_ppl"] = f"{history.val_ppl[-1]:.2f}"
            bar.set_postfix(post)
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            checkpoint(step)
    bar.close()
    return history
