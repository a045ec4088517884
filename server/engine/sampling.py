"""Per-request sampling parameters and the batched sampler.

This module knows about logits and token ids only: it never sees text, HTTP or the KV cache.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import mlx.core as mx

from moeserve.server.engine import truncation


@dataclass(slots=True)
class SamplingParams:
    """How one sequence picks its next tokens; validated by the API before it gets here."""

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass kept; 1.0 disables
    top_k: int = 0  # keep the k most likely tokens; 0 disables
    min_p: float = 0.0  # drop tokens below min_p * p(max); 0 disables
    presence_penalty: float = 0.0  # OpenAI: subtract once for every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # extension (CTRL/HF): divide positive logits of seen tokens
    logit_bias: dict[int, float] | None = None  # token id -> additive bias, as OpenAI
    seed: int | None = None  # a seeded row samples the same whatever batch it is in
    logprobs: bool = False  # return the chosen token's log-probability
    top_logprobs: int = 0  # and the n most likely alternatives (0..20)
    max_tokens: int = 256  # generated-token limit; finish_reason "length" when reached
    min_tokens: int = 0  # stop tokens are suppressed until this many were generated
    ignore_eos: bool = False  # keep generating past EOS (benchmarks fix the output length)
    stop: list[str] = field(default_factory=list)  # stop strings, matched on text
    stop_token_ids: list[int] = field(default_factory=list)  # extra ids that end the sequence


# Greedy below this temperature: dividing by a tinier one only risks overflow (vLLM's convention).
GREEDY_TEMPERATURE = 1e-5
MAX_TOP_LOGPROBS = 20  # the OpenAI limit; the API rejects more


class Row(Protocol):
    """What the sampler reads of one batch row (the engine passes its ``Sequence`` objects)."""

    @property
    def params(self) -> SamplingParams: ...  # noqa: D102
    @property
    def output_ids(self) -> list[int]: ...  # noqa: D102
    @property
    def prompt_ids(self) -> list[int]: ...  # noqa: D102
    @property
    def banned_ids(self) -> frozenset[int]: ...  # noqa: D102
    @property
    def step(self) -> int: ...  # noqa: D102
    @property
    def choice(self) -> int: ...  # noqa: D102


@dataclass(slots=True)
class SamplerRow:
    """A standalone ``Row``: one sequence's parameters and the history penalties need."""

    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)  # generated so far (all penalties)
    prompt_ids: list[int] = field(default_factory=list)  # repetition penalty also covers the prompt
    banned_ids: frozenset[int] = frozenset()  # EOS before min_tokens, say; out-of-vocab ignored
    step: int = 0  # tokens this row sampled so far; indexes a seeded row's noise
    choice: int = 0  # choice index (n > 1): seeded choices of one request draw differently


@dataclass(slots=True)
class TokenSample:
    """One row's sampled token as plain Python, safe to hand to the asyncio side."""

    token: int
    logprob: float | None  # None unless the row asked for logprobs
    top: list[tuple[int, float]] = field(default_factory=list)  # (id, logprob), best first


@dataclass
class SampleOutput:
    """A batch's sampling result, still on the device; `to_lists` brings it to the host."""

    tokens: mx.array  # int32 [B]
    logprobs: mx.array | None = None  # float32 [B]: chosen token under the raw distribution
    top_ids: mx.array | None = None  # int32 [B, K], K = largest top_logprobs in the batch
    top_logprobs: mx.array | None = None  # float32 [B, K], descending along K

    def to_lists(self, rows: Sequence[Row]) -> list[TokenSample]:
        """Convert to plain Python with a single host synchronisation for the whole batch.

        Args:
            rows: The rows passed to the sampler, in the same order.

        Returns:
            One `TokenSample` per row; `top` is cut to that row's own `top_logprobs`.
        """
        arrays = [self.tokens, self.logprobs, self.top_ids, self.top_logprobs]
        mx.eval(*[a for a in arrays if a is not None])
        tokens, lps, top_ids, top_lps = (None if a is None else a.tolist() for a in arrays)
        if len(tokens) != len(rows):
            raise ValueError(f"{len(rows)} rows for a batch of {len(tokens)} tokens")
        samples = []
        for i, row in enumerate(rows):
            n_top = min(row.params.top_logprobs, MAX_TOP_LOGPROBS)
            want = lps is not None and (row.params.logprobs or n_top > 0)
            top = list(zip(top_ids[i][:n_top], top_lps[i][:n_top])) if n_top and top_ids else []
            samples.append(TokenSample(tokens[i], lps[i] if want else None, top))
        return samples


