"""`mlaserve bench serve`'s load generator: its statistics on hand-computed cases, and whole runs
against the gRPC gateway backed by the fake pool of test_grpc_fake.py (no Ray)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics

import pytest

from mlaserve.cluster import cli
from mlaserve.cluster.loadgen import (
    TOKEN_ID_LIMIT,
    VARLEN_CAP,
    LoadConfig,
    RequestRecord,
    WorkerRow,
    format_result,
    make_workload,
    percentile,
    rate,
    run_load,
    summarize,
)
from mlaserve.cluster.service import ServiceLimits
from tests.cluster.test_grpc_fake import FakePool, _start, run


def test_percentile_hand_computed_cases():
    xs = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == pytest.approx(2.5)  # halfway between ranks 1 and 2
    assert percentile(xs, 99) == pytest.approx(3.97)  # rank 2.97: 3 + 0.97 * (4 - 3)
    assert percentile(xs, 25) == pytest.approx(1.75)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="q must be in"):
        percentile(xs, 101)


def test_percentile_matches_the_standard_library(seed):
    rng = random.Random(seed)
    for _ in range(20):
        xs = [rng.expovariate(1.0) for _ in range(rng.randrange(2, 60))]
        cuts = statistics.quantiles(xs, n=100, method="inclusive")  # cut k is the k-th percentile
        for q in (1, 50, 90, 99):
            assert percentile(xs, q) == pytest.approx(cuts[q - 1], rel=1e-12, abs=1e-12)


def test_summarize_hand_computed_run():
    records = [
        # ttft 0.2, gaps 0.1 and 0.1, latency 0.4
        RequestRecord(
            start=0.0, end=0.4, first_token=0.2, token_gaps=[0.1, 0.1], prompt_tokens=10, output_tokens=3
        ),
        # ttft 0.5, gap 0.3, latency 1.0
        RequestRecord(
            start=0.2, end=1.2, first_token=0.7, token_gaps=[0.3], prompt_tokens=6, output_tokens=2
        ),
        # failed after one token: its tokens count, its latency does not
        RequestRecord(
            start=0.5, end=0.9, first_token=0.8, prompt_tokens=4, output_tokens=1, error="DEADLINE_EXCEEDED"
        ),
        # refused before any token: no prompt tokens counted
        RequestRecord(start=1.0, end=1.1, error="RESOURCE_EXHAUSTED"),
        RequestRecord(start=1.0, end=1.1, error="RESOURCE_EXHAUSTED"),
    ]
    res = summarize(records, wall_s=2.0)
    assert (res.requests, res.completed) == (5, 2)
    assert res.errors == {"DEADLINE_EXCEEDED": 1, "RESOURCE_EXHAUSTED": 2}
    assert (res.prompt_tokens, res.output_tokens) == (20, 6)
    assert res.output_tokens_per_s == pytest.approx(3.0)
    assert res.total_tokens_per_s == pytest.approx(13.0)
    assert res.ttft_p50_s == pytest.approx(0.3)  # ttfts 0.2, 0.3, 0.5
    assert res.ttft_p99_s == pytest.approx(0.496)  # 0.3 + 0.98 * 0.2
    assert res.itl_p50_s == pytest.approx(0.1)  # gaps 0.1, 0.1, 0.3
    assert res.itl_p99_s == pytest.approx(0.296)
    assert res.latency_p50_s == pytest.approx(0.7)  # latencies 0.4, 1.0
    assert res.latency_p99_s == pytest.approx(0.994)
    assert rate(5, 0.0) == 0.0 and rate(6, 3.0) == 2.0

    table = format_result(res, bound_tokens_per_s=12.0)
    assert "| errors | 3 (DEADLINE_EXCEEDED 1, RESOURCE_EXHAUSTED 2) |" in table
    assert "| output tokens/s vs bound | 25.0% of 12.0 |" in table
    assert "| TTFT p50 / p99 (ms) | 300.0 / 496.0 |" in table
    empty = summarize(
        [RequestRecord(start=0.0, end=0.1, error="UNAVAILABLE")], 0.1, [WorkerRow("w", "cpu", 0.5, 0.0)]
    )
    text = format_result(empty)
    assert "| TTFT p50 / p99 (ms) | - / - |" in text and "vs bound" not in text
    assert "| w | cpu | 50.0% | 0.0 |" in text
    assert "polls failed" not in text
    assert "(2 GetClusterStatus polls failed" in format_result(summarize([], 1.0, failed_status_polls=2))


def test_workload_lengths_ids_and_guards(seed):
    fixed = make_workload(LoadConfig(requests=7, prompt_len=5, max_tokens=3, seed=seed))
    assert [(len(p), m) for p, m in fixed] == [(5, 3)] * 7
    assert all(0 <= t < TOKEN_ID_LIMIT for p, _ in fixed for t in p)
    assert make_workload(LoadConfig(requests=7, prompt_len=5, max_tokens=3, seed=seed)) == fixed
    assert [len(p) for p, _ in make_workload(LoadConfig(requests=3, prompt_len=0, seed=seed))] == [1, 1, 1]

    n, mean_p, mean_m = 3000, 200, 40
    var = make_workload(LoadConfig(requests=n, prompt_len=mean_p, max_tokens=mean_m, seed=seed, varlen=True))
    plens, mlens = [len(p) for p, _ in var], [m for _, m in var]
    for lens, mean in ((plens, mean_p), (mlens, mean_m)):
        assert min(lens) >= 1 and max(lens) <= VARLEN_CAP * mean
        assert abs(statistics.fmean(lens) / mean - 1) < 0.15
        assert statistics.median(lens) < 0.8 * mean  # long-tailed: most requests are short

    for field, value in (("requests", 0), ("concurrency", 0), ("prompt_len", -1), ("max_tokens", 0)):
        with pytest.raises(ValueError, match=f"^{field} must be"):
            LoadConfig(**{field: value})
    with pytest.raises(ValueError, match="timeout_s"):
        LoadConfig(timeout_s=0.0)


def test_run_against_the_fake_pool_counts_what_it_produced(seed):
    async def body():
        pool = FakePool(step_s=0.003)
        server, client = await _start(pool)
        peak_in_flight = 0

        async def watch() -> None:
            nonlocal peak_in_flight
            while True:
                peak_in_flight = max(peak_in_flight, len(pool.pages))
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch())
        try:
            cfg = LoadConfig(
                requests=15, concurrency=4, prompt_len=9, max_tokens=7, seed=seed, status_interval_s=0.02
            )
            res = await run_load(client, cfg)
        finally:
            watcher.cancel()
            await client.close()
            await server.stop()
        assert (res.requests, res.completed, res.errors) == (15, 15, {})
        assert res.failed_status_polls == 0
        assert res.output_tokens == 15 * 7 and res.prompt_tokens == 15 * 9
        assert sum(pool.routed.values()) == 15 and len(pool.finished) == 15 and not pool.closed_early
        assert 1 <= peak_in_flight <= 4
        assert res.output_tokens_per_s == pytest.approx(105 / res.wall_s)
        assert res.total_tokens_per_s == pytest.approx((105 + 135) / res.wall_s)
        assert res.ttft_p50_s >= 0.003 and res.latency_p50_s >= 7 * 0.003 and res.itl_p50_s > 0
        assert res.ttft_p50_s <= res.ttft_p99_s <= res.latency_p99_s
        assert [w.worker_id for w in res.workers] == pool.workers
        for w in res.workers:
            assert w.device == "cpu"
            assert w.tokens_per_s * res.wall_s == pytest.approx(7 * pool.routed[w.worker_id])
            # one request holds ceil((9 + 7) / 4) = 4 pages at most of 10_000; at most 4 in flight
            assert 0 <= w.peak_occupancy <= 4 * 4 / pool.total_pages

    run(body())


def test_failures_are_counted_by_status_code_and_the_run_finishes(seed):
    cfg = LoadConfig(requests=20, concurrency=3, prompt_len=8, max_tokens=4, seed=seed, varlen=True)
    workload = make_workload(cfg)
    limit = sorted(len(p) for p, _ in workload)[len(workload) // 2]  # the server refuses the longer half
    too_long = [m for p, m in workload if len(p) > limit]
    fits = [m for p, m in workload if len(p) <= limit]
    assert too_long and fits

    async def body():
        pool = FakePool(step_s=0.002)
        server, client = await _start(pool, limits=ServiceLimits(max_prompt_tokens=limit))
        try:
            res = await run_load(client, cfg)
        finally:
            await client.close()
            await server.stop()
        assert res.errors == {"INVALID_ARGUMENT": len(too_long)}
        assert res.completed == len(fits) and res.output_tokens == sum(fits)
        assert res.prompt_tokens == sum(len(p) for p, _ in workload if len(p) <= limit)

    run(body())


def test_bench_serve_command_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "result.json"

    async def body() -> int:
        pool = FakePool(step_s=0.002)
        server, client = await _start(pool)
        try:
            argv = ["bench", "serve", "--server", server.address, "--requests", "6", "--concurrency", "2"]
            argv += [
                "--prompt-len",
                "0",
                "--max-tokens",
                "3",
                "--bound-tokens-per-s",
                "1e6",
                "--json",
                str(out),
            ]
            return await asyncio.to_thread(cli.main, argv)
        finally:
            await client.close()
            await server.stop()

    assert run(body()) == 0
    text = capsys.readouterr().out
    assert "| requests | 6 |" in text and "| completed | 6 |" in text and "| errors | 0 |" in text
    assert "of 1000000.0 |" in text and "| fake-0 | cpu |" in text
    saved = json.loads(out.read_text())
    assert saved["output_tokens"] == 18 and saved["prompt_tokens"] == 6 and saved["errors"] == {}
