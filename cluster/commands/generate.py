"""`mlaserve generate`: generate text for one or more prompts.

Offline mode (this module): loads the model into a local Engine (CUDA when available, else the
CPU) and streams the answer to stdout:

    mlaserve generate --model tiny --prompt "Hello" --max-tokens 32 --temperature 0

Client mode (`--server HOST:PORT`, added by the gateway): asks a running cluster instead; it shares
the sampling arguments (commands/options.py) and plugs in where `run` dispatches.
"""

from __future__ import annotations

import argparse
import sys
import time

from mlaserve.cluster.commands.options import (
    add_auth_token_argument,
    add_client_tls_arguments,
    add_sampling_arguments,
    client_tls_from_args,
    sampling_from_args,
)
from mlaserve.worker.types import SamplingParams


def add_prompt_and_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Prompt and sampling flags, shared by the offline and the client mode."""
    parser.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="prompt text ('-' reads stdin); repeat for several prompts",
    )
    add_sampling_arguments(parser, max_tokens=64)


def add_offline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="tiny",
        help="checkpoint directory or preset (tiny, deepseek-v3-tiny, deepseek-v2-lite); default tiny",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype", default=None, help="bfloat16 | float16 | float32 (default: bf16 on cuda, fp32 on cpu)"
    )
    parser.add_argument(
        "--num-pages", type=int, default=None, help="latent cache pages (default: sized from memory)"
    )
    parser.add_argument("--no-stream", action="store_true", help="print each answer once it is complete")
    parser.add_argument("--stats", action="store_true", help="print token counts and throughput to stderr")


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=None,
        help="HOST:PORT of a running gateway: ask the cluster instead of a local engine",
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="deadline per request in seconds (--server)"
    )
    add_auth_token_argument(parser, "bearer token for --server")
    add_client_tls_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_prompt_and_sampling_arguments(parser)
    add_offline_arguments(parser)
    add_client_arguments(parser)


def read_prompts(args: argparse.Namespace) -> list[str]:
    return [sys.stdin.read() if p == "-" else p for p in args.prompt]


def run_offline(args: argparse.Namespace, sampling: SamplingParams, prompts: list[str]) -> int:
    from mlaserve.worker.engine import Engine  # torch loads only for the offline mode

    started = time.perf_counter()
    engine = Engine.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, num_pages=args.num_pages
    )
    loaded = time.perf_counter()
    if args.no_stream or len(prompts) > 1:
        outputs = engine.generate(prompts, sampling)
        for i, out in enumerate(outputs):
            if i:
                print()
            print(out.text, flush=True)
        usages = [(o.usage, o.finish_reason) for o in outputs]
    else:
        engine.add_request("cli-0", prompts[0], sampling)
        usages = []
        while engine.has_unfinished():
            for delta in engine.step():
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                if delta.finished:
                    usages.append((delta.usage, delta.finish_reason))
        print(flush=True)
    if args.stats:
        done = time.perf_counter()
        generated = sum(u.completion_tokens for u, _ in usages)
        for i, (u, reason) in enumerate(usages):
            print(
                f"[{i}] prompt {u.prompt_tokens} tokens, generated {u.completion_tokens}, "
                f"cached {u.cached_tokens}, finish {reason.value}",
                file=sys.stderr,
            )
        print(
            f"load {loaded - started:.2f} s, generate {done - loaded:.2f} s, "
            f"{generated / max(done - loaded, 1e-9):.1f} tokens/s on {engine.load().device}",
            file=sys.stderr,
        )
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        sampling = sampling_from_args(args)
        prompts = read_prompts(args)
        if getattr(args, "server", None):  # client mode, when the gateway's flags are installed
            return run_remote(args, sampling, prompts)
        return run_offline(args, sampling, prompts)
    except ValueError as e:
        print(f"mlaserve generate: {e}", file=sys.stderr)
        return 2


def run_remote(args: argparse.Namespace, sampling: SamplingParams, prompts: list[str]) -> int:
    """Client mode: stream each prompt's answer from the gateway at --server to stdout."""
    import asyncio

    import grpc

    from mlaserve.cluster.client import DecoderClient, rpc_error_hint

    tls = client_tls_from_args(args)  # TLSConfigError (ValueError): exit 2 naming the flag

    async def ask() -> list[tuple[str, float, object]]:
        stats = []
        async with DecoderClient(args.server, timeout=args.timeout, token=args.auth_token, tls=tls) as client:
            for i, prompt in enumerate(prompts):
                if i:
                    print()
                started = time.perf_counter()
                if args.no_stream:
                    answer = await client.generate(prompt, sampling=sampling)
                    print(answer.text, flush=True)
                    stats.append((answer.worker_id, time.perf_counter() - started, answer))
                    continue
                last = None
                async for chunk in client.stream(prompt, sampling=sampling):
                    sys.stdout.write(chunk.delta.text)
                    sys.stdout.flush()
                    last = chunk
                print(flush=True)
                stats.append((last.worker_id if last else "", time.perf_counter() - started, last))
        return stats

    try:
        stats = asyncio.run(ask())
    except grpc.aio.AioRpcError as e:
        hint = rpc_error_hint(e, tls)
        print(f"mlaserve generate: {args.server}: {e.code().name}: {e.details()}{hint}", file=sys.stderr)
        return 1
    if args.stats:
        for i, (worker, seconds, answer) in enumerate(stats):
            usage = getattr(answer, "usage", None) or getattr(getattr(answer, "delta", None), "usage", None)
            if usage is not None:
                print(
                    f"[{i}] prompt {usage.prompt_tokens} tokens, generated {usage.completion_tokens}, "
                    f"cached {usage.cached_tokens}, worker {worker}, {seconds:.2f} s",
                    file=sys.stderr,
                )
    return 0