class Sampler:
    """Picks the next token of every row of a batch at once.

    Order of operations, and why:

    1. Raw log-probabilities for the response come first, from the untouched logits, so that
       reported logprobs describe the model and not our sampling choices (vLLM's default).
    2. `logit_bias`, then banned ids (-inf), then `allowed_mask`: what the request and the
       engine allow. Bans come after the bias so no bias can revive a banned token, and all
       three precede the penalties, which can only scale or shift: -inf stays -inf.
    3. Repetition, then presence/frequency penalties; greedy rows take the argmax here, so a
       greedy row sees bias and penalties but never temperature or the truncations.
    4. Temperature, then top_k, top_p and min_p on the scaled logits, each of which only removes
       tokens; a disabled truncation leaves a row bit-for-bit unchanged, so a row's result does
       not depend on what the other rows of its batch ask for.
    5. Gumbel-max sampling: argmax(logits / T + G) is an exact draw from softmax(logits / T).
       Seeded rows take G from a key built from (seed, step), everyone else from one batched call
       on MLX's global generator.

    The common case (no penalty, bias, ban or seed) is a few batched ops with no per-row MLX work.
    A row whose every token is forbidden gets token 0: the engine must never ban them all. That
    is why a grammar row (``allowed_mask`` from ``server.engine.grammar``) never gets
    ``min_tokens``' EOS ban: once its grammar is complete, EOS is the only token it allows.

    top_k and top_p never sort the whole vocabulary unless a row's nucleus is wider than its
    best ``candidates`` tokens (``server.engine.truncation``), and when every sampling row
    truncates by rank, the Gumbel draw runs over those candidates only.

    Args:
        candidates: Tokens examined per row before a full sort (tests force the vocabulary
            size, the full-sort reference).
    """

    def __init__(self, candidates: int = truncation.CANDIDATES) -> None:
        if candidates < 1:
            raise ValueError(f"candidates must be positive, got {candidates}")
        self.candidates = candidates

    def __call__(
        self,
        logits: mx.array,
        rows: Sequence[Row],
        allowed_mask: mx.array | None = None,
    ) -> SampleOutput:
        """Sample one token per row.

        Args:
            logits: [B, V] next-token logits, any float dtype (computed in float32).
            rows: B rows, one per batch row.
            allowed_mask: Optional bool [B, V]; False forbids a token (grammar decoding).

        Returns:
            The sampled tokens and, if any row asked, their raw logprobs and top alternatives.
        """
        logits = self._checked(logits, rows, allowed_mask)
        raw_lp = chosen_lp = top_ids = top_lps = None
        if any(r.params.logprobs or r.params.top_logprobs > 0 for r in rows):
            raw_lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # [B, V]
            top_ids, top_lps = _top_logprobs(raw_lp, rows)
        tokens = _choose(_process(logits, rows, allowed_mask), rows, self.candidates)
        if raw_lp is not None:
            chosen_lp = mx.take_along_axis(raw_lp, tokens[:, None], axis=-1)[:, 0]
        return SampleOutput(tokens, chosen_lp, top_ids, top_lps)

    def process_logits(
        self,
        logits: mx.array,
        rows: Sequence[Row],
        allowed_mask: mx.array | None = None,
    ) -> mx.array:
        """Apply bias, bans, the allowed mask and the penalties (steps 2-3 of the class doc).

        Args:
            logits: [B, V] raw logits.
            rows: B rows.
            allowed_mask: Optional bool [B, V].

        Returns:
            float32 [B, V] logits as greedy rows see them, before temperature and truncation.
        """
        return _process(self._checked(logits, rows, allowed_mask), rows, allowed_mask)

    @staticmethod
    def _checked(logits: mx.array, rows: Sequence[Row], allowed_mask: mx.array | None) -> mx.array:
        if logits.ndim != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [B, V] with B={len(rows)}, got {logits.shape}")
        if allowed_mask is not None and allowed_mask.shape != logits.shape:
            raise ValueError(f"allowed_mask {allowed_mask.shape} does not match {logits.shape}")
        return logits.astype(mx.float32)


def _process(logits: mx.array, rows: Sequence[Row], allowed_mask: mx.array | None) -> mx.array:
    V = logits.shape[1]
    logits = _scatter_add(logits, _bias_edits(rows, V))
    if allowed_mask is not None:
        logits = mx.where(allowed_mask, logits, -mx.inf)
    logits = _apply_repetition(logits, rows, V)
    return _scatter_add(logits, _presence_edits(rows, V))


