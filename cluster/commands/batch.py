"""`mlaserve batch`: run a JSONL file of prompts through the cluster; resumable.

    mlaserve batch --input prompts.jsonl --output results.jsonl --server HOST:PORT
    mlaserve batch --input prompts.jsonl --output results.jsonl --address local --model tiny
    ray job submit -- mlaserve batch --input /shared/p.jsonl --output /shared/r.jsonl --address auto \
        --model /shared/models/DeepSeek-V2-Lite-Chat --min-workers 1 --max-workers 16

With --server the requests go through a running gateway. Otherwise this process joins the Ray
cluster at --address ("auto": the one this machine belongs to, e.g. inside `ray job submit`;
"local": start one here; or HOST:PORT) and runs its own worker pool, which grows with the queue up
to --max-workers and is drained and shut down when the job ends.

Each input line is a JSON object: {"id": ..., "prompt": ... | "prompt_token_ids": [...], and any
of max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids, ignore_eos, metadata}; the
options below are the defaults for what a line leaves out. One result line per input line is
appended to --output as each request finishes. Run the same command again after a crash or a kill
and it continues where it stopped: lines already in the output are not sent again.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from contextlib import AbstractAsyncContextManager
from typing import Any

from mlaserve.cluster.batch import BatchConfig, BatchSummary, GenerateFn, run_batch
from mlaserve.cluster.batch_records import OutputCorrupt
from mlaserve.cluster.commands.options import (
    add_auth_token_argument,
    add_client_tls_arguments,
    add_sampling_arguments,
    client_tls_from_args,
    sampling_from_args,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mlaserve.cluster.commands.serve import add_pool_arguments

    parser.add_argument("--input", required=True, help="JSONL file of prompts")
    parser.add_argument("--output", required=True, help="JSONL file of results (appended to; resumed from)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--server", default=None, help="a gateway's HOST:PORT: send the requests there")
    where.add_argument(
        "--address",
        default=None,
        help="Ray cluster for an in-process worker pool: 'auto', 'local' or HOST:PORT "
        "(default: RAY_ADDRESS, else local)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="requests in flight at once (default: 32)"
    )
    parser.add_argument(
        "--request-timeout", type=float, default=None, help="seconds per request (with --server)"
    )
    add_auth_token_argument(parser, "the gateway's bearer token (with --server)")
    add_client_tls_arguments(parser.add_argument_group("TLS to the gateway (with --server)"))
    parser.add_argument(
        "--max-attempts", type=int, default=5, help="tries per request while the cluster is full or draining"
    )
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="send again the requests an earlier run recorded as failed",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    sampling = parser.add_argument_group("sampling defaults (a line's own fields win)")
    add_sampling_arguments(sampling)
    pool = parser.add_argument_group("worker pool (without --server)")
    add_pool_arguments(pool)  # type: ignore[arg-type]


def _config(args: argparse.Namespace) -> BatchConfig:
    defaults = sampling_from_args(args)
    return BatchConfig(
        input_path=args.input,
        output_path=args.output,
        concurrency=args.concurrency,
        defaults=defaults,
        max_attempts=args.max_attempts,
        retry_failed=args.retry_failed,
        progress=not args.no_progress,
    )


def _backend(args: argparse.Namespace) -> AbstractAsyncContextManager[GenerateFn]:
    from mlaserve.cluster import batch_backends

    if args.server:
        return batch_backends.grpc_backend(
            args.server, timeout=args.request_timeout, token=args.auth_token, tls=client_tls_from_args(args)
        )
    from mlaserve.cluster.commands.serve import init_ray, pool_config_from_args

    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    pool_config: Any = pool_config_from_args(args)
    init_ray(None if address == "local" else address)
    return batch_backends.pool_backend(pool_config)


async def _run(config: BatchConfig, args: argparse.Namespace) -> BatchSummary:
    async with _backend(args) as generate:
        return await run_batch(config, generate)


def _report(summary: BatchSummary, config: BatchConfig) -> str:
    return (
        f"mlaserve batch: {summary.lines} lines: {summary.succeeded} answered, {summary.failed} errors, "
        f"{summary.skipped} already done; {summary.completion_tokens} tokens in {summary.elapsed_s:.1f} s "
        f"({summary.tokens_per_s:.1f} tok/s); results in {config.output_path}"
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
    except ValueError as exc:
        print(f"mlaserve batch: {exc}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(_run(config, args))
    except KeyboardInterrupt:
        print(
            f"mlaserve batch: interrupted; run the same command again to resume ({config.output_path})",
            file=sys.stderr,
        )
        return 130
    except ValueError as exc:  # e.g. a malformed --server address
        print(f"mlaserve batch: {exc}", file=sys.stderr)
        return 2
    except (
        OutputCorrupt,
        TimeoutError,
        OSError,
        RuntimeError,
    ) as exc:  # RuntimeError: the pool did not start
        print(f"mlaserve batch: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.server:
            import ray

            ray.shutdown()
    print(_report(summary, config), file=sys.stderr)
    return 0
