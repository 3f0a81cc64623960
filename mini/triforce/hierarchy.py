"""TriForce's hierarchy over real models: draft → retrieval-cache middle → full-cache target.

The same round as :class:`mini.triforce.sampling.SpeculativeDecoder`, but every level is an
:class:`mini.lm.kvcache.ExplicitLM` with its own KV cache:

- **draft**: a small model whose cache is a :class:`~mini.lm.kvcache.StreamingLLM` of
  ``draft_budget`` slots (``draft_sinks`` sinks + recent window, positions re-indexed). It is
  compressed at the start of each round only, so within a round it grows by at most γ + 2 slots and
  its state is a function of the tokens of the round (what exact enumeration needs).
- **middle** (γ₁ = 1): the target's weights over the retrieval cache
  (:func:`mini.triforce.retrieval.build_retrieval_cache`), built once from the prompt's keys with the
  last prompt token's query; at the start of every round the keys and values of the verified tokens
  (taken from the target's full cache) overwrite its lowest-ranked tail
  (:meth:`~mini.triforce.retrieval.RetrievalCache.refresh`); within a round its own passes append.
- **target**: the full cache; one pass verifies the proposals.

Caches are synchronised lazily to the token sequence a level is asked about: a level remembers the
tokens its cache holds and the law after each of the tokens its last passes fed; asked for the law
after a sequence, it rolls back the slots after the common prefix (rejected tokens, in every
cache) and feeds the missing tokens in one pass. One round (``mode="triforce"``): the draft draws
``x ~ q``; one middle pass over ``x`` gives ``p_mid`` at ``x`` and after it; ``x`` is kept with
``min(1, p_mid(x)/q(x))`` and then a bonus is drawn from ``p_mid`` after ``x``, else a token is
drawn from the residual ``norm(max(p_mid − q, 0))`` (``released=True``: from ``p_mid`` itself, the
released code's defect, for the exactness lab only); until ≥ γ proposals; one target pass verifies
them (accept with ``min(1, p_t/p_mid)``, residual at the first rejection, bonus if all accepted).
The baselines run through the same code: ``"autoregressive"``, ``"draft"`` (draft → target, γ
proposals) and ``"retrieval"`` (middle → target, γ proposals). Temperature and top-p
(:class:`~mini.triforce.sampling.SamplingConfig`) are applied identically at every level; greedy is
its own mode (then the output is the target's greedy output).

Every random decision goes through a chooser (sampling.py's), so :meth:`TriForce.first_tokens_law`
enumerates the exact law of the first tokens of the real-model hierarchy (small vocabularies), and
:meth:`TriForce.sample_first_tokens` draws many independent samples from one prefilled prompt
(clones of its caches; ``memo=True`` reuses each distinct forward pass's law, which is exact
because a level's law is a function of the round history).

Prompt length: the retrieval levels need a prompt longer than the budget (``T − 1 ≥ budget +
chunk_size``); a shorter one raises ``ValueError`` (a retrieval cache holding the whole prompt is
the target, so the hierarchy would be pointless): use ``mode="draft"`` there. The generated tokens
must also fit in the retrieval cache's tail (checked).

Explained in :doc:`/book/triforce/theory`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mini.lm.kvcache import ExplicitLM, KVCache, StreamingLLM
from mini.triforce.retrieval import RetrievalCache, build_retrieval_cache
from mini.triforce.sampling import (
    PassCounter,
    SamplingConfig,
    _accept_or_resample,
    _Chooser,
    _Sampler,
    _verify,
    check_gamma,
    enumerate_law,
)

__all__ = ["MODES", "TriForce", "TriForceConfig"]

MODES = ("autoregressive", "draft", "retrieval", "triforce")
"""Decoding modes of :class:`TriForce`: target alone, draft → target, retrieval → target, all three."""


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class TriForceConfig:
    """Settings of :class:`TriForce` (TriForce's defaults: budget 4096, chunk 8, γ 6, draft cache of
    16 sinks + recent tokens; ours are sized for tiny models).

    Explained in :doc:`/book/triforce/theory`.
    """

    #: Retrieval-cache slots per layer and KV head (a multiple of ``chunk_size``, ≥ 2 chunks).
    budget: int = 64
    #: Tokens per retrieval chunk.
    chunk_size: int = 8
    #: Draft cache slots (StreamingLLM); ``None`` keeps the draft's full cache.
    draft_budget: int | None = None
    #: Sink tokens of the draft's StreamingLLM cache (< ``draft_budget``).
    draft_sinks: int = 16
    #: Proposals per target pass (at least; the middle level may add one bonus more).
    gamma: int = 6
    #: Temperature / top-p / greedy, identical at every level.
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    #: resample from ``p_mid`` after a rejection, as the released code does; NOT exact (exactness lab only)
    released: bool = False
    #: Chunk length of the prompt prefill.
    prefill_chunk: int = 64

    def __post_init__(self) -> None:
        _check_int("chunk_size", self.chunk_size, 1)
        if (isinstance(self.budget, bool) or not isinstance(self.budget, int)
                or self.budget < 2 * self.chunk_size or self.budget % self.chunk_size):
            raise ValueError(f"budget={self.budget!r} must be a multiple of chunk_size="
                             f"{self.chunk_size} and at least two chunks ({2 * self.chunk_size})")
        check_gamma(self.gamma)
        _check_int("draft_sinks", self.draft_sinks, 0)
        if self.draft_budget is not None:
            _check_int("draft_budget", self.draft_budget, 1)
            if self.draft_budget <= self.draft_sinks:
                raise ValueError(f"draft_budget={self.draft_budget} must exceed draft_sinks="
                                 f"{self.draft_sinks} (the cache must hold the sinks and a window)")
        if not isinstance(self.sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(self.sampling).__name__}")
        if not isinstance(self.released, bool):
            raise TypeError(f"released must be a bool, got {self.released!r}")
        _check_int("prefill_chunk", self.prefill_chunk, 1)


class _Level:
    """One model's cache kept in step with a token sequence (lazily: rollback + one pass)."""

    def __init__(self, lm: ExplicitLM, config: SamplingConfig, counter: PassCounter) -> None:
        self.lm, self.config, self.counter = lm, config, counter
        self.cache: KVCache | None = None
        self.held: list[int] = []  # the tokens the cache holds, in order
        self.laws: dict[int, Tensor] = {}  # j -> law after held[:j] (only for fed positions)

    def clone(self) -> _Level:
        out = _Level(self.lm, self.config, self.counter)
        out.cache = self.cache.clone() if self.cache is not None else None
        out.held, out.laws = list(self.held), dict(self.laws)
        return out

    def reset(self, cache: KVCache, held: list[int], laws: dict[int, Tensor]) -> None:
        self.cache, self.held, self.laws = cache, list(held), dict(laws)

    def rollback_to(self, seq: list[int]) -> None:
        """Drop the slots after the longest common prefix of ``held`` and ``seq``."""
        c = 0
        n = min(len(self.held), len(seq))
        while c < n and self.held[c] == seq[c]:
            c += 1
        if c < len(self.held):
            self.cache = self.cache.clone().rollback(len(self.held) - c)
            self.held = self.held[:c]
            self.laws = {j: p for j, p in self.laws.items() if j <= c}

    @torch.no_grad()
    def laws_after(self, seq: list[int], start: int) -> list[Tensor]:
        """The processed laws after ``seq[:j]`` for ``j = start … len(seq)`` (≤ one forward pass)."""
        self.rollback_to(seq)
        missing = seq[len(self.held):]
        if missing:
            ids = torch.tensor([missing], dtype=torch.long)  # (1, k)
            out = self.lm(ids, self.cache)
            self.counter.passes += 1
            probs = self.config.probs(out.logits[0].double())  # (k, V)
            base = len(self.held)
            for i in range(len(missing)):
                self.laws[base + i + 1] = probs[i]
            self.cache, self.held = out.cache, list(seq)
        try:
            return [self.laws[j] for j in range(start, len(seq) + 1)]
        except KeyError as err:
            raise RuntimeError(f"law after {err} tokens is not known to this level") from None


