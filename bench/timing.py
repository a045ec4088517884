"""One in-process timer for the benchmarks that time a call, not a whole process."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeat: int, warmup: int) -> float:
    """The median wall time of ``fn()`` over ``repeat`` calls, after ``warmup`` untimed ones.

    Args:
        fn: The call to time (it must finish its work, e.g. with ``mx.eval``).
        repeat: Timed calls.
        warmup: Untimed calls first (compilation, caches, page faults).

    Returns:
        Seconds.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
