"""Speculative sampling, two- and three-level, written once for sampling and for exact enumeration.

The core (Leviathan et al. 2023; Chen et al. 2023): a token ``x`` drawn from a proposal ``q`` is
kept with probability ``min(1, p(x)/q(x))``; on rejection a token is drawn from the normalised
residual ``norm(max(p − q, 0))``. The emitted token is then distributed exactly as ``p``
(:func:`accept_or_resample`). A block of γ proposals is verified left to right: the accepted
prefix, then a residual draw at the first rejection, or a bonus token from ``p`` when all are
accepted (:func:`verify`).

TriForce's hierarchy (Sun et al., arXiv 2404.11912), as the official code runs it, with γ₁ = 1 at
the middle level: the draft draws ``x ~ q``; the middle model (target weights over the retrieval
cache) gives ``p_mid`` at ``x``'s position and at the next one; ``x`` is accepted with
``min(1, p_mid(x)/q(x))``, and then a bonus token is drawn from ``p_mid`` at the next position; on
rejection a token is drawn from the residual ``norm(max(p_mid − q, 0))``. This repeats until at
least γ tokens are proposed, each with ``p_mid`` at its position as its proposal probability; one
target pass verifies them (:func:`verify` with ``q = p_mid``). The released ``Middle_Spec`` draws
from ``p_mid`` itself after a rejection: the middle token's law is then
``min(q, p_mid) + (1 − β)·p_mid ≠ p_mid`` (β = Σ min(q, p_mid)) and the output is not the
target's law. ``released=True`` reproduces it, for the exactness lab only.

Models are model-agnostic callables here, ``prefix (tuple of ints) -> logits (V,)``, so the same
code that samples can be enumerated exactly: every random decision goes through a *chooser*, which
either draws (a seeded ``torch.Generator``) or, in :meth:`SpeculativeDecoder.round_law`, walks
every branch depth first, multiplying the branch probabilities (float64). Temperature and top-p
(:class:`SamplingConfig`) are applied identically at every level; exactness holds with respect to
the tempered, filtered target.

Also here: total variation, a χ² goodness-of-fit test that pools cells with expected count < 5,
the expected tokens per target pass ``(1 − α^{γ+1})/(1 − α)``, and per-level pass counters.

Explained in :doc:`/book/triforce/theory`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "ChiSquareResult",
    "LogitsFn",
    "PassCounter",
    "SamplingConfig",
    "SpeculativeDecoder",
    "VerifyResult",
    "accept_or_resample",
    "check_gamma",
    "chi_square_test",
    "expected_tokens_per_pass",
    "process_logits",
    "residual_distribution",
    "total_variation",
    "verify",
]

LogitsFn = Callable[[tuple[int, ...]], Tensor]
"""The model type of this module, a function from a prefix of token ids to next-token logits ``(V,)``."""


# ---------------------------------------------------------------------------------------------
# Sampling configuration
# ---------------------------------------------------------------------------------------------
def _check_temperature_top_p(temperature: float, top_p: float, greedy: bool) -> None:
    if isinstance(greedy, bool) is False:
        raise TypeError(f"greedy must be a bool, got {greedy!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be a float in (0, 1], got {top_p!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or math.isnan(temperature):
        raise ValueError(f"temperature must be a float, got {temperature!r}")
    if not greedy and not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(
            f"temperature must be a finite float > 0 when sampling, got {temperature!r}; "
            "for greedy decoding pass greedy=True (temperature is then ignored)"
        )


def process_logits(logits: Tensor, temperature: float = 1.0, top_p: float = 1.0,
                   greedy: bool = False) -> Tensor:
    """Next-token probabilities from logits ``(..., V)``: temperature, then top-p (nucleus).

    Top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p`` (as the
    official code: a token is removed when the mass before it in sorted order exceeds ``top_p``)
    and renormalises. ``greedy=True`` gives the one-hot of the argmax (first index on ties), so
    speculative sampling with greedy levels accepts a proposal iff it is the target's argmax.
    Computed in float64 for float64 logits, float32 otherwise.

    Explained in :doc:`/book/triforce/theory`.
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point torch.Tensor, got {type(logits).__name__}"
                        + (f" of dtype {logits.dtype}" if isinstance(logits, Tensor) else ""))
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}")
    _check_temperature_top_p(temperature, top_p, greedy)
    work = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    if greedy:
        idx = work.argmax(dim=-1, keepdim=True)  # (..., 1)
        return torch.zeros_like(work).scatter_(-1, idx, 1.0)
    probs = torch.softmax(work / float(temperature), dim=-1)  # (..., V)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each token
        remove_sorted = before > top_p
        remove = torch.zeros_like(remove_sorted).scatter_(-1, order, remove_sorted)
        probs = probs.masked_fill(remove, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


@dataclass(frozen=True)
class SamplingConfig:
    """How every level turns logits into probabilities (the same at every level).

    Defaults are TriForce's (temperature 0.6, top-p 0.9). ``greedy=True`` is its own mode
    (argmax, temperature ignored); with sampling, temperature ≤ 0 raises ``ValueError``.

    Explained in :doc:`/book/triforce/theory`.
    """

    #: Divides the logits before the softmax (> 0 when sampling).
    temperature: float = 0.6
    #: Nucleus mass in (0, 1]; 1 keeps every token.
    top_p: float = 0.9
    #: Argmax decoding (temperature ignored).
    greedy: bool = False

    def __post_init__(self) -> None:
        _check_temperature_top_p(self.temperature, self.top_p, self.greedy)

    def probs(self, logits: Tensor) -> Tensor:
        """:func:`process_logits` with this configuration."""
        return process_logits(logits, self.temperature, self.top_p, self.greedy)


# ---------------------------------------------------------------------------------------------
# Choosers: every random decision goes through one (sampling or exhaustive enumeration)
# ---------------------------------------------------------------------------------------------
class _Chooser(Protocol):
    def choice(self, probs: Tensor) -> int: ...

    def accept(self, prob: float) -> bool: ...


class _Sampler:
    """Draws with a (seeded) generator."""

    def __init__(self, generator: torch.Generator | None) -> None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator

    def choice(self, probs: Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator).item())

    def accept(self, prob: float) -> bool:
        u = torch.rand((), generator=self.generator, dtype=torch.float64)
        return bool(u < prob)