@dataclass(slots=True)
class _Edits:
    """Sparse (row, token, value) edits gathered in Python, then applied in one scatter."""

    rows: list[int] = field(default_factory=list)
    cols: list[int] = field(default_factory=list)
    vals: list[float] = field(default_factory=list)

    def add(self, row: int, tokens: Iterable[int], values: Iterable[float]) -> None:
        for tok, val in zip(tokens, values):
            self.rows.append(row)
            self.cols.append(tok)
            self.vals.append(val)

    def indices(self) -> tuple[mx.array, mx.array]:
        return mx.array(self.rows), mx.array(self.cols)


def _check_ids(ids: Iterable[int], V: int, what: str) -> None:
    bad = [t for t in ids if not 0 <= t < V]
    if bad:
        raise ValueError(f"{what} holds token ids outside the vocabulary [0, {V}): {bad[:5]}")


def _bias_edits(rows: Sequence[Row], V: int) -> _Edits:
    edits = _Edits()
    for i, row in enumerate(rows):
        bias = row.params.logit_bias or {}
        _check_ids(bias, V, "logit_bias")
        edits.add(i, bias, (float(b) for b in bias.values()))
        # Adding -inf bans regardless of any bias on the same token (b + -inf = -inf). An id
        # the model cannot produce (a user's stop_token_ids, say) needs no ban: skip, never fail.
        banned = [t for t in row.banned_ids if 0 <= t < V]
        edits.add(i, banned, [-math.inf] * len(banned))
    return edits


def _presence_edits(rows: Sequence[Row], V: int) -> _Edits:
    edits = _Edits()
    for i, row in enumerate(rows):
        p = row.params
        if (p.presence_penalty == 0.0 and p.frequency_penalty == 0.0) or not row.output_ids:
            continue
        _check_ids(row.output_ids, V, "output_ids")
        # OpenAI: logit -= presence * (count > 0) + frequency * count, over generated tokens.
        counts = Counter(row.output_ids)
        pens = (p.presence_penalty + p.frequency_penalty * n for n in counts.values())
        edits.add(i, counts, (-x for x in pens))
    return edits


def _scatter_add(logits: mx.array, edits: _Edits) -> mx.array:
    if not edits.rows:
        return logits
    rr, cc = edits.indices()
    return logits.at[rr, cc].add(mx.array(edits.vals, dtype=mx.float32))


def _apply_repetition(logits: mx.array, rows: Sequence[Row], V: int) -> mx.array:
    """CTRL/HF repetition penalty over prompt + output: positive logits / p, negative * p."""
    edits = _Edits()
    for i, row in enumerate(rows):
        p = row.params.repetition_penalty
        if p == 1.0:
            continue
        seen = set(row.prompt_ids)
        seen.update(row.output_ids)
        _check_ids(seen, V, "prompt_ids/output_ids")
        edits.add(i, seen, [p] * len(seen))
    if not edits.rows:
        return logits
    rr, cc = edits.indices()
    pen = mx.array(edits.vals, dtype=mx.float32)
    # A multiplicative scatter over unique (row, token) pairs; -inf stays -inf (an add would NaN).
    return logits.at[rr, cc].multiply(mx.where(logits[rr, cc] > 0, 1.0 / pen, pen))


def _top_logprobs(raw_lp: mx.array, rows: Sequence[Row]) -> tuple[mx.array | None, ...]:
    K = min(max(r.params.top_logprobs for r in rows), MAX_TOP_LOGPROBS, raw_lp.shape[1])
    if K <= 0:
        return None, None
    # argpartition finds the K best in O(V); only those K are then sorted.
    part = mx.argpartition(-raw_lp, kth=K - 1, axis=-1)[:, :K].astype(mx.int32)  # [B, K]
    vals = mx.take_along_axis(raw_lp, part, axis=-1)
    order = mx.argsort(-vals, axis=-1)
    return mx.take_along_axis(part, order, axis=-1), mx.take_along_axis(vals, order, axis=-1)


