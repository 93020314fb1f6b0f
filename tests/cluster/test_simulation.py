"""Router simulation: the simulated worker against hand-computed timings, conservation, and the
headline claim (occupancy routing beats round-robin on p99 TTFT and preemptions by default)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from mlaserve.cluster import cli
from mlaserve.cluster.router import POLICIES
from mlaserve.cluster.simulation import (
    SimConfig,
    SimRequest,
    WorkerModel,
    WorkloadConfig,
    compare_policies,
    make_workload,
    markdown_table,
    simulate,
)


def test_default_occupancy_beats_round_robin():
    occ, rr = compare_policies(SimConfig(), ["occupancy", "round_robin"])
    print("\n" + markdown_table([occ, rr]))
    assert occ.ttft_p99_s < rr.ttft_p99_s
    assert occ.preemptions < rr.preemptions
    assert occ.completed + occ.rejected == rr.completed + rr.rejected == 3 * SimConfig().workload.num_requests


def test_single_request_timing_matches_hand_computation(seed):
    rng = random.Random(seed)
    m = WorkerModel(total_pages=64, max_batched_tokens=4096)
    prompt, out = rng.randint(1, 4000), rng.randint(1, 20)
    cfg = SimConfig(num_workers=1, worker=m)
    r = simulate(cfg, "occupancy", [SimRequest("a", 0.0, prompt, out, out)])
    prefill = (
        m.step_base_s + m.step_per_seq_s + m.step_per_kv_token_s * prompt + m.prefill_per_token_s * prompt
    )
    assert r.ttft_p50_s == pytest.approx(prefill)
    # Decode step k (k = 1..out-1) reads prompt + k cached tokens.
    decode = sum(
        m.step_base_s + m.step_per_seq_s + m.step_per_kv_token_s * (prompt + k) for k in range(1, out)
    )
    assert r.e2e_p99_s == pytest.approx(prefill + decode)
    assert (r.completed, r.preemptions, r.rejected) == (1, 0, 0)


def test_long_prompt_is_prefilled_in_chunks():
    m = WorkerModel(total_pages=64, max_batched_tokens=1000)
    r = simulate(SimConfig(num_workers=1, worker=m), "occupancy", [SimRequest("a", 0.0, 2500, 1, 1)])
    chunks = [1000, 1000, 500]
    expected, done = 0.0, 0
    for c in chunks:
        done += c
        expected += (
            m.step_base_s + m.step_per_seq_s + m.step_per_kv_token_s * done + m.prefill_per_token_s * c
        )
    assert r.ttft_p50_s == pytest.approx(expected)


def test_small_cache_preempts_by_recompute_and_completes_everything(seed):
    rng = random.Random(seed)
    m = WorkerModel(total_pages=12, page_size=16)
    reqs = [SimRequest(f"r{i}", 0.001 * i, rng.randint(1, 40), 100, rng.randint(60, 100)) for i in range(6)]
    r = simulate(SimConfig(num_workers=1, worker=m, max_queued_per_worker=None), "occupancy", reqs)
    assert r.completed == 6 and r.rejected == 0
    assert r.preemptions > 0  # six requests growing to ~8 pages each cannot share 12 pages
    assert r.peak_occupancy == 1.0


def test_queue_limit_rejects():
    m = WorkerModel(total_pages=64)
    reqs = [SimRequest(f"r{i}", 0.0, 100, 10, 10) for i in range(10)]
    r = simulate(SimConfig(num_workers=2, worker=m, max_queued_per_worker=3), "round_robin", reqs)
    assert r.rejected == 4 and r.completed == 6


def test_workload_is_seeded_long_tailed_and_fits(seed):
    cfg = WorkloadConfig(num_requests=400, seed=seed)
    m = WorkerModel()
    a, b = make_workload(cfg, m), make_workload(cfg, m)
    assert a == b
    assert make_workload(replace(cfg, seed=seed + 1), m) != a
    assert all(r.prompt_tokens + r.max_tokens <= m.total_pages * m.page_size for r in a)
    assert all(1 <= r.output_tokens <= r.max_tokens for r in a)
    assert all(len(r.prefix_hashes) <= r.prompt_tokens // m.page_size for r in a)
    arrivals = [r.arrival for r in a]
    assert arrivals == sorted(arrivals)
    prompts = sorted(r.prompt_tokens for r in a)
    assert prompts[-1] > 4 * prompts[len(prompts) // 2]  # a long tail


def test_every_policy_conserves_requests_and_is_deterministic(seed):
    cfg = SimConfig(
        workload=WorkloadConfig(num_requests=150, rate=30, seed=seed % 1000), seeds=(seed % 1000,)
    )
    first = compare_policies(cfg)
    again = compare_policies(cfg)
    assert [r.policy for r in first] == list(POLICIES)
    for r, r2 in zip(first, again):
        assert r.completed + r.rejected == 150
        assert r == r2


def test_bench_router_command_prints_a_table(capsys):
    assert cli.main(["bench", "router", "--requests", "60", "--seeds", "3", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    for p in POLICIES:
        assert f"| {p} |" in out
    with pytest.raises(SystemExit):
        cli.main(["bench", "router", "--policies", "random"])