class _Replay:
    """Follows a fixed path of branch indices, then the first branch of positive probability;
    records the alternatives at new decision points and the path's probability."""

    def __init__(self, path: list[int]) -> None:
        self.path = path
        self.start = len(path)
        self.k = 0
        self.weight = 1.0
        self.alternatives: list[tuple[int, list[int]]] = []  # (depth, other options)

    def _decide(self, probs: list[float]) -> int:
        if self.k < len(self.path):
            i = self.path[self.k]
        else:
            options = [j for j, p in enumerate(probs) if p > 0.0]
            if not options:
                raise ValueError("a decision with no outcome of positive probability")
            i = options[0]
            self.path.append(i)
            self.alternatives.append((self.k, options[1:]))
        self.k += 1
        self.weight *= probs[i]
        return i

    def choice(self, probs: Tensor) -> int:
        return self._decide(probs.tolist())

    def accept(self, prob: float) -> bool:
        a = min(1.0, max(0.0, prob))
        return self._decide([a, 1.0 - a]) == 0


def enumerate_law(run: Callable[[_Chooser], tuple[int, ...]]) -> dict[tuple[int, ...], float]:
    """The exact law of ``run(chooser)``'s output: every branch of every decision, depth first."""
    law: dict[tuple[int, ...], float] = {}
    stack: list[list[int]] = [[]]
    while stack:
        path = stack.pop()
        replay = _Replay(list(path))
        out = run(replay)
        law[out] = law.get(out, 0.0) + replay.weight
        for depth, others in replay.alternatives:
            for o in others:
                stack.append(replay.path[:depth] + [o])
    return law


