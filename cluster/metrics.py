"""Prometheus metrics of one gateway: request latencies from its edges (gRPC and the OpenAI HTTP API
share the request metrics; each has its own request counter), cluster load from the pool.

Each `GatewayMetrics` owns a dedicated CollectorRegistry (several servers can run in one
process, e.g. in tests) and serves it over HTTP with `start_http(port)`.

- Request-side metrics are observed by the gateway's core (cluster/gateway.py) as requests stream: time to first
  token, inter-token latency, request duration, outcomes by status code, tokens.
- Cluster-side metrics (per-worker occupancy, pages, running/waiting, tokens/s, health,
  restarts; routing decisions, retries, resumes, preemptions, rejections, scaling) come from a
  `ClusterSnapshot` the server refreshes from the pool's status() and counters; a custom collector renders the latest snapshot at scrape time, so a
  removed worker's series disappear with it instead of lingering at their last value.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mlaserve.cluster.types import WorkerStatus

# Seconds; decode steps on CPU take tens of ms, on a GPU a few ms, prefills of long prompts seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class PoolCounterSnapshot:
    """A copy of the pool's cumulative counters (cluster/pool.py PoolCounters) at one instant."""

    routing_decisions: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (policy, worker_id) -> n
    preemptions: Mapping[str, int] = field(default_factory=dict)  # worker_id -> n
    retries: int = 0  # attempts moved to another worker (after a failure or a refusal)
    resumes: int = 0  # retries that continued a stream which had already sent tokens
    worker_failures: int = 0  # workers found dead, hung or failed
    worker_losses: int = 0  # request attempts ended by their worker's death
    suspected_poison: int = 0  # requests failed as the suspected cause of worker deaths
    rejected: Mapping[str, int] = field(default_factory=dict)  # reason (queue_full, invalid) -> n
    scale_events: Mapping[str, int] = field(default_factory=dict)  # direction (up, down) -> n

    @classmethod
    def of(cls, counters: Any) -> PoolCounterSnapshot:
        """Copy the fields of the pool's PoolCounters (absent ones count as zero)."""
        if counters is None:
            return cls()

        def num(name: str) -> int:
            return int(getattr(counters, name, 0) or 0)

        return cls(
            routing_decisions=dict(getattr(counters, "routed", None) or {}),
            preemptions=dict(getattr(counters, "preemptions", None) or {}),
            retries=num("retries"),
            resumes=num("resumes"),
            worker_failures=num("worker_failures"),
            worker_losses=num("worker_losses"),
            suspected_poison=num("suspected_poison"),
            rejected={"queue_full": num("rejected_queue_full"), "invalid": num("rejected_invalid")},
            scale_events={"up": num("scale_ups"), "down": num("scale_downs")},
        )


@dataclass(frozen=True)
class ClusterSnapshot:
    """The pool's state at one instant, as the metrics show it."""

    workers: tuple[WorkerStatus, ...] = ()
    counters: PoolCounterSnapshot = field(default_factory=PoolCounterSnapshot)
    taken_at: float = 0.0  # time.monotonic()


def worker_health(status: WorkerStatus) -> str:
    """One word for a worker's state: dead, draining, unhealthy or healthy."""
    if not status.alive:
        return "dead"
    if status.load.draining:
        return "draining"
    return "healthy" if status.load.healthy else "unhealthy"


