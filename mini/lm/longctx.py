"""Synthetic long-context tasks for the tiny RoPE LMs of LoCoCo and TriForce, made by code.

Used by Part III, LoCoCo chapter (``book/lococo/``) and TriForce chapter (``book/triforce/``),
and by the assets ``longctx-lm``, ``triforce-target`` and ``triforce-draft`` (:mod:`mini.assets`).

A fixed-size KV cache must forget; what it may forget depends on the question. Three tasks, each
seeded (numpy ``default_rng``, stable across platforms) and answerable only from the context:

- :class:`NeedleTask` (retrieval): ``n_pairs`` key→value pairs (two adjacent tokens ``k v``)
  scattered in uniform noise over ``context_len`` tokens; the sequence ends with
  ``NEEDLE_Q k_q`` and the answer is the value that followed ``k_q``. One token anywhere in the
  context decides the answer: a cache that dropped it cannot recover it.
- :class:`MajorityTask` (aggregate): ``n_votes`` vote symbols (a few dedicated tokens) scattered
  in noise; the sequence ends with ``MAJ_Q`` and the answer is the symbol that occurs most often
  (ties are redrawn). Every vote matters a little: a blend of them is the right summary.
- :class:`TopicTask` (TriForce's "per-document topic language"): each document draws one of
  ``n_topics`` topics, each a bigram (Markov) distribution over a small vocabulary; the document
  is a chain from that topic. The continuation's law depends on the prompt through the topic, so a
  model that reads the whole prompt predicts better than one that reads the last tokens.

Needle and majority share one vocabulary (:class:`LongContextVocab`), so one LM learns both and
the query token says which question is asked. A batch is a :class:`TaskBatch`: ``input_ids``
(B, T) starting with ``BOS``, next-token ``labels`` (B, T) with ``-100`` where the next token is
noise, and per example the ``answer_pos`` (the position whose logits predict the answer, the last
one) and the ``answer``. :func:`evaluate` computes accuracy as the argmax of the logits at the
answer position, for any ``model_forward(input_ids) -> logits`` (a full forward or a compressed-
cache prefill alike). :func:`train_task_lm` trains a ``LlamaForCausalLM`` on a mixture of tasks.

Explained in :doc:`/book/lococo/theory`.
"""
from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "LongContextVocab",
    "MajorityTask",
    "NeedleTask",
    "TaskBatch",
    "TopicTask",
    "evaluate",
    "task_loss",
    "train_task_lm",
]

IGNORE_INDEX = -100
"""The label of a position whose next token cannot be predicted (noise); the loss ignores it."""


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or a numpy Generator, got {seed!r}")
    return np.random.default_rng(int(seed))


@dataclass(frozen=True)
class TaskBatch:
    """A batch of task examples (all tensors on the CPU).

    Explained in :doc:`/book/lococo/theory`.
    """

    input_ids: torch.Tensor  #: (B, T) long, each row starts with BOS
    labels: torch.Tensor  #: (B, T) long, next-token targets, IGNORE_INDEX where unpredictable
    answer_pos: torch.Tensor  #: (B,) long, position whose logits predict the answer
    answer: torch.Tensor  #: (B,) long, the answer token

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass(frozen=True)
class LongContextVocab:
    """Token layout shared by :class:`NeedleTask` and :class:`MajorityTask`.

    ids: 0 ``BOS``, 1 ``NEEDLE_Q``, 2 ``MAJ_Q``, then ``n_noise`` noise tokens, ``n_keys`` keys,
    ``n_values`` values, ``n_keys · n_values`` pair tokens (pair ``(k, v)`` is one token, id
    ``pairs.start + k · n_values + v``), ``n_symbols`` vote symbols; ``vocab_size`` may leave unused
    ids at the end. A pair is one token so that one attention hop retrieves it (a tiny LM learns that
    in seconds; the two-token ``k v`` form needs an induction circuit that takes far longer), and so
    that one cache slot holds the whole needle.

    Explained in :doc:`/book/lococo/theory`.
    """

    n_noise: int = 16  #: filler tokens (uniform noise)
    n_keys: int = 8  #: needle keys
    n_values: int = 8  #: needle values (the answers)
    n_symbols: int = 4  #: majority-vote symbols
    vocab_size: int = 128  #: the model's vocabulary (>= the ids used)

    BOS = 0
    NEEDLE_Q = 1
    MAJ_Q = 2

    def __post_init__(self) -> None:
        _check_int("n_noise", self.n_noise, 1)
        _check_int("n_keys", self.n_keys, 1)
        _check_int("n_values", self.n_values, 2)
        _check_int("n_symbols", self.n_symbols, 2)
        if self.vocab_size < self.n_used:
            raise ValueError(f"vocab_size must be >= {self.n_used} (3 special + {self.n_noise} noise + "
                             f"{self.n_keys} keys + {self.n_values} values + {self.n_keys * self.n_values} "
                             f"pairs + {self.n_symbols} symbols), got {self.vocab_size!r}")

    @property
    def n_used(self) -> int:
        """Number of ids the tasks use."""
        return 3 + self.n_noise + self.n_keys + self.n_values + self.n_keys * self.n_values + self.n_symbols

    @property
    def noise(self) -> range:
        return range(3, 3 + self.n_noise)

    @property
    def keys(self) -> range:
        return range(self.noise.stop, self.noise.stop + self.n_keys)

    @property
    def values(self) -> range:
        return range(self.keys.stop, self.keys.stop + self.n_values)

    @property
    def pairs(self) -> range:
        return range(self.values.stop, self.values.stop + self.n_keys * self.n_values)

    @property
    def symbols(self) -> range:
        return range(self.pairs.stop, self.pairs.stop + self.n_symbols)