# ---------------------------------------------------------------------------------------------
# The core: one token, one block
# ---------------------------------------------------------------------------------------------
def _check_prob_vector(name: str, p: Any) -> Tensor:
    if not isinstance(p, Tensor) or not p.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor of probabilities, got "
                        f"{type(p).__name__}" + (f" of dtype {p.dtype}" if isinstance(p, Tensor) else ""))
    if p.dim() != 1 or p.numel() == 0:
        raise ValueError(f"{name} must be a non-empty probability vector (V,), got shape {tuple(p.shape)}")
    return p


def _check_same_vocab(p: Tensor, q: Tensor, what: str = "p (target) and q (proposal)") -> None:
    if p.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"draft and target have different vocabulary sizes: {what} have {p.shape[-1]} and "
            f"{q.shape[-1]} entries; speculative sampling needs one shared vocabulary"
        )


def residual_distribution(p: Tensor, q: Tensor) -> Tensor:
    """``norm(max(p − q, 0))``, the law to draw from after a rejection (``p`` where p = q).

    Explained in :doc:`/book/triforce/theory`.
    """
    r = torch.clamp(p - q, min=0.0)
    s = r.sum()
    if not bool(s > 0):  # p == q: a rejection has probability 0 (up to rounding)
        return p / p.sum()
    return r / s


def _accept_or_resample(p: Tensor, q: Tensor, token: int, chooser: _Chooser,
                        released: bool = False) -> tuple[bool, int]:
    qx = float(q[token])
    if not qx > 0.0:
        raise ValueError(f"token {token} has probability q[token]={qx} under the "
                         "proposal q; it cannot have been drawn from q")
    if chooser.accept(float(p[token]) / qx):
        return True, token
    law = p / p.sum() if released else residual_distribution(p, q)
    return False, chooser.choice(law)


def accept_or_resample(p: Tensor, q: Tensor, token: int,
                       generator: torch.Generator | None = None) -> tuple[bool, int]:
    """Speculative sampling of one token: ``token ~ q`` is kept with probability
    ``min(1, p[token]/q[token])``, else a draw from ``norm(max(p − q, 0))`` replaces it.

    Args:
        p: target probabilities ``(V,)``.
        q: proposal probabilities ``(V,)`` (the same vocabulary).
        token: the proposal, drawn from ``q`` (``q[token] > 0``).
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        ``(accepted, emitted token)``; the emitted token is distributed as ``p``.

    Explained in :doc:`/book/triforce/theory`.
    """
    p = _check_prob_vector("p", p)
    q = _check_prob_vector("q", q)
    _check_same_vocab(p, q)
    if isinstance(token, Tensor):
        token = int(token.item())
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < p.numel():
        raise ValueError(f"token must be an int in [0, {p.numel()}), got {token!r}")
    return _accept_or_resample(p, q, token, _Sampler(generator))


@dataclass(frozen=True)
class VerifyResult:
    """What a verification emits: the accepted proposals, then one resampled or bonus token.

    Explained in :doc:`/book/triforce/theory`.
    """

    #: The emitted tokens, ``accepted + 1`` of them.
    tokens: tuple[int, ...]
    #: How many proposals were accepted.
    accepted: int
    #: How many proposals were verified (γ).
    gamma: int

    @property
    def all_accepted(self) -> bool:
        """Whether every proposal was accepted (the last token is then the bonus)."""
        return self.accepted == self.gamma


def check_gamma(gamma: Any) -> int:
    """γ, the number of proposals per round, as an int ≥ 1 (``ValueError`` otherwise).

    Explained in :doc:`/book/triforce/theory`.
    """
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma (proposals per round) must be an integer >= 1, got {gamma!r}")
    return gamma


def _verify(proposals: Sequence[int], q_probs: Sequence[Tensor], p_probs: Sequence[Tensor],
            chooser: _Chooser) -> VerifyResult:
    out: list[int] = []
    for i, x in enumerate(proposals):
        ok, y = _accept_or_resample(p_probs[i], q_probs[i], int(x), chooser)
        out.append(y)
        if not ok:
            return VerifyResult(tuple(out), i, len(proposals))
    out.append(chooser.choice(p_probs[len(proposals)]))  # bonus token
    return VerifyResult(tuple(out), len(proposals), len(proposals))


