"""What an engine step costs, learned online from measured steps.

The scheduler (``server.engine.scheduler``) limits how much prefill a step carries next to
running decodes by *time*: a token budget alone lets a step with a long prompt chunk stall
every running stream for as long as that chunk takes (1.2 s against a 58 ms median on the
glm4_moe bench, ``bench/RESULTS.md``). To size a chunk by time it needs a prediction of a
step's duration from its shape, learned from the steps the engine ran:

    seconds ~= a + b * decode_rows + c * decode_positions + d * prefill_tokens
               + e * prefill_pairs

``decode_positions`` is the context the decode rows attend over (the sum of their lengths),
``prefill_pairs`` the (query, key) pairs of the chunks' causal attention (a chunk of n tokens
starting at s: ``n * (s + n)``). The fit is least squares over the latest ``window`` steps,
made robust to the spikes of a shared machine by reweighting (Huber, a few rounds), with
coefficients kept non-negative (a feature whose weight comes out negative is dropped and the
rest refitted) and a light ridge so that collinear features (rows and positions grow
together) cannot blow up. It refits every ``refit_every`` observations; refitting costs a
few hundred microseconds of plain Python.

It knows step shapes and seconds only: not sequences, models or devices. The engine measures
(``Engine.step``), the scheduler asks. Until the model has seen both decode-only steps and
steps with prefill it predicts nothing, and the scheduler keeps its token budget alone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

HUBER_ROUNDS = 3  # reweighting passes of a refit
RIDGE = 1e-6  # relative to each feature's mean square: enough to tame collinearity


@dataclass(frozen=True, slots=True)
class StepShape:
    """The work of one step, as the cost model sees it."""

    decode_rows: int = 0
    decode_positions: int = 0  # sum of the decode rows' context lengths
    prefill_tokens: int = 0
    prefill_pairs: int = 0  # sum over chunks of n * (start + n)

    def features(self) -> tuple[float, ...]:
        """The regressors, constant term first (scaled to similar magnitudes)."""
        return (
            1.0,
            float(self.decode_rows),
            self.decode_positions / 1024.0,
            float(self.prefill_tokens),
            self.prefill_pairs / 1024.0,
        )


class StepCostModel:
    """Online robust least squares of step seconds on ``StepShape`` features.

    Args:
        window: Latest steps the fit uses, of each kind (with and without prefill, kept apart
            so that a long run of decode-only steps cannot push every prefill out); older
            ones are forgotten, as the machine's speed drifts.
        refit_every: Observations between refits.
    """

    def __init__(self, window: int = 128, refit_every: int = 8) -> None:
        self._decode_only: deque[tuple[tuple[float, ...], float]] = deque(maxlen=window)
        self._with_prefill: deque[tuple[tuple[float, ...], float]] = deque(maxlen=window)
        self._refit_every = refit_every
        self._since_fit = 0
        self.coef: list[float] | None = None  # a..e of the module docstring, once fitted

    def observe(self, shape: StepShape, seconds: float) -> None:
        """Record one measured step.

        Args:
            shape: What the step computed.
            seconds: Its wall time.
        """
        if seconds <= 0.0 or (shape.decode_rows == 0 and shape.prefill_tokens == 0):
            return
        kind = self._with_prefill if shape.prefill_tokens else self._decode_only
        kind.append((shape.features(), seconds))
        self._since_fit += 1
        if self._since_fit >= self._refit_every or self.coef is None:
            self._since_fit = 0
            self.coef = _fit(list(self._decode_only) + list(self._with_prefill))

    def predict(self, shape: StepShape) -> float | None:
        """Predicted seconds of a step of ``shape``, or None while the model knows too little.

        Args:
            shape: The step.

        Returns:
            Seconds, or None.
        """
        if self.coef is None:
            return None
        return sum(c * x for c, x in zip(self.coef, shape.features()))

    def prefill_within(self, seconds: float, start: int, limit: int) -> int:
        """The longest chunk (up to ``limit`` tokens) starting at ``start`` costing <= seconds.

        Args:
            seconds: Time left in the step for this chunk.
            start: Position of the chunk's first token.
            limit: Longest chunk considered.

        Returns:
            Tokens (0 when not even one fits, or the model knows nothing yet).
        """
        if self.coef is None or seconds <= 0.0:
            return 0
        d, e = self.coef[3], self.coef[4] / 1024.0
        lo, hi = 0, limit
        while lo < hi:  # cost grows with n: binary search
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if d * mid + e * mid * (start + mid) <= seconds else (lo, mid - 1)
        return lo

    @property
    def knows_prefill(self) -> bool:
        """Whether the fit has seen steps with and without prefill (its per-token cost)."""
        return self.coef is not None and bool(self._decode_only) and bool(self._with_prefill)


def _fit(obs: list[tuple[tuple[float, ...], float]]) -> list[float] | None:
    """Non-negative, Huber-reweighted, lightly ridged least squares; None if underdetermined."""
    if len(obs) < 3:
        return None
    n_feat = len(obs[0][0])
    active = [j for j in range(n_feat) if any(x[j] != 0.0 for x, _ in obs)]
    weights = [1.0] * len(obs)
    coef = [0.0] * n_feat
    for _ in range(HUBER_ROUNDS):
        while True:
            sol = _solve(obs, weights, active)
            if sol is None:
                return None
            negative = [j for j, c in sol.items() if c < 0.0 and j != 0]
            if not negative:
                break
            active = [j for j in active if j not in negative]
        coef = [sol.get(j, 0.0) for j in range(n_feat)]
        residuals = [y - sum(c * v for c, v in zip(coef, x)) for x, y in obs]
        scale = 1.4826 * _median([abs(r) for r in residuals]) or 1e-9  # robust sigma (MAD)
        k = 1.345 * scale  # Huber's constant: 95% efficiency on Gaussian noise
        weights = [1.0 if abs(r) <= k else k / abs(r) for r in residuals]
    return coef


def _solve(obs, weights: list[float], active: list[int]) -> dict[int, float] | None:
    """Weighted ridge normal equations over the ``active`` features, by Gauss-Jordan."""
    m = len(active)
    a = [[0.0] * (m + 1) for _ in range(m)]
    for (x, y), w in zip(obs, weights):
        xs = [x[j] for j in active]
        for r in range(m):
            wr = w * xs[r]
            row = a[r]
            for c in range(m):
                row[c] += wr * xs[c]
            row[m] += wr * y
    for r in range(1, m):  # ridge on every feature but the constant (active[0] == 0)
        a[r][r] += RIDGE * a[r][r] + 1e-12
    for col in range(m):
        pivot = max(range(col, m), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-18:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        p = a[col][col]
        a[col] = [v / p for v in a[col]]
        for r in range(m):
            if r != col and a[r][col] != 0.0:
                f = a[r][col]
                a[r] = [v - f * u for v, u in zip(a[r], a[col])]
    return {j: a[i][m] for i, j in enumerate(active)}


def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
