"""`mlaserve demo`: the whole stack on one machine in well under a minute.

Starts a local Ray cluster with workers serving the tiny model (CPU reference backend, or the
GPUs when present), the gRPC gateway on a free 127.0.0.1 port, then sends requests through the
real gRPC client (one streamed, one unary), prints the answers and the cluster status table, and
shuts everything down.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from mlaserve.cluster.commands.serve import (
    add_pool_arguments,
    init_ray,
    pool_config_from_args,
    running_gateway,
)
from mlaserve.cluster.server import ServerConfig
from mlaserve.worker.types import SamplingParams

PROMPTS = (
    "MLA keeps one latent vector per token, so",
    "The router sends each request to the worker whose cache",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_pool_arguments(parser)
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per answer (default: 24)")
    parser.add_argument(
        "--prompt", action="append", default=None, help="a prompt (repeat for more; default: two)"
    )
    parser.add_argument("--metrics", action="store_true", help="also print the gateway's Prometheus metrics")


def printable(text: str) -> str:
    """The text with control characters escaped (the tiny model's weights are random: any byte comes out)."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


async def _demo(args: argparse.Namespace) -> int:
    from mlaserve.cluster.client import DecoderClient, format_status_table

    prompts = args.prompt or list(PROMPTS)
    server_config = ServerConfig(host="127.0.0.1", port=0, metrics_port=None, drain_timeout_s=30)
    t0 = time.perf_counter()
    async with running_gateway(pool_config_from_args(args), server_config) as server:
        print(f"gateway: {server.address} (cluster up in {time.perf_counter() - t0:.1f} s)", flush=True)
        if args.model in ("tiny", "deepseek-v3-tiny"):
            print(
                "(the tiny presets have random weights, so their text is noise; --model takes a checkpoint)"
            )
        async with DecoderClient(server.address, timeout=120) as client:
            await client.wait_ready()
            # 1. Streamed, sampled with a seed: tokens print as they arrive.
            sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.8, top_p=0.95, seed=1234)
            print(f"\n[stream] {prompts[0]!r}\n  -> ", end="", flush=True)
            start = time.perf_counter()
            first = None
            last = None
            async for chunk in client.stream(prompts[0], sampling=sampling):
                if chunk.delta.token_ids and first is None:
                    first = time.perf_counter() - start
                print(printable(chunk.delta.text), end="", flush=True)
                last = chunk
            assert last is not None and last.delta.usage is not None
            usage = last.delta.usage
            ttft = f"{1000 * first:.0f} ms" if first is not None else "n/a"
            print(
                f"\n  finish={last.delta.finish_reason.value if last.delta.finish_reason else '?'} "
                f"tokens={usage.completion_tokens} prompt={usage.prompt_tokens} worker={last.worker_id} "
                f"ttft={ttft} total={time.perf_counter() - start:.2f} s"
            )
            # 2. The rest unary and greedy, concurrently.
            rest = prompts[1:] or prompts[:1]
            greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
            answers = await asyncio.gather(*(client.generate(p, sampling=greedy) for p in rest))
            for prompt, ans in zip(rest, answers):
                print(f"\n[unary] {prompt!r}\n  -> {printable(ans.text)}")
                print(
                    f"  finish={ans.finish_reason.value} tokens={ans.usage.completion_tokens} "
                    f"prompt={ans.usage.prompt_tokens} cached={ans.usage.cached_tokens} worker={ans.worker_id}"
                )
            print()
            print(format_status_table(await client.status()))
            if args.metrics:
                await server.refresh_metrics()
                print()
                print(server.metrics.render().decode())
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if args.max_tokens < 1:
        print("mlaserve demo: --max-tokens must be >= 1", file=sys.stderr)
        return 2
    init_ray(None, num_cpus=max(os.cpu_count() or 1, (args.num_workers or 2) + 1), log_to_driver=False)
    try:
        return asyncio.run(_demo(args))
    finally:
        import ray

        ray.shutdown()
