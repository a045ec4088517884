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

This module knows logits and sampling parameters only. It does not draw (the sampler adds
the Gumbel noise) and does not see penalties, bias or grammar masks (applied before it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def cut(scaled: mx.array, params: list, sampling: list[bool], candidates: int = CANDIDATES) -> Cut:
    """The thresholds of every row, and the candidate view when it is exact.

    Args:
        scaled: [B, V] float32 temperature-scaled logits.
        params: B ``SamplingParams`` (top_k, top_p, min_p are read).
        sampling: B flags; False for rows whose draw is discarded (greedy), which never force
            the full-vocabulary view.
        candidates: M for rows without top_k (``CANDIDATES``; tests force V, the full sort).

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
        if not any(sampling[i] for i in redo) and all(r or not s for r, s in zip(ranked, sampling)):
            kept = values >= threshold
            if floor is not None:
                kept = kept & (values >= floor)
            return Cut(threshold, floor, ids, values, kept)
    return Cut(threshold, floor)


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


def _row_mass(scaled: mx.array, top: mx.array) -> mx.array:
    """[B, 1] sum of exp(l - top) over each whole (unsorted) row."""
    if fast_math_in_use():
        return _fastmath.exp(scaled, top).sum(axis=-1, keepdims=True)
    return mx.exp(scaled - top).sum(axis=-1, keepdims=True)


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
