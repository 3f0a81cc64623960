"""Training LoCoCo's compressor on chunked sequences, alone (LM frozen) or jointly with LoRA.

The paper (Cai et al., ICML 2024, arXiv 2406.05317) reads each training sequence in chunks (512
tokens officially); before each chunk the cache is compressed to the budget, the chunk is run over
``[compressed cache ; chunk]``, and the chunk's LM cross-entropy is the loss. The stored cache is
detached before each compression (one-step truncation): a chunk's loss trains only the compression
that produced its memory, never the chunks before. Here:

- :func:`chunked_loss` runs one batch this way with an :class:`~mini.lm.kvcache.ExplicitLM` and any
  cache policy, and (``backward=True``) back-propagates each chunk's share of the loss as soon as
  the chunk is done, so memory holds one chunk's graph. The loss is the mean next-token
  cross-entropy over the labelled positions (``labels != -100``): every position for a corpus, the
  answer position only for the synthetic tasks of :mod:`mini.lm.longctx` (then only the last
  compression is trained, and chunks without labels run without a graph).
- :func:`train_compressor` optimises the compressors (AdamW, weight decay 0, linear decay, as the
  official code) with the LM frozen ("inference mode"), or jointly with LoRA adapters on
  ``q, k, v, o`` (``lora_rank > 0``; the paper's "post-training tuning", r 8, α 16). The official
  compressor learning rate is ``5e-5 × 1000 = 0.05`` (for a 7B model, 1000 steps, batches of 128
  sequences), kept as the default here (0.01 did not move η in 150 steps on the tiny long-context
  LM); LoRA's default is 1e-3 (tiny model; the official 5e-5 is for 7B). The official code also
  trains the embeddings and norms (learning rate × 5); here the LM stays frozen apart from LoRA.
- :func:`add_lora` puts peft's LoRA on a model in place. :class:`~mini.lm.kvcache.ExplicitLM` looks
  its projection modules up at every call, so an ExplicitLM built before or after sees the
  adapters.
- :func:`evaluate_policy`: accuracy of a policy on a task (chunked prefill with the policy, then the
  answer's logits), through :func:`mini.lm.longctx.evaluate`.
- :func:`compare_policies`: one cell of the lab's grid, every policy of :data:`POLICY_NAMES` at one
  budget, task and seed (the LoCoCo variants trained first).

Explained in :doc:`/book/lococo/theory`.
"""
from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mini.lm.kvcache import (
    H2O,
    CachePolicy,
    ExplicitLM,
    KVCache,
    StreamingLLM,
    TopLatest,
)
from mini.lm.longctx import IGNORE_INDEX, TaskBatch, evaluate

__all__ = [
    "LORA_TARGETS",
    "POLICY_NAMES",
    "add_lora",
    "chunked_loss",
    "compare_policies",
    "evaluate_policy",
    "train_compressor",
]

LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_lm(lm: Any) -> None:
    if not isinstance(lm, ExplicitLM):
        raise TypeError(f"lm must be an ExplicitLM (ExplicitLM.from_hf(model)), got {type(lm).__name__}")


def chunked_loss(lm: ExplicitLM, policy: CachePolicy | None, input_ids: Tensor, labels: Tensor, *,
                 chunk_size: int, compress_slack: int = 0, backward: bool = False) -> float:
    """Mean cross-entropy over the labelled positions of ``input_ids`` read in chunks.

    Before each chunk the cache is detached (one-step truncation) and compressed by ``policy``
    when it holds more than ``budget + compress_slack`` slots. With ``backward`` each chunk's share
    of the loss is back-propagated at once (gradients accumulate in ``.grad``); chunks without
    labels run under ``torch.no_grad``. Shapes: ``input_ids, labels (B, T)``; ``T`` must be a
    multiple of ``chunk_size`` (training reads equal chunks, as the paper).

    Explained in :doc:`/book/lococo/theory`.
    """
    _check_lm(lm)
    _check_int("chunk_size", chunk_size, 1)
    _check_int("compress_slack", compress_slack, 0)
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (B, T) tensor, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
    if not isinstance(labels, Tensor) or labels.shape != input_ids.shape:
        raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    T = input_ids.shape[1]
    if T % chunk_size:
        raise ValueError(f"the sequence length T={T} must be a multiple of chunk_size={chunk_size} "
                         f"(training reads equal chunks)")
    n_valid = int((labels != IGNORE_INDEX).sum())
    if n_valid == 0:
        raise ValueError("labels hold no position to predict (all are IGNORE_INDEX = -100)")
    cache: KVCache | None = None
    total = 0.0
    for start in range(0, T, chunk_size):
        lab = labels[:, start:start + chunk_size]
        has_labels = bool((lab != IGNORE_INDEX).any())
        with torch.set_grad_enabled(torch.is_grad_enabled() and has_labels):
            if cache is not None:
                cache = lm.maybe_compress(cache.detach(), policy, compress_slack)
            out = lm.forward(input_ids[:, start:start + chunk_size], cache)
            cache = out.cache
            if not has_labels:
                continue
            logits = out.logits  # (B, C, V) float32
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum") / n_valid
            if backward and loss.requires_grad:
                loss.backward()
            total += float(loss.detach())
    return total


