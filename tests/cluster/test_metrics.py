"""Prometheus metrics of the gateway: request timing, the cluster snapshot collector, the HTTP endpoint."""

from __future__ import annotations

import asyncio
import random
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlaserve.cluster.metrics import ITL_BUCKETS, GatewayMetrics, PoolCounterSnapshot, worker_health
from mlaserve.cluster.types import WorkerStatus
from mlaserve.worker.load import WorkerLoad
from mlaserve.worker.types import SamplingParams

from .test_grpc_fake import FakeCounters, FakePool, _start, run


def samples(metrics: GatewayMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_request_tracker_ttft_and_inter_token_latency(seed):
    rng = random.Random(seed)
    m = GatewayMetrics()
    clock = Clock()
    tracker = m.request_tracker(clock)
    assert samples(m)[("mlaserve_requests_in_flight", ())] == 1
    ttft = rng.uniform(0.01, 2.0)
    clock.t += ttft
    first_n = rng.randrange(1, 4)
    tracker.tokens(first_n)
    gaps = []  # the per-token gaps the histogram must hold
    total = first_n
    for _ in range(rng.randrange(1, 10)):
        dt, n = rng.uniform(0.001, 0.5), rng.randrange(1, 4)
        clock.t += dt
        tracker.tokens(n)
        gaps += [dt / n] * n
        total += n
    tracker.tokens(0)  # an empty final delta changes nothing
    tracker.finish("length", prompt_tokens=17, cached_tokens=5)
    tracker.finish("length", prompt_tokens=17)  # idempotent
    tracker.close()
    s = samples(m)
    assert s[("mlaserve_time_to_first_token_seconds_count", ())] == 1
    assert s[("mlaserve_time_to_first_token_seconds_sum", ())] == pytest.approx(ttft)
    assert s[("mlaserve_inter_token_latency_seconds_count", ())] == len(gaps)
    assert s[("mlaserve_inter_token_latency_seconds_sum", ())] == pytest.approx(sum(gaps))
    for bound in ITL_BUCKETS:
        le = (("le", str(bound)),)
        assert s[("mlaserve_inter_token_latency_seconds_bucket", le)] == sum(g <= bound for g in gaps)
    assert s[("mlaserve_generated_tokens_total", ())] == total
    assert s[("mlaserve_prompt_tokens_total", ())] == 17
    assert s[("mlaserve_cached_prompt_tokens_total", ())] == 5
    assert s[("mlaserve_requests_finished_total", (("reason", "length"),))] == 1
    assert s[("mlaserve_requests_in_flight", ())] == 0
    assert s[("mlaserve_request_duration_seconds_sum", ())] == pytest.approx(clock.t - 100.0)


def _statuses(rng: random.Random, names: list[str]) -> list[WorkerStatus]:
    out = []
    for name in names:
        total = rng.randrange(1, 1000)
        free = rng.randrange(total + 1)
        load = WorkerLoad(
            worker_id=name,
            seq=1,
            total_pages=total,
            free_pages=free,
            reserved_pages=rng.randrange(free + 1),
            running=rng.randrange(20),
            waiting=rng.randrange(20),
            queued_prompt_tokens=rng.randrange(5000),
            tokens_per_s=rng.uniform(0, 1000),
            healthy=rng.random() < 0.8,
            draining=rng.random() < 0.2,
            device=rng.choice(["cpu", "cuda:0 NVIDIA H200"]),
        )
        out.append(
            WorkerStatus(worker_id=name, load=load, alive=rng.random() < 0.9, restarts=rng.randrange(4))
        )
    return out


def test_cluster_snapshot_renders_each_worker_and_drops_removed_ones(seed):
    rng = random.Random(seed)
    m = GatewayMetrics()
    statuses = _statuses(rng, ["w0", "w1", "w2"])
    pool_counters = FakeCounters(
        routed={("occupancy", "w0"): 7, ("occupancy", "w2"): 3, ("prefix", "w1"): 1},
        retries=4,
        resumes=2,
        worker_failures=1,
        worker_losses=12,
        suspected_poison=1,
        preemptions={"w1": 4},
        rejected_queue_full=6,
        rejected_invalid=9,
        scale_ups=3,
        scale_downs=2,
    )
    counters = PoolCounterSnapshot.of(pool_counters)
    pool_counters.routed[("occupancy", "w0")] += 100  # the snapshot is a copy
    m.update_cluster(statuses, counters)
    s = samples(m)
    for st in statuses:
        w = (("worker", st.worker_id),)
        assert s[("mlaserve_worker_occupancy", w)] == pytest.approx(st.load.used_pages / st.load.total_pages)
        assert (
            s[("mlaserve_worker_pages", (("state", "used"), *w))] == st.load.total_pages - st.load.free_pages
        )
        assert s[("mlaserve_worker_pages", (("state", "reserved"), *w))] == st.load.reserved_pages
        assert s[("mlaserve_worker_running", w)] == st.load.running
        assert s[("mlaserve_worker_waiting", w)] == st.load.waiting
        assert s[("mlaserve_worker_tokens_per_second", w)] == pytest.approx(st.load.tokens_per_s)
        assert s[("mlaserve_worker_up", w)] == (1.0 if st.alive and st.load.healthy else 0.0)
        assert s[("mlaserve_worker_restarts_total", w)] == st.restarts
        state = (("device", st.load.device), ("state", worker_health(st)), *w)
        assert s[("mlaserve_worker_state", state)] == 1.0
    assert s[("mlaserve_routing_decisions_total", (("policy", "occupancy"), ("worker", "w0")))] == 7
    assert s[("mlaserve_routing_decisions_total", (("policy", "prefix"), ("worker", "w1")))] == 1
    assert s[("mlaserve_routing_decisions_total", (("policy", "occupancy"), ("worker", "w2")))] == 3
    assert s[("mlaserve_preemptions_total", (("worker", "w1"),))] == 4
    assert s[("mlaserve_retries_total", ())] == 4
    assert s[("mlaserve_resumes_total", ())] == 2
    assert s[("mlaserve_worker_failures_total", ())] == 1
    assert s[("mlaserve_worker_losses_total", ())] == 12
    assert s[("mlaserve_suspected_poison_total", ())] == 1
    assert s[("mlaserve_rejected_requests_total", (("reason", "queue_full"),))] == 6
    assert s[("mlaserve_rejected_requests_total", (("reason", "invalid"),))] == 9
    assert s[("mlaserve_scale_events_total", (("direction", "up"),))] == 3
    assert s[("mlaserve_scale_events_total", (("direction", "down"),))] == 2
    assert PoolCounterSnapshot.of(None) == PoolCounterSnapshot()

    m.update_cluster(statuses[:1])  # w1 and w2 were removed
    s = samples(m)
    assert ("mlaserve_worker_occupancy", (("worker", "w0"),)) in s
    assert not any(dict(labels).get("worker") in ("w1", "w2") for _, labels in s)


def test_registries_are_separate_and_served_over_http():
    a, b = GatewayMetrics(), GatewayMetrics()  # two gateways in one process: no duplicate-metric error
    a.requests.labels(method="Generate", code="OK").inc(3)
    port = a.start_http(0, "127.0.0.1")
    try:
        with pytest.raises(RuntimeError, match="already running"):
            a.start_http(0, "127.0.0.1")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'mlaserve_requests_total{code="OK",method="Generate"} 3.0' in body
        assert 'mlaserve_requests_total{code="OK",method="Generate"}' not in b.render().decode()
    finally:
        a.stop_http()
    assert a.http_port is None


def test_served_requests_show_up_in_the_metrics():
    async def body():
        pool = FakePool(step_s=0.005)
        server, client = await _start(pool, metrics_port=0, metrics_host="127.0.0.1")
        try:
            lengths = [3, 5, 8]
            await asyncio.gather(
                *(client.generate(f"p{n}", sampling=SamplingParams(max_tokens=n)) for n in lengths)
            )
            await server.refresh_metrics()
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
            s = {}
            for family in text_string_to_metric_families(text):
                for sm in family.samples:
                    s[(sm.name, tuple(sorted(sm.labels.items())))] = sm.value
            assert s[("mlaserve_time_to_first_token_seconds_count", ())] == len(lengths)
            assert s[("mlaserve_inter_token_latency_seconds_count", ())] == sum(n - 1 for n in lengths)
            assert s[("mlaserve_generated_tokens_total", ())] == sum(lengths)
            assert s[("mlaserve_requests_total", (("code", "OK"), ("method", "GenerateUnary")))] == len(
                lengths
            )
            routed = {
                labels: v for (name, labels), v in s.items() if name == "mlaserve_routing_decisions_total"
            }
            assert sum(routed.values()) == len(lengths)
            assert s[("mlaserve_preemptions_total", (("worker", "fake-0"),))] == 5
            for w in pool.workers:
                assert s[("mlaserve_worker_pages", (("state", "total"), ("worker", w)))] == pool.total_pages
        finally:
            await client.close()
            await server.stop()
        assert server.metrics_port is None

    run(body())