def verify(proposals: Tensor | Sequence[int], q_probs: Tensor, p_probs: Tensor,
           generator: torch.Generator | None = None) -> VerifyResult:
    """Verify a block of γ proposals against one target pass.

    Args:
        proposals: the γ proposed tokens, ``(γ,)``.
        q_probs: ``(γ, V)`` the proposal law each token was drawn from.
        p_probs: ``(γ + 1, V)`` the target's law at each proposal's position and one beyond
            (for the bonus token).
        generator: optional ``torch.Generator``.

    Returns:
        :class:`VerifyResult`: the accepted prefix, then the residual draw at the first
        rejection, or the bonus token from ``p_probs[γ]`` when all γ are accepted.

    Explained in :doc:`/book/triforce/theory`.
    """
    props = [int(x) for x in (proposals.tolist() if isinstance(proposals, Tensor) else proposals)]
    gamma = check_gamma(len(props)) if props else check_gamma(0)
    for name, t, rows in (("q_probs", q_probs, gamma), ("p_probs", p_probs, gamma + 1)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.shape[0] != rows:
            raise ValueError(f"{name} must have shape ({rows}, V) for gamma={gamma} proposals, got {tuple(t.shape)}")
    _check_same_vocab(p_probs, q_probs, "p_probs (target) and q_probs (proposal)")
    V = p_probs.shape[-1]
    if any(not 0 <= x < V for x in props):
        raise ValueError(f"proposals must be token ids in [0, {V}), got {props}")
    return _verify(props, list(q_probs), list(p_probs), _Sampler(generator))


# ---------------------------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------------------------
@dataclass
class PassCounter:
    """Forward passes of one level, and the tokens it proposed and had accepted by the level above
    (for the target: the proposals it verified and accepted).

    Explained in :doc:`/book/triforce/theory`.
    """

    #: The level ("draft", "middle" or "target").
    name: str
    #: Forward passes of this level.
    passes: int = 0
    #: Tokens this level proposed to the level above (for the target, the proposals it verified).
    proposed: int = 0
    #: Of those, the tokens accepted.
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        """accepted / proposed (NaN before any proposal)."""
        return self.accepted / self.proposed if self.proposed else float("nan")

    def reset(self) -> None:
        self.passes = self.proposed = self.accepted = 0


def expected_tokens_per_pass(alpha: float, gamma: int) -> float:
    """Expected tokens emitted per target pass with i.i.d. acceptance α and γ proposals:
    ``1 + α + … + α^γ = (1 − α^{γ+1})/(1 − α)`` (γ + 1 at α = 1).

    Explained in :doc:`/book/triforce/theory`.
    """
    check_gamma(gamma)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (acceptance probability) must be a float in [0, 1], got {alpha!r}")
    if alpha == 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


# ---------------------------------------------------------------------------------------------
# The hierarchy
# ---------------------------------------------------------------------------------------------
class _NullCounter(PassCounter):
    """Swallows counts (used while enumerating)."""


class SpeculativeDecoder:
    """Autoregressive, two-level or three-level (TriForce) speculative decoding over callables.

    ``levels`` are ``prefix -> logits`` callables (:data:`LogitsFn`), smallest first, the target
    last: ``[target]`` decodes autoregressively, ``[draft, target]`` is speculative decoding
    (the draft may be the retrieval-cache middle model), ``[draft, middle, target]`` is TriForce
    with γ₁ = 1 at the middle level. One :meth:`round` proposes and verifies; :meth:`generate`
    runs rounds. :meth:`round_law`, :meth:`first_token_law` and :meth:`sequence_law` give the
    exact law of the same code's output by enumerating every random decision (small V only).
    ``counters`` holds a :class:`PassCounter` per level (``"draft"``, ``"middle"``, ``"target"``).

    ``released=True`` (three levels only) resamples from ``p_mid`` itself after a middle
    rejection, as the released ``Middle_Spec`` does: not exact, for the exactness lab only.

    Explained in :doc:`/book/triforce/theory`.
    """

    def __init__(self, levels: Sequence[Callable[[tuple[int, ...]], Tensor]], gamma: int = 4,
                 config: SamplingConfig | None = None, released: bool = False) -> None:
        levels = list(levels)
        if not 1 <= len(levels) <= 3 or not all(callable(f) for f in levels):
            raise ValueError(f"levels must be 1 to 3 callables prefix -> logits (target last), got {levels!r}")
        self.levels = levels
        self.gamma = check_gamma(gamma)
        if config is None:
            config = SamplingConfig()
        if not isinstance(config, SamplingConfig):
            raise TypeError(f"config must be a SamplingConfig, got {type(config).__name__}")
        self.config = config
        if not isinstance(released, bool):
            raise TypeError(f"released must be a bool, got {released!r}")
        if released and len(levels) != 3:
            raise ValueError(f"released=True changes the middle level's resampling and needs 3 levels, got {len(levels)}")
        self.released = released
        names = {1: ["target"], 2: ["draft", "target"], 3: ["draft", "middle", "target"]}[len(levels)]
        self.counters: dict[str, PassCounter] = {n: PassCounter(n) for n in names}
        self.tokens = 0  # tokens generated by round()
        self._vocab: int | None = None
        self._memo: dict[tuple[int, tuple[int, ...]], Tensor] | None = None  # laws, while enumerating

    # -- one level's law -------------------------------------------------------------------
    def _probs(self, level: int, prefix: tuple[int, ...]) -> Tensor:
        if self._memo is not None:
            key = (level, prefix)
            if key not in self._memo:
                self._memo[key] = self._probs_uncached(level, prefix)
            return self._memo[key]
        return self._probs_uncached(level, prefix)

    def _probs_uncached(self, level: int, prefix: tuple[int, ...]) -> Tensor:
        logits = self.levels[level](prefix)
        if not isinstance(logits, Tensor) or logits.dim() != 1:
            raise ValueError(f"level {level} must return logits of shape (V,), got "
                             f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
        if self._vocab is None:
            self._vocab = logits.numel()
        elif logits.numel() != self._vocab:
            raise ValueError(
                f"draft and target have different vocabulary sizes: level {level} gave {logits.numel()} "
                f"logits, an earlier level {self._vocab}; speculative sampling needs one shared vocabulary"
            )
        return self.config.probs(logits.to(torch.float64))

    def target_probs(self, prefix: Sequence[int]) -> Tensor:
        """The processed target law after ``prefix`` (what the output must follow)."""
        return self._probs(len(self.levels) - 1, tuple(prefix))

    # -- one round ---------------------------------------------------------------------------
    def _round(self, prefix: tuple[int, ...], chooser: _Chooser,
               count: bool) -> tuple[int, ...]:
        c = self.counters if count else {n: _NullCounter(n) for n in self.counters}
        top = len(self.levels) - 1
        if top == 0:
            c["target"].passes += 1
            return (chooser.choice(self._probs(0, prefix)),)
        props: list[int] = []
        qs: list[Tensor] = []
        if top == 1:  # draft proposes γ tokens
            for _ in range(self.gamma):
                q = self._probs(0, prefix + tuple(props))
                c["draft"].passes += 1
                props.append(chooser.choice(q))
                qs.append(q)
        else:  # draft -> middle with γ₁ = 1, until at least γ proposals
            while len(props) < self.gamma:
                ctx = prefix + tuple(props)
                q = self._probs(0, ctx)
                c["draft"].passes += 1
                x = chooser.choice(q)
                p_mid = self._probs(1, ctx)  # one middle pass: p_mid at x and after x
                c["middle"].passes += 1
                c["draft"].proposed += 1
                ok, y = _accept_or_resample(p_mid, q, x, chooser,
                                            released=self.released)
                props.append(y)
                qs.append(p_mid)
                if ok:
                    c["draft"].accepted += 1
                    p_next = self._probs(1, ctx + (y,))
                    props.append(chooser.choice(p_next))  # the middle's bonus token
                    qs.append(p_next)
        p_t = [self._probs(top, prefix + tuple(props[:i]))
               for i in range(len(props) + 1)]
        c["target"].passes += 1
        res = _verify(props, qs, p_t, chooser)
        proposer = "middle" if top == 2 else "draft"
        c[proposer].proposed += len(props)
        c[proposer].accepted += res.accepted
        c["target"].proposed += len(props)
        c["target"].accepted += res.accepted
        return res.tokens

    def round(self, prefix: Sequence[int], generator: torch.Generator | None = None) -> tuple[int, ...]:
        """One round after ``prefix``: the tokens it emits (1 to γ + 2), counted in ``counters``."""
        out = self._round(tuple(int(t) for t in prefix), _Sampler(generator), count=True)
        self.tokens += len(out)
        return out

    def generate(self, prefix: Sequence[int], n_tokens: int,
                 generator: torch.Generator | None = None) -> list[int]:
        """``n_tokens`` tokens after ``prefix`` (rounds until enough, the last one truncated)."""
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0:
            raise ValueError(f"n_tokens must be an integer >= 0, got {n_tokens!r}")
        seq = [int(t) for t in prefix]
        out: list[int] = []
        while len(out) < n_tokens:
            new = self.round(seq, generator)
            out.extend(new)
            seq.extend(new)
        return out[:n_tokens]

    def tokens_per_target_pass(self) -> float:
        """Tokens generated per target forward pass so far."""
        passes = self.counters["target"].passes
        return self.tokens / passes if passes else float("nan")

    def reset_counters(self) -> None:
        for c in self.counters.values():
            c.reset()
        self.tokens = 0

    # -- exact laws --------------------------------------------------------------------------
    def round_law(self, prefix: Sequence[int]) -> dict[tuple[int, ...], float]:
        """Exact law of one round's emitted tokens (a dict from token tuples to probabilities)."""
        pre = tuple(int(t) for t in prefix)
        outer = self._memo is None
        if outer:  # the callables are functions of the prefix: evaluate each once
            self._memo = {}
        try:
            return enumerate_law(lambda ch: self._round(pre, ch, count=False))
        finally:
            if outer:
                self._memo = None

    def first_token_law(self, prefix: Sequence[int]) -> Tensor:
        """Exact law ``(V,)`` float64 of the first token one round emits after ``prefix``."""
        law = self.round_law(prefix)
        V = self.target_probs(prefix).numel()
        out = torch.zeros(V, dtype=torch.float64)
        for toks, w in law.items():
            out[toks[0]] += w
        return out

    def sequence_law(self, prefix: Sequence[int], n_tokens: int) -> dict[tuple[int, ...], float]:
        """Exact law of the first ``n_tokens`` tokens :meth:`generate` emits after ``prefix``."""
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
            raise ValueError(f"n_tokens must be an integer >= 1, got {n_tokens!r}")
        memo: dict[tuple[tuple[int, ...], int], dict[tuple[int, ...], float]] = {}

        def law(pre: tuple[int, ...], n: int) -> dict[tuple[int, ...], float]:
            key = (pre, n)
            if key in memo:
                return memo[key]
            out: dict[tuple[int, ...], float] = {}
            for toks, w in self.round_law(pre).items():
                if len(toks) >= n:
                    k = toks[:n]
                    out[k] = out.get(k, 0.0) + w
                else:
                    for rest, w2 in law(pre + toks, n - len(toks)).items():
                        k = toks + rest
                        out[k] = out.get(k, 0.0) + w * w2
            memo[key] = out
            return out

        outer = self._memo is None
        if outer:
            self._memo = {}
        try:
            return law(tuple(int(t) for t in prefix), n_tokens)
        finally:
            if outer:
                self._memo = None

    def target_sequence_law(self, prefix: Sequence[int], n_tokens: int) -> dict[tuple[int, ...], float]:
        """Exact law of ``n_tokens`` tokens sampled autoregressively from the processed target."""
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
            raise ValueError(f"n_tokens must be an integer >= 1, got {n_tokens!r}")
        pre = tuple(int(t) for t in prefix)
        out: dict[tuple[int, ...], float] = {(): 1.0}
        for _ in range(n_tokens):
            nxt: dict[tuple[int, ...], float] = {}
            for seq, w in out.items():
                p = self.target_probs(pre + seq).tolist()
                for t, pt in enumerate(p):
                    if pt > 0:
                        nxt[seq + (t,)] = w * pt
            out = nxt
        return out


# ---------------------------------------------------------------------------------------------
# Distances and tests
# ---------------------------------------------------------------------------------------------
def total_variation(p: Tensor | Mapping[Any, float], q: Tensor | Mapping[Any, float]) -> float:
    """``½ Σ |p − q|`` between two laws: tensors of one shape, or dicts outcome -> probability
    (missing outcomes count as 0).

    Explained in :doc:`/book/triforce/theory`.
    """
    if isinstance(p, Mapping) and isinstance(q, Mapping):
        keys = set(p) | set(q)
        return 0.5 * math.fsum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in keys)
    if isinstance(p, Tensor) and isinstance(q, Tensor):
        if p.shape != q.shape:
            raise ValueError(f"p and q must have one shape, got {tuple(p.shape)} and {tuple(q.shape)}")
        return 0.5 * float((p.double() - q.double()).abs().sum())
    raise TypeError(f"p and q must both be tensors or both mappings, got {type(p).__name__} and {type(q).__name__}")


@dataclass(frozen=True)
class ChiSquareResult:
    """Pearson χ² against expected probabilities, after pooling cells with expected count < 5.

    ``z = (χ² − dof)/√(2·dof)``; ``p_value`` is the χ² survival function (regularised upper
    incomplete gamma, ``torch.special.gammaincc``).

    Explained in :doc:`/book/triforce/theory`.
    """

    #: Pearson's χ² over the pooled cells.
    statistic: float
    #: Degrees of freedom, cells − 1.
    dof: int
    #: Number of cells after pooling.
    cells: int
    #: The standardised statistic (χ² − dof)/√(2·dof).
    z: float
    #: The χ² survival function at the statistic.
    p_value: float


def chi_square_test(counts: Mapping[Any, int], probs: Mapping[Any, float],
                    min_expected: float = 5.0) -> ChiSquareResult:
    """Pearson χ² of observed ``counts`` against ``probs`` (dicts outcome -> count/probability).

    Cells whose expected count is below ``min_expected`` are pooled, smallest first, into one
    cell until it reaches ``min_expected`` (and a remaining lone small cell joins the pool).
    An observed outcome with probability 0 makes the statistic infinite.

    Explained in :doc:`/book/triforce/theory`.
    """
    n = sum(counts.values())
    if n <= 0:
        raise ValueError(f"counts must hold at least one observation, got total {n}")
    total_p = math.fsum(probs.values())
    if abs(total_p - 1.0) > 1e-6:
        raise ValueError(f"probs must sum to 1, got {total_p}")
    if any(probs.get(k, 0.0) <= 0.0 and c > 0 for k, c in counts.items()):
        return ChiSquareResult(math.inf, 0, 0, math.inf, 0.0)
    cells = sorted(((n * p, counts.get(k, 0)) for k, p in probs.items() if p > 0), key=lambda t: t[0])
    pooled: list[tuple[float, int]] = []
    pool_e, pool_o, in_pool = 0.0, 0, 0
    for e, o in cells:
        if e < min_expected or (in_pool and pool_e < min_expected):
            pool_e += e
            pool_o += o
            in_pool += 1
        else:
            pooled.append((e, o))
    if in_pool:
        pooled.append((pool_e, pool_o))
    k = len(pooled)
    stat = math.fsum((o - e) ** 2 / e for e, o in pooled)
    dof = max(k - 1, 1)
    z = (stat - dof) / math.sqrt(2 * dof)
    pv = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                       torch.tensor(stat / 2, dtype=torch.float64)))
    return ChiSquareResult(stat, dof, k, z, pv)
