"""Prometheus metrics for ``GET /metrics``.

One registry per application (not the process-global default), so several apps in one test
process do not collide. Knows prometheus-client and what the API reports; the engine's queue
sizes, KV cache use and preemption count are read through a callback at scrape time (the
preemptions by a small collector, since a prometheus-client ``Counter`` cannot read a value).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

# Seconds; decode steps on a laptop run from a few ms to a few hundred.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _Preemptions(Collector):
    """``moeserve_preemptions_total``: a counter whose value the engine keeps.

    The engine counts preemptions itself (``Scheduler.preemptions``, through ``stats()``);
    a collector hands that count over as a counter at each scrape, which keeps its type
    (``rate()`` works) without a second count to keep in step.
    """

    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self.stats = stats

    def _family(self, value: float) -> CounterMetricFamily:
        # prometheus-client adds the _total suffix to a counter's name when it exposes it.
        return CounterMetricFamily(
            "moeserve_preemptions",
            "Sequences preempted (their KV cache freed, to be recomputed) to stay within "
            "kv_cache_max_bytes",
            value=value,
        )

    def describe(self) -> Iterator[CounterMetricFamily]:
        """The metric's name and type, without reading the engine (registration)."""
        yield self._family(0)

    def collect(self) -> Iterator[CounterMetricFamily]:
        """The engine's count now."""
        yield self._family(self.stats().get("preemptions", 0))


class Metrics:
    """The server's counters, gauges and histograms.

    Args:
        queue_sizes: Returns ``{"running": n, "waiting": n}`` and, when the engine has them,
            ``prompt_cache_bytes``, ``kv_cache_bytes``, ``kv_cache_tokens`` and
            ``preemptions`` when scraped.
        kv_cache_max_bytes: The KV budget, exposed as a gauge; None (no byte bound): absent.
    """

    def __init__(
        self, queue_sizes: Callable[[], dict[str, int]], kv_cache_max_bytes: int | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "moeserve_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("moeserve_prompt_tokens", "Prompt tokens", registry=r)
        self.generation_tokens = Counter(
            "moeserve_generation_tokens", "Generated tokens", registry=r
        )
        self.cache_hit_tokens = Counter(
            "moeserve_prompt_cache_hit_tokens",
            "Prompt tokens reused from the prompt cache",
            registry=r,
        )
        self.cache_miss_tokens = Counter(
            "moeserve_prompt_cache_miss_tokens",
            "Prompt tokens that had to be prefilled",
            registry=r,
        )
        self.ttft = Histogram(
            "moeserve_time_to_first_token_seconds",
            "Time to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "moeserve_inter_token_latency_seconds",
            "Time between streamed tokens",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        running = Gauge(
            "moeserve_running_sequences", "Sequences prefilling or decoding", registry=r
        )
        waiting = Gauge("moeserve_waiting_sequences", "Sequences queued", registry=r)
        cache_bytes = Gauge(
            "moeserve_prompt_cache_bytes", "Bytes of KV held by the prompt cache", registry=r
        )
        running.set_function(lambda: queue_sizes()["running"])
        cache_bytes.set_function(lambda: queue_sizes().get("prompt_cache_bytes", 0))
        waiting.set_function(lambda: queue_sizes()["waiting"])
        kv_bytes = Gauge(
            "moeserve_kv_cache_bytes",
            "Bytes allocated for running sequences' KV caches (used and spare blocks)",
            registry=r,
        )
        kv_tokens = Gauge(
            "moeserve_kv_cache_tokens",
            "Token positions held in running sequences' KV caches",
            registry=r,
        )
        kv_bytes.set_function(lambda: queue_sizes().get("kv_cache_bytes", 0))
        kv_tokens.set_function(lambda: queue_sizes().get("kv_cache_tokens", 0))
        if kv_cache_max_bytes is not None:
            Gauge(
                "moeserve_kv_cache_max_bytes",
                "The KV budget of running sequences (kv_cache_max_bytes)",
                registry=r,
            ).set(kv_cache_max_bytes)
        r.register(_Preemptions(queue_sizes))

    def count_request(self, route: str, status: int) -> None:
        """Count one finished HTTP request.

        Args:
            route: The route path template.
            status: The response status.
        """
        self.requests.labels(route=route, status=str(status)).inc()

    def count_tokens(self, prompt: int, generated: int, cached: int) -> None:
        """Count one finished generation's tokens.

        Args:
            prompt: Prompt tokens.
            generated: Completion tokens.
            cached: Prompt tokens served from the prompt cache.
        """
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(generated)
        self.cache_hit_tokens.inc(cached)
        self.cache_miss_tokens.inc(prompt - cached)

    def render(self) -> bytes:
        """The exposition text.

        Returns:
            Prometheus text format.
        """
        return generate_latest(self.registry)