class _ClusterCollector(Collector):
    """Renders the latest ClusterSnapshot at scrape time."""

    def __init__(self) -> None:
        self._snapshot = ClusterSnapshot()
        self._lock = threading.Lock()

    def update(self, snapshot: ClusterSnapshot) -> None:
        with self._lock:
            self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # dynamic: render nothing at registration time

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snap = self._snapshot
        w = ["worker"]
        occupancy = GaugeMetricFamily(
            "mlaserve_worker_occupancy", "Used / total latent-cache pages", labels=w
        )
        pages = GaugeMetricFamily(
            "mlaserve_worker_pages",
            "Latent-cache pages by state (total, used, free, reserved)",
            labels=[*w, "state"],
        )
        running = GaugeMetricFamily("mlaserve_worker_running", "Requests in the running batch", labels=w)
        waiting = GaugeMetricFamily("mlaserve_worker_waiting", "Requests queued for admission", labels=w)
        queued = GaugeMetricFamily(
            "mlaserve_worker_queued_prompt_tokens", "Prompt tokens of waiting requests", labels=w
        )
        tps = GaugeMetricFamily("mlaserve_worker_tokens_per_second", "Recent decode throughput", labels=w)
        up = GaugeMetricFamily("mlaserve_worker_up", "1 if the worker is alive and healthy", labels=w)
        state = GaugeMetricFamily(
            "mlaserve_worker_state", "1 for the worker's current state", labels=[*w, "state", "device"]
        )
        restarts = CounterMetricFamily(
            "mlaserve_worker_restarts", "Times the worker's actor was replaced", labels=w
        )
        for s in snap.workers:
            load, wid = s.load, s.worker_id
            occupancy.add_metric([wid], load.occupancy)
            for name, value in (
                ("total", load.total_pages),
                ("used", load.used_pages),
                ("free", load.free_pages),
                ("reserved", load.reserved_pages),
            ):
                pages.add_metric([wid, name], value)
            running.add_metric([wid], load.running)
            waiting.add_metric([wid], load.waiting)
            queued.add_metric([wid], load.queued_prompt_tokens)
            tps.add_metric([wid], load.tokens_per_s)
            up.add_metric([wid], 1.0 if s.alive and load.healthy else 0.0)
            state.add_metric([wid, worker_health(s), load.device], 1.0)
            restarts.add_metric([wid], s.restarts)
        yield from (occupancy, pages, running, waiting, queued, tps, up, state, restarts)

        c = snap.counters
        routing = CounterMetricFamily(
            "mlaserve_routing_decisions",
            "Requests the router placed, by policy and worker",
            labels=["policy", "worker"],
        )
        for (policy, wid), n in sorted(c.routing_decisions.items()):
            routing.add_metric([policy, wid], n)
        preemptions = CounterMetricFamily(
            "mlaserve_preemptions", "Requests preempted (pages reclaimed, recomputed later)", labels=w
        )
        for wid, n in sorted(c.preemptions.items()):
            preemptions.add_metric([wid], n)
        rejected = CounterMetricFamily(
            "mlaserve_rejected_requests", "Requests the pool refused, by reason", labels=["reason"]
        )
        for reason, n in sorted(c.rejected.items()):
            rejected.add_metric([reason], n)
        scale = CounterMetricFamily("mlaserve_scale_events", "Autoscaling actions", labels=["direction"])
        for direction, n in sorted(c.scale_events.items()):
            scale.add_metric([direction], n)
        yield from (routing, preemptions, rejected, scale)
        yield CounterMetricFamily(
            "mlaserve_retries",
            "Request attempts moved to another worker (failure or refusal)",
            value=c.retries,
        )
        yield CounterMetricFamily(
            "mlaserve_resumes", "Retries that resumed a stream from the tokens already sent", value=c.resumes
        )
        yield CounterMetricFamily(
            "mlaserve_worker_failures", "Workers found dead, hung or failed", value=c.worker_failures
        )
        yield CounterMetricFamily(
            "mlaserve_worker_losses", "Request attempts ended by their worker's death", value=c.worker_losses
        )
        yield CounterMetricFamily(
            "mlaserve_suspected_poison",
            "Requests failed as the suspected cause of repeated worker deaths",
            value=c.suspected_poison,
        )