def _noise(rng: np.random.Generator, vocab: LongContextVocab, n: int) -> np.ndarray:
    return rng.integers(vocab.noise.start, vocab.noise.stop, size=n)


@dataclass(frozen=True)
class NeedleTask:
    """Retrieval: ``n_pairs`` key→value pairs in noise; ``NEEDLE_Q k`` at the end asks for k's value.

    Layout of one example of length ``context_len``: ``BOS``, noise with ``n_pairs`` pair tokens
    ``(k, v)`` (distinct keys, random values) at random distinct places, then ``NEEDLE_Q k_q``; the
    answer is the value token ``v_q``, predicted at the last position. The queried pair is uniform
    among the pairs, so its depth is uniform over the context. With ``n_queries > 1`` (training),
    ``NEEDLE_Q k v`` is repeated before the final query, labels at each ``k``.

    Explained in :doc:`/book/lococo/theory`.
    """

    context_len: int = 512  #: tokens per example, query included
    n_pairs: int = 8  #: key→value pairs per example
    vocab: LongContextVocab = field(default_factory=LongContextVocab)  #: the token layout
    n_queries: int = 1  #: queries at the end (more give more training signal per example)

    def __post_init__(self) -> None:
        _check_int("context_len", self.context_len, 3)
        _check_int("n_pairs", self.n_pairs, 1)
        _check_int("n_queries", self.n_queries, 1)
        if self.n_pairs > self.vocab.n_keys:
            raise ValueError(f"n_pairs must be <= vocab.n_keys = {self.vocab.n_keys} (keys are distinct), "
                             f"got {self.n_pairs}")
        if 1 + self.n_pairs + 3 * self.n_queries - 1 > self.context_len:
            raise ValueError(f"context_len {self.context_len} is too short for n_pairs={self.n_pairs} and "
                             f"n_queries={self.n_queries}: it needs BOS + one token per pair + 3 per query "
                             f"- 1, so context_len >= {self.n_pairs + 3 * self.n_queries}")

    def sample(self, batch_size: int, seed: int | np.random.Generator = 0) -> TaskBatch:
        """``batch_size`` examples; the same seed gives the same batch on every machine."""
        B, T, v = _check_int("batch_size", batch_size, 1), self.context_len, self.vocab
        rng = _rng(seed)
        ids = np.empty((B, T), dtype=np.int64)
        labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        answer = np.empty(B, dtype=np.int64)
        tail = 3 * self.n_queries - 1  # query tokens at the end
        for b in range(B):
            row = np.concatenate([[v.BOS], _noise(rng, v, T - 1)])
            keys = rng.choice(v.n_keys, size=self.n_pairs, replace=False)
            vals = rng.integers(0, v.n_values, size=self.n_pairs)
            pos = 1 + rng.choice(T - 1 - tail, size=self.n_pairs, replace=False)
            row[pos] = v.pairs.start + keys * v.n_values + vals
            qs = rng.integers(self.n_pairs, size=self.n_queries)
            for j, q in enumerate(qs):  # NEEDLE_Q k v ... NEEDLE_Q k_q
                p = T - tail + 3 * j
                row[p], row[p + 1] = v.NEEDLE_Q, v.keys.start + keys[q]
                labels[b, p + 1] = v.values.start + vals[q]
                if p + 2 < T:
                    row[p + 2] = v.values.start + vals[q]
            ids[b], answer[b] = row, v.values.start + vals[qs[-1]]
        return _batch(ids, labels, answer)

    def oracle(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The answers found by brute force: the value of the pair token with the queried key. (B,)"""
        v = self.vocab
        out = []
        for row in input_ids.tolist():
            key, end = row[-1] - v.keys.start, row.index(v.NEEDLE_Q)  # the context ends at the first query
            hits = [(t - v.pairs.start) % v.n_values for t in row[:end]
                    if t in v.pairs and (t - v.pairs.start) // v.n_values == key]
            if len(hits) != 1:
                raise ValueError(f"the queried key {key} occurs {len(hits)} times in the context, not once")
            out.append(v.values.start + hits[0])
        return torch.tensor(out, dtype=torch.long)


@dataclass(frozen=True)
class MajorityTask:
    """Aggregate: ``n_votes`` vote symbols in noise; ``MAJ_Q`` at the end asks which is most frequent.

    Votes are drawn uniformly over ``vocab.n_symbols`` symbols and redrawn until the most frequent
    one is unique, then placed at random distinct positions among ``1 .. context_len - 2``.

    Explained in :doc:`/book/lococo/theory`.
    """

    context_len: int = 512  #: tokens per example, query included
    n_votes: int = 24  #: vote symbols per example
    vocab: LongContextVocab = field(default_factory=LongContextVocab)  #: the token layout

    def __post_init__(self) -> None:
        _check_int("context_len", self.context_len, 3)
        _check_int("n_votes", self.n_votes, 1)
        if self.n_votes > self.context_len - 2:
            raise ValueError(f"context_len {self.context_len} is too short for n_votes={self.n_votes}: it "
                             f"needs BOS + one token per vote + the query, so context_len >= {self.n_votes + 2}")

    def sample(self, batch_size: int, seed: int | np.random.Generator = 0) -> TaskBatch:
        """``batch_size`` examples; the same seed gives the same batch on every machine."""
        B, T, v = _check_int("batch_size", batch_size, 1), self.context_len, self.vocab
        rng = _rng(seed)
        ids = np.empty((B, T), dtype=np.int64)
        labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        answer = np.empty(B, dtype=np.int64)
        for b in range(B):
            while True:
                votes = rng.integers(0, v.n_symbols, size=self.n_votes)
                counts = np.bincount(votes, minlength=v.n_symbols)
                if (counts == counts.max()).sum() == 1:
                    break
            row = np.concatenate([[v.BOS], _noise(rng, v, T - 1)])
            pos = 1 + rng.choice(T - 2, size=self.n_votes, replace=False)
            row[pos] = votes + v.symbols.start
            row[T - 1] = v.MAJ_Q
            ans = int(counts.argmax()) + v.symbols.start
            ids[b], answer[b], labels[b, T - 1] = row, ans, ans
        return _batch(ids, labels, answer)

    def oracle(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The answers found by brute force: the most frequent symbol in each row. (B,)"""
        syms = list(self.vocab.symbols)
        out = []
        for row in input_ids.tolist():
            counts = [row.count(s) for s in syms]
            out.append(syms[counts.index(max(counts))])
        return torch.tensor(out, dtype=torch.long)


@dataclass(frozen=True)
class TopicTask:
    """TriForce's per-document topic language: a topic per document, a bigram chain per topic.

    Token 0 is ``BOS``; symbols are ``1 .. vocab_size - 1``. Topic ``t`` has a transition matrix
    ``P_t`` (rows drawn from Dirichlet(``concentration``), seeded by ``topic_seed``: the *language*,
    fixed), a document draws ``t`` uniformly, its first symbol uniformly, then ``x_{i+1} ~ P_t[x_i]``.
    All positions are predictable (labels everywhere); ``answer_pos``/``answer`` are the last
    position and the next symbol drawn from the chain (the first token of the continuation).

    Explained in :doc:`/book/triforce/theory`.
    """

    context_len: int = 256  #: tokens per document, BOS included
    vocab_size: int = 16  #: BOS + vocab_size - 1 symbols
    n_topics: int = 8  #: topics of the language
    concentration: float = 0.3  #: Dirichlet parameter of each row; small values give peaked rows and distinct topics
    topic_seed: int = 0  #: seeds the topics' transition matrices

    def __post_init__(self) -> None:
        _check_int("context_len", self.context_len, 2)
        _check_int("vocab_size", self.vocab_size, 3)
        _check_int("n_topics", self.n_topics, 1)
        _check_int("topic_seed", self.topic_seed, 0)
        if not (isinstance(self.concentration, numbers.Real) and self.concentration > 0):
            raise ValueError(f"concentration must be a positive number, got {self.concentration!r}")

    @property
    def transitions(self) -> torch.Tensor:
        """The topics' bigram laws, a float64 tensor of shape ``(n_topics, vocab_size, vocab_size)``.

        Row ``P_t[x]`` is the law of the next token after ``x`` under topic ``t``; BOS gets
        probability 0, and BOS's row is uniform over the symbols.
        """
        rng = np.random.default_rng(self.topic_seed)
        S = self.vocab_size - 1
        P = np.zeros((self.n_topics, self.vocab_size, self.vocab_size))
        P[:, 1:, 1:] = rng.dirichlet(np.full(S, float(self.concentration)), size=(self.n_topics, S))
        P[:, 0, 1:] = 1.0 / S
        return torch.from_numpy(P)

    def sample(self, batch_size: int, seed: int | np.random.Generator = 0,
               return_topics: bool = False) -> TaskBatch | tuple[TaskBatch, torch.Tensor]:
        """``batch_size`` documents (and their topics (B,) with ``return_topics``)."""
        B, T = _check_int("batch_size", batch_size, 1), self.context_len
        rng = _rng(seed)
        P = self.transitions.numpy()
        cum = np.cumsum(P, axis=-1)  # (n_topics, V, V)
        topics = rng.integers(self.n_topics, size=B)
        seq = np.zeros((B, T + 1), dtype=np.int64)  # one extra token: the continuation's first
        u = rng.random((B, T))
        for i in range(T):
            c = cum[topics, seq[:, i]]  # (B, V)
            seq[:, i + 1] = np.minimum((u[:, i:i + 1] > c).sum(axis=1), self.vocab_size - 1)
        batch = _batch(seq[:, :T], seq[:, 1:].copy(), seq[:, T])
        return (batch, torch.from_numpy(topics)) if return_topics else batch

    def oracle_loss(self, batch: TaskBatch, topics: torch.Tensor) -> float:
        """Mean cross-entropy of the true chain with the topic known: the floor no model beats."""
        P = self.transitions  # (n_topics, V, V)
        p = P[topics[:, None], batch.input_ids, batch.labels]  # (B, T)
        return float(-p.log().mean())


def _batch(ids: np.ndarray, labels: np.ndarray, answer: np.ndarray) -> TaskBatch:
    B, T = ids.shape
    return TaskBatch(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels),
                     answer_pos=torch.full((B,), T - 1, dtype=torch.long),
                     answer=torch.from_numpy(np.asarray(answer, dtype=np.int64)))


