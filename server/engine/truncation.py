"""top_k, top_p and min_p as per-row logit thresholds, found without sorting the vocabulary.

The sampler (``server.engine.sampling``) hands this module temperature-scaled logits
``[B, V]`` and each row's parameters; it answers with the smallest logit each row keeps
(``Cut.threshold``) and, when every sampling row's kept set lies among a few candidates, those
candidates (``Cut.ids``, ``Cut.values``, ``Cut.kept``), so that the draw itself can run over
``[B, M]`` instead of ``[B, V]``.

Definitions (the full-sort reference, which every shortcut here must reproduce exactly):

* ``top_k``: keep the k largest logits; tokens tied with the k-th are all kept.
* ``top_p``: sort descending, take probabilities (softmax over the whole row, or over the top_k
  survivors when top_k is set), and keep a token while the mass strictly before it is below
  ``top_p``: the smallest nucleus reaching ``top_p``. Tokens tied with the last kept one are
  kept too, so the kept set never depends on how a sort orders ties.
* ``min_p``: keep ``l >= l_max + log(min_p)`` (``p >= min_p * p_max``).

Why partial selection: a full sort of 151,936 logits costs ~0.2 s for 16 rows on a CPU
(``bench/RESULTS.md``), longer than a decode step. The nucleus of a trained model usually lies
within its best few hundred tokens, and the best M of a row come out of ``argpartition`` in
O(V). Their descending values are the first M values of the full sort (whatever tokens
partition picks among ties at the M-th value: the values are the same), so the prefix sums,
and so every keep decision inside them, are the full sort's own, computed the same way in the
same order. A row needs the full sort only when its threshold equals the M-th candidate's
value: either its nucleus is not complete within the M candidates (their mass is below
``top_p``, so all are kept), or tokens outside them, tied with the last one, are kept too.

Only those rows are then sorted in full; finding them costs a host synchronisation (a
boolean per row; two when some row is unsure, below) in steps that truncate by rank.

top_p without top_k also needs the row's normaliser, the sum of ``exp(l - l_max)`` over the
whole row: a pass over V as costly as the partition. It is first only bracketed: at least the
candidates' mass, at most that plus ``V - M`` times the last candidate's term. Where both ends
keep the same prefix (a peaked row whose tail lies far below), that is the answer, since the
kept count only grows with the normaliser. Other rows compute it exactly, from the unsorted
row, as the full-sort path does, with the CPU backend's compiled exp where that is in use
(``models.backend``): MLX's own ``exp`` costs ~13 ns an element on x86 CPUs.

A sampling row whose nucleus is wider than its candidates (a flat row: a random model's, or
a trained one at high temperature) is not sorted either when the sampler asks for it
(``cut(defer=True)``): ``nucleus_argmax`` finds the argmax of the noisy logits within the
nucleus by looking above each token it rejects, two passes over the row per round.

This module knows logits and sampling parameters only. It does not make noise (the sampler
adds the Gumbel noise and hands the sums in) and does not see penalties, bias or grammar
masks (applied before it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx

from moeserve.models.backend import fast_math_in_use
from moeserve.models.backend import fastmath as _fastmath

# Candidates taken per row before falling back to a full sort. argpartition costs O(V) whatever
# M is and sorting [B, 4096] is cheap (~3 ms for 16 rows on a CPU), so a generous M makes the
# fallback rare: a trained model's top_p 0.9 nucleus rarely holds more.
CANDIDATES = 4096
# Relative slack on the bounds of a row's normaliser: far above float32 summation error over
# 152k terms (~1e-5 typical), so the bounds hold for the normaliser as the full sort computes it.
BOUND_SLACK = 2e-3
# Rounds of ``nucleus_argmax`` before the rows still open are left to the full sort. A round
# rejects at least one token; a flat random row settles in two or three.
MAX_ROUNDS = 16


@dataclass
class Cut:
    """Per-row thresholds and, when they suffice, the candidates that hold every kept token.

    ``ids``/``values``/``kept`` are set only when, for every row that samples, the tokens with
    ``logit >= threshold`` (and above the min_p floor) are all among its candidates.
    """

    threshold: mx.array  # float32 [B, 1]: smallest kept logit (-inf: no rank truncation)
    floor: mx.array | None  # float32 [B, 1]: min_p's floor, or None when no row uses min_p
    ids: mx.array | None = None  # int32 [B, M]: candidate token ids, best first
    values: mx.array | None = None  # float32 [B, M]: their logits, descending
    kept: mx.array | None = None  # bool [B, M]: candidates that survive every truncation
    # Rows whose nucleus is wider than their candidates, left unsorted (``cut(defer=True)``):
    # their threshold is -inf here, and the draw keeps them in the nucleus (``nucleus_argmax``).
    deferred: list[int] = field(default_factory=list)

    def apply(self, scaled: mx.array) -> mx.array:
        """``scaled`` with -inf outside what the truncations keep.

        Args:
            scaled: [B, V] the logits the cut was computed from.

        Returns:
            [B, V], unchanged where kept (a row with no truncation is returned bit for bit).
        """
        scaled = mx.where(scaled >= self.threshold, scaled, -mx.inf)
        if self.floor is not None:
            scaled = mx.where(scaled >= self.floor, scaled, -mx.inf)
        return scaled


def truncates(p) -> bool:
    """Whether a row's parameters remove any token (``SamplingParams`` or alike).

    Args:
        p: Parameters with ``top_k``, ``top_p`` and ``min_p``.

    Returns:
        True when top_k, top_p or min_p is active.
    """
    return p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0


def cut(
    scaled: mx.array,
    params: list,
    sampling: list[bool],
    candidates: int = CANDIDATES,
    defer: bool = False,
) -> Cut:
    """The thresholds of every row, and the candidate view when it is exact.

    Args:
        scaled: [B, V] float32 temperature-scaled logits.
        params: B ``SamplingParams`` (top_k, top_p, min_p are read).
        sampling: B flags; False for rows whose draw is discarded (greedy), which never force
            the full-vocabulary view.
        candidates: M for rows without top_k (``CANDIDATES``; tests force V, the full sort).
        defer: Leave sampling top_p rows without top_k whose nucleus is wider than their
            candidates unsorted, in ``Cut.deferred``, for ``nucleus_argmax`` to draw from.

    Returns:
        The cut.
    """
    B, V = scaled.shape
    ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    ranked = [p.top_k > 0 or p.top_p < 1.0 for p in params]
    floor = None
    if any(p.min_p > 0.0 for p in params):
        log_min_p = mx.array([_log(p.min_p) for p in params], dtype=mx.float32)[:, None]
        floor = mx.max(scaled, axis=-1, keepdims=True) + log_min_p
    if not any(ranked):
        return Cut(mx.full((B, 1), -mx.inf, dtype=mx.float32), floor)
    # +1: the candidate after the last one any row can keep by rank shows a tie at the cut.
    M = min(V, 1 + max(k if k < V else candidates for k, r in zip(ks, ranked) if r))
    ids, values = _best(scaled, M)
    threshold, unsure = _thresholds(scaled, values, params, ks, bounded=M < V)
    redo: list[int] = []
    if M < V:
        unsure_rows = [i for i, u in enumerate(unsure.tolist()) if u]  # host sync
        # A row the draw can settle itself skips the pass over its row that the exact
        # normaliser costs here (``nucleus_argmax`` makes its own): kept whole in the cut.
        deferred = [i for i in unsure_rows if defer and sampling[i] and ks[i] >= V]
        if deferred:
            threshold[mx.array(deferred)] = -mx.inf
            unsure_rows = [i for i in unsure_rows if i not in deferred]
        if unsure_rows:  # the exact normaliser, over these rows only
            rows = mx.array(unsure_rows)
            sub, sub_params = scaled[rows], [params[i] for i in unsure_rows]
            sub_ks = [ks[i] for i in unsure_rows]
            exact, spill = _thresholds(sub, values[rows], sub_params, sub_ks, bounded=False)
            threshold[rows] = exact
            redo = [i for i, s in zip(unsure_rows, spill.tolist()) if s]  # host sync
        if redo:  # nucleus wider than the candidates, or tied at the last: full sort
            rows = mx.array(redo)
            sub, sub_params, sub_ks = scaled[rows], [params[i] for i in redo], [ks[i] for i in redo]
            threshold[rows] = _thresholds(sub, _best(sub, V)[1], sub_params, sub_ks, False)[0]
        if deferred:
            return Cut(threshold, floor, deferred=deferred)
        if not any(sampling[i] for i in redo) and all(r or not s for r, s in zip(ranked, sampling)):
            kept = values >= threshold
            if floor is not None:
                kept = kept & (values >= floor)
            return Cut(threshold, floor, ids, values, kept)
    return Cut(threshold, floor)


def nucleus_argmax(scores: mx.array, scaled: mx.array, top_p: list[float]) -> tuple[mx.array, list]:
    """Each row's argmax of ``scores`` over its top_p nucleus, found without sorting the row.

    The nucleus is the set of tokens whose logit ``l`` has less than ``top_p`` of the row's
    mass strictly above it (the module docstring's rule: a token is kept exactly when the mass
    of the tokens before its group of ties is below ``top_p``), so it is every token at or
    above some logit. Take the argmax over the whole row; if that token is in the nucleus it
    is the argmax over the nucleus (a subset that holds it). If not, no token at or below its
    logit is, so look again above it. Each round costs two passes over the row, and a flat
    row of a random model needs two or three rounds where a full sort costs ~10 ms a row.

    The mass above a token is summed directly, not as the sorted prefix sum the full sort
    takes; within ``BOUND_SLACK`` of ``top_p`` the two may round differently, so such a row
    is left undecided (the caller sorts it): everything decided here is what the full sort
    decides, for the same ``scores``.

    Args:
        scores: [R, V] what to maximise (logits plus Gumbel noise; -inf where not allowed).
        scaled: [R, V] the temperature-scaled logits that define the nucleus (no other cut).
        top_p: R values below 1.

    Returns:
        int32 [R] chosen ids, and the rows (indices into R) left undecided.
    """
    R = scaled.shape[0]
    top = mx.max(scaled, axis=-1, keepdims=True)
    top = mx.where(mx.isfinite(top), top, 0.0)
    e = _row_exp(scaled, top)
    # Mass compared unnormalised: below top_p of the row is below top_p times its sum.
    limit = (mx.array(top_p, dtype=mx.float32)[:, None] * e.sum(axis=-1, keepdims=True)).tolist()
    above = [-math.inf] * R  # per row: look only above this logit
    chosen = [0] * R
    open_rows, undecided = list(range(R)), []
    for _ in range(MAX_ROUNDS):
        # After the first round few rows are open: only they are read again.
        take = None if len(open_rows) == R else mx.array(open_rows)
        sc, sl, ee = (a if take is None else a[take] for a in (scores, scaled, e))
        if any(above[i] > -math.inf for i in open_rows):  # only above what a row rejected
            floor = mx.array([above[i] for i in open_rows], dtype=mx.float32)[:, None]
            sc = mx.where(sl > floor, sc, -mx.inf)
        pick = mx.argmax(sc, axis=-1)[:, None]
        level = mx.take_along_axis(sl, pick, axis=-1)  # [open, 1]
        mass = mx.where(sl > level, ee, 0.0).sum(axis=-1)
        picks, levels, masses = (x.tolist() for x in (pick[:, 0], level[:, 0], mass))  # sync
        still = []
        for i, t, lv, m in zip(open_rows, picks, levels, masses):
            if m < limit[i][0] * (1.0 - BOUND_SLACK):
                chosen[i] = t  # in the nucleus
            elif m >= limit[i][0] * (1.0 + BOUND_SLACK) and lv > above[i]:
                above[i] = lv  # outside: so is every token at or below it
                still.append(i)
            else:  # too close to call (or nothing left above): the full sort decides
                undecided.append(i)
        open_rows = still
        if not open_rows:
            break
    return mx.array(chosen, dtype=mx.int32), sorted(undecided + open_rows)


def draw_deferred(
    sampled: mx.array, scores: mx.array, scaled: mx.array, params: list, deferred: list[int]
) -> mx.array:
    """Redraw the rows whose nucleus ``truncation.cut`` left unsorted, within their nucleus.

    ``scores`` holds every row's noisy logits after the cut (-inf outside min_p's floor; the
    deferred rows' top_p not yet applied); ``nucleus_argmax`` finds each deferred
    row's argmax over its nucleus, and the few rows it leaves undecided are cut by the full
    sort as before. Either way the token is the argmax over the same kept set of the same
    noise: what the full-sort path draws.
    """
    rows = mx.array(deferred)
    top_p = [params[i].top_p for i in deferred]
    chosen, undecided = nucleus_argmax(scores[rows], scaled[rows], top_p)
    if undecided:
        sub = mx.array([deferred[i] for i in undecided])
        exact = cut(
            scaled[sub],
            [params[deferred[i]] for i in undecided],
            [True] * len(undecided),
            scaled.shape[1],
        )
        kept = mx.where(scaled[sub] >= exact.threshold, scores[sub], -mx.inf)
        chosen[mx.array(undecided)] = mx.argmax(kept, axis=-1).astype(mx.int32)
    sampled = sampled.astype(mx.int32)
    sampled[rows] = chosen
    return sampled


def _best(scaled: mx.array, M: int) -> tuple[mx.array, mx.array]:
    """Ids and values of each row's M largest logits, in descending order: [B, M] each."""
    if scaled.shape[1] > M:
        ids = mx.argpartition(-scaled, kth=M - 1, axis=-1)[:, :M]
    else:
        ids = mx.broadcast_to(mx.arange(M), scaled.shape)
    values = mx.take_along_axis(scaled, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    ids = mx.take_along_axis(ids, order, axis=-1).astype(mx.int32)
    return ids, mx.take_along_axis(values, order, axis=-1)


def _row_exp(scaled: mx.array, top: mx.array) -> mx.array:
    """[B, V] exp(l - top) of each whole row, with the CPU backend's compiled exp in use."""
    return _fastmath.exp(scaled, top) if fast_math_in_use() else mx.exp(scaled - top)


def _row_mass(scaled: mx.array, top: mx.array) -> mx.array:
    """[B, 1] sum of exp(l - top) over each whole (unsorted) row."""
    return _row_exp(scaled, top).sum(axis=-1, keepdims=True)


def _thresholds(
    scaled: mx.array, values: mx.array, params: list, ks: list[int], bounded: bool
) -> tuple[mx.array, mx.array]:
    """Thresholds [B, 1] from the M best ``values``, and which rows are unsure of them [B].

    A row spills when its kept prefix might continue beyond the candidates: its threshold is
    the last candidate's value. That covers both cases of the module docstring: a nucleus
    still short of top_p keeps every candidate, so its threshold is the last one's.

    ``bounded``: instead of the whole row's normaliser (a pass over V), bracket it between
    the candidates' own mass and that plus ``(V - M)`` times the last candidate's share,
    widened by ``BOUND_SLACK`` for rounding. The kept count only grows with the normaliser
    (every prefix sum shrinks), so where both ends keep the same count, so does the exact
    normaliser. Rows where they differ come back unsure, as do spilling rows.
    """
    M, V = values.shape[1], scaled.shape[1]
    top = values[:, :1]
    top = mx.where(mx.isfinite(top), top, 0.0)  # a row of -inf keeps nothing, without NaNs
    e = mx.exp(values - top)  # [B, M]
    in_k = mx.arange(M)[None, :] < mx.array([min(k, M) for k in ks])[:, None]  # [B, M]
    has_k = mx.array([k < V for k in ks])[:, None]
    mass = mx.where(in_k, e, 0.0).sum(axis=-1, keepdims=True)  # the top_k rows' normaliser
    needs_row = any(k >= V and p.top_p < 1.0 for k, p in zip(ks, params))
    if bounded or not needs_row:
        low = mass * (1.0 - BOUND_SLACK)
        high = (mass + (V - M) * e[:, -1:]) * (1.0 + BOUND_SLACK)
        low, high = mx.where(has_k, mass, low), mx.where(has_k, mass, high)
    else:
        low = high = mx.where(has_k, mass, _row_mass(scaled, top))
    top_p = mx.array([p.top_p for p in params], dtype=mx.float32)[:, None]
    p_off = mx.array([p.top_p >= 1.0 for p in params])[:, None]

    def kept_count(z: mx.array) -> mx.array:
        probs = mx.where(in_k, e / z, 0.0)
        # Rounding could push the tail's prefix sum to 1.0, hence the explicit p_off.
        keep = in_k & ((mx.cumsum(probs, axis=-1) - probs < top_p) | p_off)
        return keep.astype(mx.int32).sum(axis=-1, keepdims=True)  # keep is a prefix

    count = kept_count(high)
    # A row with no finite logit keeps nothing, so clamp to stay in range.
    threshold = mx.take_along_axis(values, mx.maximum(count - 1, 0), axis=-1)
    off = mx.array([p.top_k <= 0 and p.top_p >= 1.0 for p in params])[:, None]
    threshold = mx.where(off, -mx.inf, threshold)
    unsure = ~off & (threshold <= values[:, -1:])
    if bounded and needs_row:
        unsure = unsure | (~off & (kept_count(low) != count))
    return threshold, unsure[:, 0]


def _log(x: float) -> float:
    return math.log(x) if x > 0.0 else -math.inf