def add_lora(lm: ExplicitLM, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: tuple[str, ...] = LORA_TARGETS) -> nn.Module:
    """Put peft LoRA adapters on ``targets`` of ``lm``'s model, in place; returns the peft model.

    The base weights are frozen by peft and the adapters trainable; ``lm`` (which looks its
    modules up at every call) uses the adapters from now on. Copy the model first
    (``copy.deepcopy``) to keep an untouched one.

    Explained in :doc:`/book/lococo/theory`.
    """
    _check_lm(lm)
    _check_int("rank", rank, 1)
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                     bias="none")
    return get_peft_model(lm.hf, cfg)


def _lora_params(lm: ExplicitLM) -> list[nn.Parameter]:
    return [p for n, p in lm.hf.named_parameters() if "lora_" in n]


def _batch_source(data: Any, batch_size: int, seed: int) -> Callable[[int], TaskBatch]:
    if hasattr(data, "sample"):
        return lambda step: data.sample(batch_size, np.random.default_rng([int(seed), step]))
    if callable(data):
        return data
    raise TypeError(f"data must be a task with .sample(batch_size, seed) or a callable step -> TaskBatch, "
                    f"got {type(data).__name__}")


def train_compressor(lm: ExplicitLM, policy: nn.Module, data: Any, *, steps: int, chunk_size: int,
                     batch_size: int = 16, lr: float = 5e-2, lora_rank: int = 0, lora_lr: float = 1e-3,
                     compress_slack: int = 0, seed: int = 0, grad_clip: float = 1.0,
                     log_every: int = 0) -> dict[str, Any]:
    """Train ``policy``'s parameters (a :class:`~mini.lococo.compressor.LoCoCo`) with the LM frozen,
    or jointly with LoRA on q, k, v, o when ``lora_rank > 0`` (:func:`add_lora`, in place).

    ``data``: a task (``.sample(batch_size, seed)``, e.g. :class:`mini.lm.longctx.NeedleTask`;
    step ``s`` draws with seed ``[seed, s]``) or a callable ``step -> TaskBatch``. AdamW (weight
    decay 0), learning rate decayed linearly to 0, gradients clipped to ``grad_clip``. Side
    effects: every parameter of ``lm.hf`` is set to ``requires_grad=False`` (LoRA's back to True),
    and LoRA changes the model in place (copy it first to keep the original).

    Returns ``{"losses": [...], "seconds", "etas": [...], "lora_params": n}``.

    Explained in :doc:`/book/lococo/theory`.
    """
    _check_lm(lm)
    if not isinstance(policy, nn.Module) or not hasattr(policy, "compress"):
        raise TypeError(f"policy must be a trainable cache policy (an nn.Module with compress, e.g. "
                        f"LoCoCo), got {type(policy).__name__}")
    _check_int("steps", steps, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("lora_rank", lora_rank, 0)
    for name, v in (("lr", lr), ("lora_lr", lora_lr)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    source = _batch_source(data, batch_size, seed)
    for p in lm.hf.parameters():
        p.requires_grad_(False)
    groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": lr}]
    if lora_rank:
        if not _lora_params(lm):
            add_lora(lm, rank=lora_rank, alpha=2.0 * lora_rank)
        lora = _lora_params(lm)
        for p in lora:
            p.requires_grad_(True)
        groups.append({"params": lora, "lr": lora_lr})
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("nothing to train: the policy has no trainable parameters and lora_rank is 0")
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
    policy.train()
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        batch = source(step)
        loss = chunked_loss(lm, policy, batch.input_ids, batch.labels, chunk_size=chunk_size,
                            compress_slack=compress_slack, backward=True)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss)
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}: loss {np.mean(losses[-log_every:]):.4f}")
    policy.eval()
    etas = list(getattr(policy, "etas", []))
    return {"losses": losses, "seconds": time.perf_counter() - t0, "etas": etas,
            "lora_params": sum(p.numel() for p in groups[1]["params"]) if lora_rank else 0}