class GatewayMetrics:
    """All metrics of one gateway, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mlaserve_requests", "Finished RPCs by method and status code", ["method", "code"], registry=r
        )
        self.in_flight = Gauge("mlaserve_requests_in_flight", "Generation requests in progress", registry=r)
        self.ttft = Histogram(
            "mlaserve_time_to_first_token_seconds",
            "From the request's arrival at the gateway to its first token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "mlaserve_inter_token_latency_seconds",
            "Time between consecutive tokens of one request (a delta of n tokens counts n gaps of dt/n)",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "mlaserve_request_duration_seconds",
            "From arrival to the last token of a generation request",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "mlaserve_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.cached_tokens = Counter(
            "mlaserve_cached_prompt_tokens", "Prompt tokens served from the prefix cache", registry=r
        )
        self.generated_tokens = Counter("mlaserve_generated_tokens", "Tokens streamed to clients", registry=r)
        self.finished = Counter(
            "mlaserve_requests_finished", "Generation requests by finish reason", ["reason"], registry=r
        )
        self.http_requests = Counter(
            "mlaserve_http_requests",
            "Finished requests of the OpenAI HTTP API by path and HTTP status (499: the client went away)",
            ["path", "status"],
            registry=r,
        )
        self._cluster = _ClusterCollector()
        r.register(self._cluster)
        self._http: Any = None
        self._http_thread: threading.Thread | None = None
        self.http_port: int | None = None

    # -- cluster side ---------------------------------------------------------------------------

    def update_cluster(
        self, workers: Sequence[WorkerStatus], counters: PoolCounterSnapshot | None = None
    ) -> None:
        snapshot = ClusterSnapshot(
            workers=tuple(workers), counters=counters or PoolCounterSnapshot(), taken_at=time.monotonic()
        )
        self._cluster.update(snapshot)

    # -- request side ---------------------------------------------------------------------------

    def request_tracker(self, clock: Callable[[], float] = time.monotonic) -> RequestTracker:
        return RequestTracker(self, clock)

    def record_rpc(self, method: str, code: str) -> None:
        self.requests.labels(method=method, code=code).inc()

    def record_http(self, path: str, status: int) -> None:
        self.http_requests.labels(path=path, status=str(status)).inc()

    # -- export ---------------------------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in the Prometheus text format (what a scrape returns)."""
        return generate_latest(self.registry)

    def start_http(self, port: int = 0, addr: str = "0.0.0.0") -> int:
        """Serve /metrics on `port` (0: a free one) in a daemon thread; return the bound port."""
        from prometheus_client import start_http_server

        if self._http is not None:
            raise RuntimeError(f"metrics HTTP server already running on port {self.http_port}")
        self._http, self._http_thread = start_http_server(port, addr=addr, registry=self.registry)
        self.http_port = int(self._http.server_address[1])
        return self.http_port

    def stop_http(self) -> None:
        if self._http is None:
            return
        self._http.shutdown()
        self._http.server_close()
        if self._http_thread is not None:
            self._http_thread.join(timeout=5)
        self._http = self._http_thread = None
        self.http_port = None


class RequestTracker:
    """Times one generation request: call `tokens(n)` per streamed delta, `finish(...)` once."""

    def __init__(self, metrics: GatewayMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._m = metrics
        self._clock = clock
        self._start = clock()
        self._last: float | None = None
        self.first_token_s: float | None = None  # TTFT once the first token arrived
        self._m.in_flight.inc()
        self._open = True

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = self._clock()
        if self._last is None:
            self.first_token_s = now - self._start
            self._m.ttft.observe(self.first_token_s)
            # The first delta's extra tokens (if several arrived at once) have no measurable gap.
        else:
            gap = (now - self._last) / n
            for _ in range(n):
                self._m.itl.observe(gap)
        self._last = now
        self._m.generated_tokens.inc(n)

    def finish(self, reason: str | None, prompt_tokens: int = 0, cached_tokens: int = 0) -> None:
        """Record a completed generation (reason: stop / length / abort)."""
        if not self._open:
            return
        self._open = False
        self._m.in_flight.dec()
        self._m.duration.observe(self._clock() - self._start)
        if reason:
            self._m.finished.labels(reason=reason).inc()
        self._m.prompt_tokens.inc(prompt_tokens)
        self._m.cached_tokens.inc(cached_tokens)

    def close(self) -> None:
        """End tracking without a completed generation (error, cancel): only the in-flight gauge."""
        if self._open:
            self._open = False
            self._m.in_flight.dec()