@dataclass
class _State:
    """Everything one generation carries: the sequence, the three levels, the retrieval cache."""

    seq: list[int]
    levels: dict[str, _Level]
    retrieval: RetrievalCache | None
    rounds: tuple[tuple[int, ...], ...] = ()

    def clone(self) -> _State:
        return _State(list(self.seq), {k: v.clone() for k, v in self.levels.items()}, self.retrieval,
                      self.rounds)


class TriForce:
    """Autoregressive, draft → target, retrieval → target and TriForce decoding of real models.

    Args:
        target: the target model (its weights also serve the middle level).
        draft: the draft model (same vocabulary); needed by modes ``"draft"`` and ``"triforce"``.
        config: a :class:`TriForceConfig`.
        mode: one of :data:`MODES`.

    ``counters`` holds a :class:`~mini.triforce.sampling.PassCounter` per level (forward passes,
    proposals, accepted; the prompt's prefill is not counted, and its last law serves the first
    round, so autoregressive decoding counts ``tokens − 1`` target passes), ``tokens`` the tokens
    emitted by rounds (the last round of
    :meth:`generate` may emit more than asked; they are counted), ``rounds`` the rounds run.

    Explained in :doc:`/book/triforce/theory`.
    """

    def __init__(self, target: ExplicitLM, draft: ExplicitLM | None = None,
                 config: TriForceConfig | None = None, *, mode: str = "triforce") -> None:
        if not isinstance(target, ExplicitLM):
            raise TypeError(f"target must be an ExplicitLM, got {type(target).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not allowed; allowed: {', '.join(MODES)}")
        if mode in ("draft", "triforce"):
            if not isinstance(draft, ExplicitLM):
                raise TypeError(f"mode={mode!r} needs draft, an ExplicitLM; got {type(draft).__name__}")
            vt, vd = target.hf.lm_head.out_features, draft.hf.lm_head.out_features
            if vt != vd:
                raise ValueError(f"draft and target have different vocabulary sizes: draft {vd}, "
                                 f"target {vt}; speculative sampling needs one shared vocabulary")
        self.target, self.draft = target, draft
        self.config = config if config is not None else TriForceConfig()
        if not isinstance(self.config, TriForceConfig):
            raise TypeError(f"config must be a TriForceConfig, got {type(self.config).__name__}")
        if self.config.released and mode != "triforce":
            raise ValueError(f"released=True changes the middle level's sampler; it needs "
                             f"mode='triforce', got mode={mode!r}")
        self.mode = mode
        names = {"autoregressive": ["target"], "draft": ["draft", "target"],
                 "retrieval": ["middle", "target"], "triforce": ["draft", "middle", "target"]}[mode]
        self.counters: dict[str, PassCounter] = {n: PassCounter(n) for n in names}
        self.tokens = 0
        self.rounds = 0
        self._memo: dict | None = None

    # -- counters -------------------------------------------------------------------------------
    def tokens_per_target_pass(self) -> float:
        """Tokens emitted per target verification pass (the prefill not counted)."""
        p = self.counters["target"].passes
        return self.tokens / p if p else float("nan")

    def reset_counters(self) -> None:
        """Zero every level's counters and the token and round counts."""
        for c in self.counters.values():
            c.reset()
        self.tokens = self.rounds = 0

    def summary(self) -> dict[str, float]:
        """Passes, proposals and acceptance per level, tokens, tokens per target pass."""
        out: dict[str, float] = {"tokens": self.tokens, "rounds": self.rounds,
                                 "tokens_per_target_pass": self.tokens_per_target_pass()}
        for n, c in self.counters.items():
            out[f"{n}_passes"] = c.passes
            out[f"{n}_proposed"] = c.proposed
            out[f"{n}_accepted"] = c.accepted
            out[f"{n}_acceptance"] = c.acceptance
        return out

    # -- prefill ----------------------------------------------------------------------------------
    def _check_prompt(self, prompt_ids: Tensor, max_new_tokens: int) -> list[int]:
        if (not isinstance(prompt_ids, Tensor) or prompt_ids.dtype != torch.long
                or prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1 or prompt_ids.shape[1] < 2):
            desc = (f"shape {tuple(prompt_ids.shape)}, dtype {prompt_ids.dtype}"
                    if isinstance(prompt_ids, Tensor) else type(prompt_ids).__name__)
            raise ValueError(f"prompt_ids must be a (1, T) torch.long tensor with T >= 2; got {desc}")
        _check_int("max_new_tokens", max_new_tokens, 0)
        T = prompt_ids.shape[1]
        cfg = self.config
        if self.mode in ("retrieval", "triforce"):
            c = cfg.chunk_size
            if T - 1 < cfg.budget + c:
                raise ValueError(
                    f"prompt_ids has T={T} tokens; the retrieval cache (budget={cfg.budget}) needs "
                    f"T - 1 >= budget + chunk_size = {cfg.budget + c} (a shorter prompt fits the "
                    "budget whole: use mode='draft' or a smaller budget)")
            tail_start = ((T - 1) // c) * c
            room = cfg.budget - c - (T - 1 - tail_start)
            if max_new_tokens > room + 1:
                raise ValueError(
                    f"max_new_tokens={max_new_tokens} does not fit the retrieval cache's tail: "
                    f"budget={cfg.budget} leaves room for {room + 1} generated tokens after chunk 0 "
                    f"and the prompt's last partial chunk; raise budget")
        return prompt_ids[0].tolist()

    @torch.no_grad()
    def prefill(self, prompt_ids: Tensor) -> _State:
        """Read the prompt into every level's cache; build the retrieval cache."""
        cfg = self.config
        seq = prompt_ids[0].tolist()
        levels: dict[str, _Level] = {}
        tgt = _Level(self.target, cfg.sampling, self.counters["target"])
        _, cache = self.target.prefill(prompt_ids[:, :-1], chunk_size=cfg.prefill_chunk)
        out = self.target(prompt_ids[:, -1:], cache, return_queries=True)
        tgt.reset(out.cache, seq, {len(seq): cfg.sampling.probs(out.logits[0, -1].double())})
        levels["target"] = tgt
        rc = None
        if "middle" in self.counters:
            rc = build_retrieval_cache(cache, [q[:, :, -1] for q in out.queries], cfg.budget,
                                       cfg.chunk_size)
            mid = _Level(self.target, cfg.sampling, self.counters["middle"])
            mid.reset(rc.cache, seq[:-1], {})
            levels["middle"] = mid
        if "draft" in self.counters:
            policy = self._draft_policy()
            logits, dcache = self.draft.prefill(prompt_ids, chunk_size=cfg.prefill_chunk, policy=policy)
            d = _Level(self.draft, cfg.sampling, self.counters["draft"])
            d.reset(dcache, seq, {len(seq): cfg.sampling.probs(logits[0, -1].double())})
            levels["draft"] = d
        return _State(seq, levels, rc)

    def _draft_policy(self) -> StreamingLLM | None:
        cfg = self.config
        if cfg.draft_budget is None:
            return None
        return StreamingLLM(cfg.draft_budget, cfg.draft_sinks, reindex=True)

    # -- one round --------------------------------------------------------------------------------
    def _laws(self, state: _State, name: str, seq: list[int], start: int) -> list[Tensor]:
        if self._memo is not None:
            key = (state.rounds, name, tuple(seq), start)
            hit = self._memo.get(key)
            if hit is None:
                hit = state.levels[name].laws_after(seq, start)
                self._memo[key] = hit
            return hit
        return state.levels[name].laws_after(seq, start)

    def _begin_round(self, state: _State) -> None:
        """Roll every cache back to the emitted sequence; refresh the middle; compress the draft."""
        seq = state.seq
        for lv in state.levels.values():
            lv.rollback_to(seq)
        if "middle" in state.levels and state.rounds:  # round 1: the middle is as prefill left it
            tgt, mid = state.levels["target"], state.levels["middle"]
            if self._memo is None:
                state.retrieval.refresh(tgt.cache)
                mid.reset(state.retrieval.cache, tgt.held, {})
            else:  # memoised laws may have skipped target passes: rebuild the round's start once
                key = ("middle-start", state.rounds)
                if key not in self._memo:
                    full = seq[:-1]  # the target's cache at a round start
                    if len(tgt.held) < len(full):
                        tgt.laws_after(full, len(full))
                    rc = state.retrieval.refresh(tgt.cache)
                    self._memo[key] = (rc.cache, list(tgt.held))
                cache, held = self._memo[key]
                mid.reset(cache, held, {})
        if "draft" in state.levels and self.config.draft_budget is not None:
            d = state.levels["draft"]
            if d.cache.length > self.config.draft_budget:
                d.cache = d.cache.clone().compress(self._draft_policy())

    def _round(self, state: _State, chooser: _Chooser) -> tuple[int, ...]:
        """One round from ``state`` (updated in place); returns the emitted tokens."""
        self._begin_round(state)
        c, seq, gamma = self.counters, state.seq, self.config.gamma
        if self.mode == "autoregressive":
            (p,) = self._laws(state, "target", seq, len(seq))
            out: tuple[int, ...] = (chooser.choice(p),)
            self._finish(state, out)
            return out
        props: list[int] = []
        qs: list[Tensor] = []
        if self.mode in ("draft", "retrieval"):
            name = "draft" if self.mode == "draft" else "middle"
            for _ in range(gamma):
                (q,) = self._laws(state, name, seq + props, len(seq) + len(props))
                props.append(chooser.choice(q))
                qs.append(q)
            proposer = name
        else:
            while len(props) < gamma:
                ctx = seq + props
                (q,) = self._laws(state, "draft", ctx, len(ctx))
                x = chooser.choice(q)
                p_mid, p_next = self._laws(state, "middle", ctx + [x], len(ctx))
                c["draft"].proposed += 1
                ok, y = _accept_or_resample(p_mid, q, x, chooser, released=self.config.released)
                props.append(y)
                qs.append(p_mid)
                if ok:
                    c["draft"].accepted += 1
                    props.append(chooser.choice(p_next))  # the middle's bonus token
                    qs.append(p_next)
            proposer = "middle"
        p_t = self._laws(state, "target", seq + props, len(seq))  # γ' + 1 laws, one pass
        res = _verify(props, qs, p_t, chooser)
        for n in (proposer, "target"):
            c[n].proposed += len(props)
            c[n].accepted += res.accepted
        self._finish(state, res.tokens)
        return res.tokens

    def _finish(self, state: _State, tokens: tuple[int, ...]) -> None:
        state.seq = state.seq + list(tokens)
        state.rounds = state.rounds + (tokens,)
        self.tokens += len(tokens)
        self.rounds += 1

    # -- public -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, max_new_tokens: int,
                 generator: torch.Generator | None = None) -> Tensor:
        """``max_new_tokens`` tokens after ``prompt_ids`` (1, T): a (1, max_new_tokens) long tensor.

        Counters accumulate across calls (:meth:`~mini.triforce.hierarchy.TriForce.reset_counters`).
        """
        self._check_prompt(prompt_ids, max_new_tokens)
        chooser = _Sampler(generator)
        state = self.prefill(prompt_ids)
        T = len(state.seq)
        while len(state.seq) - T < max_new_tokens:
            self._round(state, chooser)
        self.last_state = state
        return torch.tensor([state.seq[T:T + max_new_tokens]], dtype=torch.long)

    def _run_n(self, start: _State, n_tokens: int) -> Callable[[_Chooser], tuple[int, ...]]:
        T = len(start.seq)

        def run(chooser: _Chooser) -> tuple[int, ...]:
            state = start.clone()
            while len(state.seq) - T < n_tokens:
                self._round(state, chooser)
            return tuple(state.seq[T:T + n_tokens])
        return run

    @torch.no_grad()
    def first_tokens_law(self, prompt_ids: Tensor, n_tokens: int = 1) -> dict[tuple[int, ...], float]:
        """The exact law of the first ``n_tokens`` emitted tokens, by enumerating every random
        decision of the real-model rounds, round by round (a round that emits fewer tokens is
        followed by the enumeration of the next one from its end state); each distinct forward
        pass runs once. Small vocabularies only (the branches multiply)."""
        self._check_prompt(prompt_ids, n_tokens)
        _check_int("n_tokens", n_tokens, 1)
        start = self.prefill(prompt_ids)
        saved = {k: (c.passes, c.proposed, c.accepted) for k, c in self.counters.items()}
        tokens, rounds = self.tokens, self.rounds

        def law(state: _State, n: int) -> dict[tuple[int, ...], float]:
            ends: dict[tuple[int, ...], _State] = {}

            def run(chooser: _Chooser) -> tuple[int, ...]:
                st = state.clone()
                out = self._round(st, chooser)
                ends.setdefault(out, st)
                return out
            res: dict[tuple[int, ...], float] = {}
            for toks, w in enumerate_law(run).items():
                if len(toks) >= n:
                    res[toks[:n]] = res.get(toks[:n], 0.0) + w
                else:
                    for rest, w2 in law(ends[toks], n - len(toks)).items():
                        k = toks + rest
                        res[k] = res.get(k, 0.0) + w * w2
            return res

        self._memo = {}
        try:
            return law(start, n_tokens)
        finally:
            self._memo = None
            for k, (a, b, d) in saved.items():
                self.counters[k].passes, self.counters[k].proposed, self.counters[k].accepted = a, b, d
            self.tokens, self.rounds = tokens, rounds

    @torch.no_grad()
    def target_law(self, prompt_ids: Tensor, n_tokens: int = 1) -> dict[tuple[int, ...], float]:
        """The exact law of ``n_tokens`` tokens sampled from the processed target (fresh full
        forwards on each prefix; the reference the hierarchy must match)."""
        _check_int("n_tokens", n_tokens, 1)
        out: dict[tuple[int, ...], float] = {(): 1.0}
        for _ in range(n_tokens):
            nxt: dict[tuple[int, ...], float] = {}
            for s, w in out.items():
                ids = torch.cat([prompt_ids, torch.tensor([list(s)], dtype=torch.long)], dim=1)
                p = self.config.sampling.probs(self.target(ids).logits[0, -1].double()).tolist()
                for t, pt in enumerate(p):
                    if pt > 0:
                        nxt[s + (t,)] = w * pt
            out = nxt
        return out

    @torch.no_grad()
    def sample_first_tokens(self, prompt_ids: Tensor, n: int, n_tokens: int = 2,
                            generator: torch.Generator | None = None, *, memo: bool = True
                            ) -> dict[tuple[int, ...], int]:
        """Counts of the first ``n_tokens`` tokens over ``n`` independent generations after one
        prefilled prompt (each starts from a clone of its caches). ``memo=True`` computes each
        distinct forward pass once (a level's law is a function of the round history, so the
        samples are distributed exactly as without it, and much faster)."""
        self._check_prompt(prompt_ids, n_tokens)
        _check_int("n", n, 1)
        _check_int("n_tokens", n_tokens, 1)
        start = self.prefill(prompt_ids)
        run = self._run_n(start, n_tokens)
        chooser = _Sampler(generator)
        counts: dict[tuple[int, ...], int] = {}
        self._memo = {} if memo else None
        try:
            for _ in range(n):
                out = run(chooser)
                counts[out] = counts.get(out, 0) + 1
        finally:
            self._memo = None
        return counts
