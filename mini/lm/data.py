"""Text, tokenizer and batches for the tiny Llama: a corpus made by code, and real loading paths.

Used by Part II, GaLore chapter (``book/galore/``) and its labs, and by every later LLM chapter.

**The corpus needs no download.** :func:`generate_corpus` writes documents from a small
probabilistic grammar with structure a 1M-parameter model can learn step by step:

- English-like sentences with number agreement between the head noun and its verb, across a
  prepositional phrase or a relative clause (``the cat near the dogs sleeps .``,
  ``two foxes that a child sees run .``), and determiners that agree in number
  (``a`` singular, ``two``/``many`` plural);
- arithmetic facts that are always true (``17 + 25 = 42 .``, ``7 * 8 = 56 .``, ``9 - 4 = 5 .``);
- balanced nested brackets of four kinds (``brackets ( [ { } ] < > ) .``).

Every document is drawn from ``random.Random(seed)`` only through ``random()``, ``randrange`` and
``choice``, whose sequences Python keeps stable across versions and platforms, so a seed gives
the same text everywhere (a test pins a hash of it). Validation perplexity of the tiny model
drops from about the vocabulary size (uniform guessing) to a few units per character within
a few hundred steps (a test asserts a clear drop in 30 steps).

**Tokenizer.** :class:`CharTokenizer` maps characters to ids; it is built from a text
(``from_text``), so it is deterministic, needs no files and round-trips every string over its
alphabet. Id 0 is reserved for characters outside the alphabet (decoded as ``"\\ufffd"``).
Character-level tokens keep the vocabulary (and so the embedding and head) tiny, which leaves
most of the tiny model's parameters in the projected matrices, as in the paper's models.

**Real text.** :func:`load_text_file` reads a user's file; :func:`load_hf_dataset` calls
``datasets.load_dataset`` (a Hub name when online, or a local builder such as
``load_hf_dataset("text", data_files="my.txt")``) and returns the documents of one text column.

**Batches.** :class:`BatchStream` draws random windows of ``seq_len + 1`` tokens; batch number k
comes from a generator seeded with ``(seed, k)``, so the stream's whole state is its position,
which a checkpoint stores: a resumed run sees the same batches as an uninterrupted one.
Validation uses fixed consecutive windows (:func:`eval_batches`).

Explained in :doc:`/book/part2`.
"""
from __future__ import annotations

import numbers
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "generate_corpus",
    "CharTokenizer",
    "load_text_file",
    "load_hf_dataset",
    "split_documents",
    "sample_batch",
    "BatchStream",
    "eval_batches",
    "LMData",
    "synthetic_lm_data",
]

# --------------------------------------------------------------------------- the grammar