def _choose(processed: mx.array, rows: Sequence[Row], candidates: int) -> mx.array:
    """Greedy argmax for temperature-0 rows, Gumbel-max over truncated logits for the rest.

    When every sampling row truncates by rank and its kept set lies among its candidates
    (``server.engine.truncation``), the draw runs over those [B, M] candidates only; otherwise
    over [B, V] with -inf outside the kept set. Both draw exactly from the same distribution.
    """
    greedy = [r.params.temperature < GREEDY_TEMPERATURE for r in rows]
    if all(greedy):
        return mx.argmax(processed, axis=-1).astype(mx.int32)
    temps = [1.0 if g else r.params.temperature for g, r in zip(greedy, rows)]
    scaled = processed / mx.array(temps, dtype=mx.float32)[:, None]  # [B, V]
    params = [r.params for r in rows]
    sampling = [not g for g in greedy]
    if any(truncation.truncates(p) for p in params):
        cut = truncation.cut(scaled, params, sampling, candidates, defer=True)
        if cut.ids is not None:  # [B, M] view: only candidates can be drawn
            noise = _gumbel_noise(rows, greedy, cut.ids.shape, V=scaled.shape[1], ids=cut.ids)
            pick = mx.argmax(mx.where(cut.kept, cut.values + noise, -mx.inf), axis=-1)
            sampled = mx.take_along_axis(cut.ids, pick[:, None], axis=-1)[:, 0]
            return _greedy_where(greedy, processed, sampled)
        scores = cut.apply(scaled) + _gumbel_noise(rows, greedy, scaled.shape)
        sampled = mx.argmax(scores, axis=-1)
        if cut.deferred:
            sampled = truncation.draw_deferred(sampled, scores, scaled, params, cut.deferred)
        return _greedy_where(greedy, processed, sampled)
    sampled = mx.argmax(scaled + _gumbel_noise(rows, greedy, scaled.shape), axis=-1)
    return _greedy_where(greedy, processed, sampled)


def _greedy_where(greedy: list[bool], processed: mx.array, sampled: mx.array) -> mx.array:
    """Greedy rows take the argmax of ``processed`` (ties: lowest id), the rest ``sampled``."""
    if any(greedy):
        sampled = mx.where(mx.array(greedy), mx.argmax(processed, axis=-1), sampled)
    return sampled.astype(mx.int32)


def _gumbel_noise(
    rows: Sequence[Row],
    greedy: list[bool],
    shape: tuple[int, int],
    V: int | None = None,
    ids: mx.array | None = None,
) -> mx.array:
    """Gumbel noise ``shape``: (seed, step) keys for seeded rows, the global generator for others.

    With ``ids`` ([B, M] candidate token ids of a V-token vocabulary), a seeded row still draws
    noise over all V tokens and takes it at its candidates, so its sample does not depend on
    whether the draw ran over candidates or the whole vocabulary; unseeded rows draw [B, M].
    """
    seeded = [i for i, r in enumerate(rows) if r.params.seed is not None and not greedy[i]]
    if len(seeded) < greedy.count(False):  # some row samples from the global generator
        noise = mx.random.gumbel(shape=shape)
    else:
        noise = mx.zeros(shape, dtype=mx.float32)
    if seeded:
        keys = mx.stack(
            [row_key(rows[i].params.seed, rows[i].step, rows[i].choice) for i in seeded]
        )  # [S, 2]
        width = shape[1] if ids is None else V
        draw = mx.vmap(lambda k: mx.random.gumbel(shape=(width,), key=k))(keys)  # [S, V]
        if ids is not None:
            draw = mx.take_along_axis(draw, ids[mx.array(seeded)], axis=-1)  # [S, M]
        noise[mx.array(seeded)] = draw
    return noise


def fresh_generator() -> None:
    """Seed the calling thread's random generator from the operating system's entropy.

    Since MLX 0.32 every thread has its own generator, and each new thread's starts from the
    same per-process key: two engines in one process (an engine restarted, two engines side by
    side in a benchmark, the tests' in-process servers) would otherwise draw identical noise
    for their unseeded rows. The engine thread calls this once, before its first step.
    Seeded rows are unaffected: their keys come from ``row_key``.
    """
    mx.random.seed(int.from_bytes(os.urandom(8), "little"))


def row_key(seed: int, step: int, choice: int = 0) -> mx.array:
    """The PRNG key of a seeded row at one step: a function of (seed, step, choice) only.

    MLX has no `fold_in`, so seed and step are mixed in Python with the SplitMix64 finalizer (a
    bijection of 64-bit integers) and the result seeds `mx.random.key`.

    Args:
        seed: The request's seed (any int; taken modulo 2**64).
        step: How many tokens the row sampled before this one.
        choice: The choice index; 0 keeps the key of an ``n = 1`` request with this seed.

    Returns:
        A key for `mx.random` functions.
    """
    stream = (choice * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)  # 0 for the first choice
    return mx.random.key(_splitmix64(_splitmix64(seed ^ stream) ^ step))


def _splitmix64(x: int) -> int:
    mask = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)