Task = NeedleTask | MajorityTask | TopicTask


@torch.no_grad()
def evaluate(model_forward: Callable[[torch.Tensor], torch.Tensor], task: Task, n_examples: int = 256,
             seed: int = 1, batch_size: int = 32) -> float:
    """Accuracy: fraction of examples whose argmax logit at ``answer_pos`` is the answer.

    ``model_forward(input_ids (B, T)) -> logits (B, T, V)`` or ``(B, V)`` (the last position's
    logits, e.g. from a chunked prefill with a compressed cache). Examples come from
    ``task.sample(batch_size, seed=[seed, i])`` for batch i, so every method sees the same ones.

    Explained in :doc:`/book/lococo/theory`.
    """
    _check_int("n_examples", n_examples, 1)
    _check_int("batch_size", batch_size, 1)
    correct = 0
    for i in range(math.ceil(n_examples / batch_size)):
        bs = min(batch_size, n_examples - i * batch_size)
        batch = task.sample(bs, np.random.default_rng([int(seed), i]))
        logits = model_forward(batch.input_ids)
        if logits.dim() == 3:  # (B, T, V) -> (B, V) at the answer position
            logits = logits[torch.arange(bs), batch.answer_pos.to(logits.device)]
        if logits.dim() != 2 or logits.shape[0] != bs:
            raise ValueError(f"model_forward must return logits (B, T, V) or (B, V) with B={bs}, "
                             f"got shape {tuple(logits.shape)}")
        correct += int((logits.argmax(-1).cpu() == batch.answer).sum())
    return correct / n_examples