_NOUNS = [  # (singular, plural)
    ("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("child", "children"),
    ("mouse", "mice"), ("fox", "foxes"), ("teacher", "teachers"), ("horse", "horses"),
]
_INTRANSITIVE = [("sleeps", "sleep"), ("runs", "run"), ("sings", "sing"), ("waits", "wait")]
_TRANSITIVE = [("sees", "see"), ("likes", "like"), ("chases", "chase"), ("finds", "find")]
_ADJECTIVES = ["small", "big", "red", "quiet", "old"]
_PREPOSITIONS = ["near", "behind", "with", "under"]
_BRACKETS = ["()", "[]", "{}", "<>"]


def _noun_phrase(rng: random.Random, plural: bool) -> str:
    det = rng.choice(["the", "two", "many"] if plural else ["the", "a"])
    words = [det]
    if rng.random() < 0.4:
        words.append(rng.choice(_ADJECTIVES))
    words.append(rng.choice(_NOUNS)[int(plural)])
    return " ".join(words)


def _sentence(rng: random.Random) -> str:
    plural = rng.random() < 0.5
    subject = _noun_phrase(rng, plural)
    r = rng.random()
    if r < 0.3:  # prepositional phrase between subject and verb: agreement at a distance
        subject += f" {rng.choice(_PREPOSITIONS)} {_noun_phrase(rng, rng.random() < 0.5)}"
    elif r < 0.5:  # object relative clause: the inner verb agrees with the inner subject
        inner_plural = rng.random() < 0.5
        inner = _noun_phrase(rng, inner_plural)
        subject += f" that {inner} {rng.choice(_TRANSITIVE)[int(inner_plural)]}"
    if rng.random() < 0.5:
        verb = rng.choice(_INTRANSITIVE)[int(plural)]
        return f"{subject} {verb} ."
    verb = rng.choice(_TRANSITIVE)[int(plural)]
    return f"{subject} {verb} {_noun_phrase(rng, rng.random() < 0.5)} ."


def _arithmetic(rng: random.Random) -> str:
    op = rng.choice("+*-")
    if op == "+":
        a, b = rng.randrange(50), rng.randrange(50)
        return f"{a} + {b} = {a + b} ."
    if op == "*":
        a, b = rng.randrange(13), rng.randrange(13)
        return f"{a} * {b} = {a * b} ."
    a, b = rng.randrange(50), rng.randrange(50)
    a, b = max(a, b), min(a, b)
    return f"{a} - {b} = {a - b} ."


def _brackets(rng: random.Random, depth: int = 0) -> str:
    parts = []
    for _ in range(1 + rng.randrange(2 if depth else 3)):
        open_, close = rng.choice(_BRACKETS)
        inner = _brackets(rng, depth + 1) if depth < 3 and rng.random() < 0.6 else ""
        parts.append(f"{open_} {inner}{close}" if not inner else f"{open_} {inner} {close}")
    return " ".join(parts)


def generate_corpus(n_documents: int = 2000, seed: int = 0) -> list[str]:
    """``n_documents`` one-line documents of 3 to 6 sentences, deterministic in ``seed``.

    Each sentence is an agreement sentence (60%), an arithmetic fact (25%) or a bracket
    string (15%); see the module docstring.

    Explained in :doc:`/book/part2`.
    """
    if isinstance(n_documents, bool) or not isinstance(n_documents, numbers.Integral) or n_documents < 1:
        raise ValueError(f"n_documents must be a positive integer, got {n_documents!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    rng = random.Random(int(seed))
    docs = []
    for _ in range(int(n_documents)):
        sentences = []
        for _ in range(3 + rng.randrange(4)):
            r = rng.random()
            if r < 0.6:
                sentences.append(_sentence(rng))
            elif r < 0.85:
                sentences.append(_arithmetic(rng))
            else:
                sentences.append(f"brackets {_brackets(rng)} .")
        docs.append(" ".join(sentences))
    return docs


# --------------------------------------------------------------------------- tokenizer


class CharTokenizer:
    """Character-level tokenizer: id 0 is the unknown character, then the alphabet in order.

    ``encode(decode(ids)) == ids`` for ids of the alphabet, and ``decode(encode(s)) == s`` for
    every string over it.

    Explained in :doc:`/book/part2`.
    """

    UNK = "\ufffd"  #: the unknown character (id 0), reserved, so no alphabet may contain it

    def __init__(self, alphabet: Iterable[str]):
        chars = list(alphabet)
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("alphabet must be an iterable of single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("alphabet must not repeat a character")
        if self.UNK in chars:
            raise ValueError(f"alphabet must not contain the reserved unknown character {self.UNK!r}")
        self.chars: list[str] = [self.UNK, *chars]
        self._index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str | Iterable[str]) -> "CharTokenizer":
        """The tokenizer of the sorted set of characters of ``text`` (a string or documents)."""
        if isinstance(text, str):
            text = [text]
        alphabet: set[str] = set()
        for t in text:
            alphabet.update(t)
        alphabet.add("\n")  # the document separator of LMData
        alphabet.discard(cls.UNK)
        return cls(sorted(alphabet))

    @property
    def vocab_size(self) -> int:
        """Number of ids, the reserved unknown id included."""
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text`` (0 for a character outside the alphabet)."""
        return [self._index.get(c, 0) for c in text]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The string of ``ids``; raises ``ValueError`` on an id outside ``[0, vocab_size)``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        out = []
        for i in ids:
            if not 0 <= int(i) < len(self.chars):
                raise ValueError(f"ids must lie in [0, {len(self.chars)}), got {i!r}")
            out.append(self.chars[int(i)])
        return "".join(out)

    def state_dict(self) -> dict[str, Any]:
        """The alphabet, for saving beside a checkpoint."""
        return {"alphabet": "".join(self.chars[1:])}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "CharTokenizer":
        """Rebuild a tokenizer from :meth:`state_dict`."""
        return cls(state["alphabet"])

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------- loading


def load_text_file(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """The text of a user's file; ``FileNotFoundError``/``ValueError`` for a missing or empty file.

    Explained in :doc:`/book/part2`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path {path!r} is not an existing file")
    with open(path, encoding=encoding) as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"path {path!r} holds no text")
    return text


def load_hf_dataset(
    name_or_path: str,
    split: str = "train",
    text_field: str = "text",
    **kwargs: Any,
) -> list[str]:
    """The non-empty texts of column ``text_field`` of ``datasets.load_dataset(name_or_path, split=split, **kwargs)``.

    Offline, give a local builder and files: ``load_hf_dataset("text", data_files="corpus.txt")``
    (one document per line). Missing local ``data_files`` raise ``FileNotFoundError``; a missing
    column raises ``ValueError`` listing the columns there are.

    Explained in :doc:`/book/part2`.
    """
    import datasets  # imported here: heavy, and only this path needs it

    data_files = kwargs.get("data_files")
    if data_files is not None:
        files = [data_files] if isinstance(data_files, (str, os.PathLike)) else (
            list(data_files.values()) if isinstance(data_files, dict) else list(data_files)
        )
        flat = []
        for f in files:
            flat.extend([f] if isinstance(f, (str, os.PathLike)) else list(f))
        for f in flat:
            f = os.fspath(f)
            if "://" not in f and not any(ch in f for ch in "*?[") and not os.path.isfile(f):
                raise FileNotFoundError(f"data_files entry {f!r} is not an existing file")
    ds = datasets.load_dataset(name_or_path, split=split, **kwargs)
    if text_field not in ds.column_names:
        raise ValueError(
            f"text_field {text_field!r} is not a column of {name_or_path!r}; "
            f"columns are {ds.column_names}"
        )
    return [t for t in ds[text_field] if isinstance(t, str) and t.strip()]


def split_documents(
    documents: Sequence[str], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """A seeded random split of documents into (train, validation); both sides non-empty.

    Explained in :doc:`/book/part2`.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
    n = len(documents)
    if n < 2:
        raise ValueError(f"documents must hold at least 2 documents to split, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    val_idx = set(order[:n_val])
    train = [d for i, d in enumerate(documents) if i not in val_idx]
    val = [d for i, d in enumerate(documents) if i in val_idx]
    return train, val


# --------------------------------------------------------------------------- batches


def _check_windows(ids: torch.Tensor, batch_size: int, seq_len: int) -> None:
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype != torch.long:
        raise TypeError("ids must be a 1-D torch.long tensor")
    if ids.numel() < seq_len + 1:
        raise ValueError(
            f"seq_len {seq_len} needs at least {seq_len + 1} tokens, the ids hold {ids.numel()}"
        )


def sample_batch(
    ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows: inputs ``x`` and next-token targets ``y``, both (B, T).

    Explained in :doc:`/book/part2`.
    """
    _check_windows(ids, batch_size, seq_len)
    starts = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=generator)  # (B,)
    windows = ids[starts[:, None] + torch.arange(seq_len + 1)]  # (B, T + 1)
    return windows[:, :-1], windows[:, 1:]


class BatchStream:
    """Seeded stream of training batches whose state is its position (saved in checkpoints).

    Batch number ``k`` is :func:`sample_batch` with a generator seeded by ``(seed, k)``, so
    jumping to a position gives the same batches as drawing up to it.

    Explained in :doc:`/book/part2`.
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0):
        _check_windows(ids, batch_size, seq_len)
        self.ids, self.batch_size, self.seq_len = ids, int(batch_size), int(seq_len)
        self.seed = int(seed)
        self.position = 0

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``k`` (does not move the stream)."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + int(k)) % (2**63))
        return sample_batch(self.ids, self.batch_size, self.seq_len, gen)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch(self.position)
        self.position += 1
        return out

    def state_dict(self) -> dict[str, int]:
        """Seed, position and batch shape: enough to resume the stream exactly."""
        return {"seed": self.seed, "position": self.position, "batch_size": self.batch_size,
                "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at the saved position; the seed and batch shape must match this stream's."""
        for key in ("seed", "batch_size", "seq_len"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"checkpoint data {key} is {state[key]}, this stream's is {getattr(self, key)}"
                )
        self.position = int(state["position"])


def eval_batches(
    ids: torch.Tensor, batch_size: int, seq_len: int, n_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``n_batches`` fixed batches of consecutive non-overlapping windows from the start.

    Fewer come back when the ids are short; at least one (a short last batch allowed).

    Explained in :doc:`/book/part2`.
    """
    _check_windows(ids, batch_size, seq_len)
    if isinstance(n_batches, bool) or not isinstance(n_batches, numbers.Integral) or n_batches < 1:
        raise ValueError(f"n_batches must be a positive integer, got {n_batches!r}")
    n_windows = min((ids.numel() - 1) // seq_len, n_batches * batch_size)
    starts = torch.arange(n_windows) * seq_len  # (W,)
    windows = ids[starts[:, None] + torch.arange(seq_len + 1)]  # (W, T + 1)
    return [
        (windows[i:i + batch_size, :-1], windows[i:i + batch_size, 1:])
        for i in range(0, n_windows, batch_size)
    ]


@dataclass
class LMData:
    """A tokenizer with token ids of a training and a validation text (1-D ``torch.long``).

    Explained in :doc:`/book/part2`.
    """

    tokenizer: CharTokenizer  #: the character tokenizer of both texts
    train_ids: torch.Tensor  #: (N_train,) token ids of the training text
    val_ids: torch.Tensor  #: (N_val,) token ids of the validation text

    @classmethod
    def from_documents(
        cls,
        documents: Sequence[str],
        val_fraction: float = 0.1,
        seed: int = 0,
        tokenizer: CharTokenizer | None = None,
    ) -> "LMData":
        """Split documents (seeded), join each side with newlines, tokenize (built on all text)."""
        documents = [d for d in documents if d.strip()]
        train, val = split_documents(documents, val_fraction, seed)
        if tokenizer is None:
            tokenizer = CharTokenizer.from_text(documents)

        def encode(docs: list[str]) -> torch.Tensor:  # (n_tokens,)
            return torch.tensor(tokenizer.encode("\n".join(docs) + "\n"), dtype=torch.long)

        return cls(tokenizer, encode(train), encode(val))

    @classmethod
    def from_text(
        cls, text: str, val_fraction: float = 0.1, seed: int = 0,
        tokenizer: CharTokenizer | None = None,
    ) -> "LMData":
        """Like :meth:`from_documents` with the non-empty lines of ``text`` as documents."""
        return cls.from_documents(text.splitlines(), val_fraction, seed, tokenizer)

    def __repr__(self) -> str:
        return (f"LMData(vocab_size={self.tokenizer.vocab_size}, train_tokens={self.train_ids.numel()}, "
                f"val_tokens={self.val_ids.numel()})")


def synthetic_lm_data(n_documents: int = 2000, seed: int = 0, val_fraction: float = 0.1) -> LMData:
    """The book's default data: :func:`generate_corpus` split and tokenized (seeded).

    Explained in :doc:`/book/part2`.
    """
    return LMData.from_documents(generate_corpus(n_documents, seed), val_fraction, seed)
