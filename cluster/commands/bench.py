"""`mlaserve bench router`: the routing policies on a simulated cluster (no GPU, no Ray).

Prints one markdown row per policy: p50/p99 time-to-first-token, p99 request latency,
preemptions, rejections, peak cache occupancy and prompt tokens served from prefix caches.

`mlaserve bench serve --server HOST:PORT`: a gRPC load generator against a running gateway
(cluster/loadgen.py); prints throughput, latency percentiles and per-worker peak occupancy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

from mlaserve.cluster.commands.options import (
    add_auth_token_argument,
    add_client_tls_arguments,
    client_tls_from_args,
)
from mlaserve.cluster.router import POLICIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    router = sub.add_parser("router", help="simulate the routing policies on a synthetic workload")
    router.add_argument("--policies", default=",".join(POLICIES), help="comma-separated policies to compare")
    router.add_argument("--workers", type=int, default=None, help="simulated workers (default 4)")
    router.add_argument("--requests", type=int, default=None, help="requests in the workload (default 2000)")
    router.add_argument("--rate", type=float, default=None, help="mean arrivals/s outside bursts (default 6)")
    router.add_argument(
        "--burst-rate", type=float, default=None, help="arrivals/s inside bursts (default 40)"
    )
    router.add_argument(
        "--prefix-groups", type=int, default=None, help="distinct shared system prompts (default 6)"
    )
    router.add_argument(
        "--prefix-pages", type=int, default=None, help="pages per shared system prompt (default 12)"
    )
    router.add_argument(
        "--prefix-fraction", type=float, default=None, help="share of requests with one (default 0.3)"
    )
    router.add_argument("--pages", type=int, default=None, help="pages per worker (default 768)")
    router.add_argument("--report-interval", type=float, default=None, help="seconds between load reports")
    router.add_argument(
        "--report-delay", type=float, default=None, help="seconds a load report takes to arrive"
    )
    router.add_argument(
        "--max-queued", type=int, default=None, help="queued requests per worker before rejecting"
    )
    router.add_argument("--seeds", default="0,1,2", help="comma-separated workload seeds; results are pooled")
    _add_serve_arguments(sub)


def _add_serve_arguments(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="load a running gateway over gRPC and measure it")
    serve.add_argument(
        "--server",
        default=os.environ.get("MLASERVE_SERVER", "127.0.0.1:50051"),
        help="gateway HOST:PORT (default: MLASERVE_SERVER, else 127.0.0.1:50051)",
    )
    serve.add_argument("--requests", type=int, default=100, help="requests to send (default 100)")
    serve.add_argument("--concurrency", type=int, default=16, help="most requests in flight (default 16)")
    serve.add_argument("--prompt-len", type=int, default=128, help="mean prompt tokens (default 128)")
    serve.add_argument("--max-tokens", type=int, default=64, help="mean tokens generated (default 64)")
    serve.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    serve.add_argument("--varlen", action="store_true", help="long-tailed prompt and output lengths")
    serve.add_argument("--timeout", type=float, default=None, help="deadline of each request in seconds")
    serve.add_argument(
        "--bound-tokens-per-s", type=float, default=None, help="roofline output tokens/s to compare against"
    )
    serve.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON here")
    add_auth_token_argument(serve, "bearer token")
    add_client_tls_arguments(serve)


def _run_serve(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from mlaserve.cluster.client import DecoderClient
    from mlaserve.cluster.loadgen import LoadConfig, format_result, run_load

    if args.bound_tokens_per_s is not None and not args.bound_tokens_per_s > 0:
        raise SystemExit(f"--bound-tokens-per-s: must be > 0, got {args.bound_tokens_per_s}")
    try:
        cfg = LoadConfig(
            requests=args.requests,
            concurrency=args.concurrency,
            prompt_len=args.prompt_len,
            max_tokens=args.max_tokens,
            seed=args.seed,
            varlen=args.varlen,
            timeout_s=args.timeout,
        )
        tls = client_tls_from_args(args)
    except ValueError as e:
        raise SystemExit(f"mlaserve bench serve: {e}") from None

    async def go():
        async with DecoderClient(args.server, token=args.auth_token, tls=tls) as client:
            await client.wait_ready()
            return await run_load(client, cfg)

    try:
        result = asyncio.run(go())
    except (TimeoutError, ValueError) as e:
        print(f"mlaserve bench serve: {e}", file=sys.stderr)
        return 1
    print(
        f"{cfg.requests} requests to {args.server}, at most {cfg.concurrency} in flight, prompts of "
        f"{cfg.prompt_len} tokens and {cfg.max_tokens} generated ({'long-tailed' if cfg.varlen else 'fixed'}"
        f", mean), greedy, ignore_eos\n"
    )
    print(format_result(result, args.bound_tokens_per_s))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.bench == "serve":
        return _run_serve(args)
    from mlaserve.cluster.simulation import SimConfig, compare_policies, markdown_table

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise SystemExit(
            f"--policies: unknown policy {', '.join(unknown)} (choose from {', '.join(POLICIES)})"
        )
    try:
        seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
    except ValueError:
        raise SystemExit(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    cfg = SimConfig()
    workload = replace(
        cfg.workload,
        **{
            k: v
            for k, v in (
                ("num_requests", args.requests),
                ("rate", args.rate),
                ("burst_rate", args.burst_rate),
                ("shared_prefix_groups", args.prefix_groups),
                ("shared_prefix_pages", args.prefix_pages),
                ("shared_prefix_fraction", args.prefix_fraction),
            )
            if v is not None
        },
    )
    worker = cfg.worker if args.pages is None else replace(cfg.worker, total_pages=args.pages)
    overrides = {
        k: v
        for k, v in (
            ("num_workers", args.workers),
            ("report_interval_s", args.report_interval),
            ("report_delay_s", args.report_delay),
            ("max_queued_per_worker", args.max_queued),
        )
        if v is not None
    }
    cfg = replace(cfg, workload=workload, worker=worker, seeds=seeds, **overrides)
    t0 = time.perf_counter()
    results = compare_policies(cfg, policies)
    print(
        f"{cfg.num_workers} workers x {cfg.worker.total_pages} pages of {cfg.worker.page_size} tokens, "
        f"{cfg.workload.num_requests} requests per seed (seeds {args.seeds}, pooled), load reports every "
        f"{cfg.report_interval_s}s arriving {cfg.report_delay_s}s late\n"
    )
    print(markdown_table(results))
    print(f"\n(simulated in {time.perf_counter() - t0:.1f}s)")
    return 0