def task_loss(model: torch.nn.Module, batch: TaskBatch) -> torch.Tensor:
    """Mean next-token cross-entropy over the predictable positions (labels != IGNORE_INDEX).

    Explained in :doc:`/book/lococo/theory`.
    """
    logits = model(input_ids=batch.input_ids).logits  # (B, T, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch.labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def train_task_lm(model: torch.nn.Module, tasks: Sequence[Task], steps: int, batch_size: int = 16,
                  lr: float = 3e-3, weight_decay: float = 0.0, warmup: int = 20, seed: int = 0,
                  grad_clip: float = 1.0) -> dict[str, float]:
    """Train ``model`` with AdamW (linear warmup, cosine decay) on batches that cycle through
    ``tasks`` (step s draws from ``tasks[s % len(tasks)]`` with seed ``[seed, s]``); returns
    ``{"train_seconds", "final_train_loss"}``.

    Explained in :doc:`/book/lococo/theory`.
    """
    _check_int("steps", steps, 1)
    if not tasks:
        raise ValueError("tasks must hold at least one task, got none")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    t0, losses = time.perf_counter(), []
    for s in range(steps):
        batch = tasks[s % len(tasks)].sample(batch_size, np.random.default_rng([int(seed), s]))
        loss = task_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return {"train_seconds": time.perf_counter() - t0, "final_train_loss": float(np.mean(tail))}