def evaluate_policy(lm: ExplicitLM, policy: CachePolicy | None, task: Any, *, chunk_size: int,
                    n_examples: int = 256, seed: int = 1, batch_size: int = 32,
                    compress_slack: int = 0) -> float:
    """Accuracy of ``policy`` on ``task``: each example prefilled in chunks of ``chunk_size`` with
    the cache compressed before each chunk (``None`` = full cache), then the argmax of the answer
    position's logits (:func:`mini.lm.longctx.evaluate`; the same examples for every policy).

    Explained in :doc:`/book/lococo/theory`.
    """
    _check_lm(lm)
    _check_int("chunk_size", chunk_size, 1)
    was_training = isinstance(policy, nn.Module) and policy.training
    if isinstance(policy, nn.Module):
        policy.eval()

    def forward(ids: Tensor) -> Tensor:
        logits, _ = lm.prefill(ids, chunk_size=chunk_size, policy=policy, compress_slack=compress_slack)
        return logits  # (B, T, V)

    try:
        return evaluate(forward, task, n_examples=n_examples, seed=seed, batch_size=batch_size)
    finally:
        if was_training:
            policy.train()


POLICY_NAMES: tuple[str, ...] = ("full", "StreamingLLM", "H2O", "TopLatest", "LoCoCo untrained",
                                 "LoCoCo trained", "uniform trained")
"""The policies of :func:`compare_policies`: the full cache (ceiling), StreamingLLM (4 sinks),
H2O (accumulated attention), top-M by the latest chunk's attention, LoCoCo with its initial
convolution, LoCoCo trained, and LoCoCo with uniform mixing (η trained)."""


def compare_policies(lm: ExplicitLM, task: Any, budget: int, *, train_task: Any = None, steps: int = 150,
                     seed: int = 0, n_examples: int = 256, chunk_size: int = 64, batch_size: int = 16,
                     lr: float = 5e-2, policies: tuple[str, ...] = POLICY_NAMES
                     ) -> tuple[dict[str, float], dict[str, nn.Module]]:
    """Accuracy of each policy in ``policies`` (names from :data:`POLICY_NAMES`) on ``task`` at
    cache size ``budget``; the LoCoCo variants are initialised with ``seed`` and trained for
    ``steps`` on ``train_task`` (default ``task``) with batches seeded by ``seed``; every policy
    is evaluated on the same ``n_examples`` examples, seeded by ``100 + seed``.

    Returns ``(accuracy by name, trained policies by name)`` (the trained ones can be evaluated
    again, e.g. at a longer context).

    Explained in :doc:`/book/lococo/theory`.
    """
    _check_lm(lm)
    _check_int("budget", budget, 1)
    _check_int("seed", seed, 0)
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown or not policies:
        raise ValueError(f"policies must be a non-empty tuple of names from {POLICY_NAMES}, got {policies!r}")
    from mini.lococo.compressor import LoCoCo

    def make(name: str) -> Any:
        if name == "full":
            return None
        if name == "StreamingLLM":
            return StreamingLLM(budget, sinks=min(4, budget))
        if name == "H2O":
            return H2O(budget)
        if name == "TopLatest":
            return TopLatest(budget)
        mixing = "uniform" if name == "uniform trained" else "conv"
        policy = LoCoCo.for_model(lm, budget, seed=seed, mixing=mixing)
        if name != "LoCoCo untrained":
            train_compressor(lm, policy, train_task if train_task is not None else task, steps=steps,
                             chunk_size=chunk_size, batch_size=batch_size, lr=lr, seed=seed)
            trained[name] = policy
        return policy

    trained: dict[str, nn.Module] = {}
    acc = {name: evaluate_policy(lm, make(name), task, chunk_size=chunk_size, n_examples=n_examples,
                                 seed=100 + seed) for name in policies}
    return acc, trained
