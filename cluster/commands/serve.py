"""`mlaserve serve`: start the Ray workers and the gRPC gateway; run until SIGINT/SIGTERM, then drain.

Joins the Ray cluster at --address (or RAY_ADDRESS), else starts a local one. The gateway serves
mlaserve.v1.Decoder, grpc.health.v1 and reflection on --host:--port (TLS with --tls-cert/--tls-key,
mutual TLS with --tls-client-ca), the OpenAI-compatible HTTP API on --http-port (off by default;
plaintext), Prometheus metrics on --metrics-port. On SIGINT/SIGTERM it stops taking requests
(health NOT_SERVING, new RPCs UNAVAILABLE, new HTTP requests 503), lets in-flight requests finish
(up to --drain-timeout), then shuts down; a second signal skips the wait.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

from mlaserve.cluster.commands.options import (
    add_auth_token_argument,
    add_server_tls_arguments,
    server_tls_from_args,
)
from mlaserve.cluster.openai_http import HttpConfig
from mlaserve.cluster.router import POLICIES
from mlaserve.cluster.server import GatewayServer, ServerConfig
from mlaserve.cluster.service import ServiceLimits

log = logging.getLogger("mlaserve.serve")

DEFAULT_PORT = 50051


def add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that shape the worker pool (shared with `mlaserve demo`)."""
    parser.add_argument("--model", default="tiny", help="checkpoint directory or preset name (default: tiny)")
    parser.add_argument(
        "--num-workers", type=int, default=None, help="workers to start (default: one per GPU, else 2 on CPU)"
    )
    parser.add_argument(
        "--min-workers", type=int, default=None, help="autoscaling floor (default: --num-workers)"
    )
    parser.add_argument(
        "--max-workers", type=int, default=None, help="autoscaling ceiling (default: --num-workers)"
    )
    parser.add_argument(
        "--policy",
        default="occupancy",
        choices=POLICIES,
        help="routing policy (default: occupancy)",
    )
    parser.add_argument(
        "--num-pages", type=int, default=None, help="latent-cache pages per worker (default: fit)"
    )
    parser.add_argument(
        "--dtype", default=None, help="model dtype, e.g. bfloat16 or float32 (default: per device)"
    )
    parser.add_argument(
        "--eager-decode",
        action="store_true",
        help="decode without CUDA graphs on GPU workers (EngineConfig.decode_graphs=False; the default "
        "captures every decode batch bucket as a CUDA graph at start-up)",
    )
    parser.add_argument(
        "--num-gpus-per-worker",
        type=float,
        default=None,
        help="GPUs each worker holds (default: 1 if the cluster has GPUs at start, else 0); "
        "give 1 on an autoscaling cluster whose GPU nodes start on demand",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join ('auto', ray://..., host:port); default RAY_ADDRESS, else a local cluster",
    )
    add_pool_arguments(parser)
    parser.add_argument("--host", default="0.0.0.0", help="gRPC listen address (default: 0.0.0.0)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"gRPC port (default: {DEFAULT_PORT}; 0: any)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="Prometheus /metrics HTTP port (default: off; 0: any free)",
    )
    parser.add_argument("--max-prompt-tokens", type=int, default=ServiceLimits.max_prompt_tokens)
    parser.add_argument(
        "--max-tokens", type=int, default=ServiceLimits.max_tokens, help="largest max_tokens allowed"
    )
    parser.add_argument(
        "--max-message-bytes", type=int, default=ServerConfig.max_message_bytes, help="largest gRPC message"
    )
    parser.add_argument("--drain-timeout", type=float, default=ServerConfig.drain_timeout_s, help="seconds")
    add_auth_token_argument(
        parser, "require 'authorization: Bearer TOKEN' on Decoder RPCs and /v1 HTTP requests (unset: open)"
    )
    add_server_tls_arguments(parser)
    add_http_arguments(parser)
    parser.add_argument("--log-level", default="INFO")


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    """The OpenAI-compatible HTTP API's options."""
    group = parser.add_argument_group("OpenAI-compatible HTTP API")
    group.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="serve /v1/completions, /v1/chat/completions, /v1/models and /health here, on --host "
        "(default: off; 0: any free port)",
    )
    group.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send and /v1/models lists (default: --model)",
    )
    group.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template that replaces the checkpoint's own (tokenizer_config.json)",
    )


def http_config_from_args(args: argparse.Namespace) -> HttpConfig | None:
    if args.http_port is None:
        return None
    return HttpConfig(
        port=args.http_port,
        model=args.model,
        served_model_name=args.served_model_name,
        chat_template_file=args.chat_template,
    )


def pool_config_from_args(args: argparse.Namespace) -> Any:
    """A PoolConfig from the pool options (imports the pool, hence Ray, only here)."""
    from mlaserve.cluster.pool import PoolConfig

    kwargs: dict[str, Any] = {"model": args.model, "policy": args.policy}
    for name in ("num_workers", "min_workers", "max_workers"):
        value = getattr(args, name)
        if value is not None:
            if value < (0 if name == "min_workers" else 1):
                raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            kwargs[name] = value
    if getattr(args, "num_gpus_per_worker", None) is not None:
        kwargs["num_gpus_per_worker"] = args.num_gpus_per_worker
    engine_kwargs = {}
    if args.num_pages is not None:
        engine_kwargs["num_pages"] = args.num_pages
    if args.dtype is not None:
        engine_kwargs["dtype"] = args.dtype
    if getattr(args, "eager_decode", False):
        from mlaserve.worker.config import EngineConfig  # no torch: config.py imports none

        engine_kwargs["config"] = EngineConfig(decode_graphs=False)
    if engine_kwargs:
        kwargs["engine_kwargs"] = engine_kwargs
    return PoolConfig(**kwargs)


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The gateway's config; ValueError naming the bad flag (a TLS file, a limit)."""
    limits = ServiceLimits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens)
    return ServerConfig(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        limits=limits,
        max_message_bytes=args.max_message_bytes,
        drain_timeout_s=args.drain_timeout,
        auth_token=args.auth_token or None,
        tls=server_tls_from_args(args),
        http=http_config_from_args(args),
    )


def init_ray(address: str | None, **local_kwargs: Any) -> None:
    """Join the cluster at `address`, or start a local one with `local_kwargs` (e.g. num_cpus)."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, **local_kwargs)


@contextlib.asynccontextmanager
async def running_gateway(pool_config: Any, server_config: ServerConfig) -> AsyncIterator[GatewayServer]:
    """Start the pool, then the gateway in front of it; on exit drain both and shut down."""
    from mlaserve.cluster.pool import WorkerPool

    pool = WorkerPool(pool_config)
    try:
        await pool.start()
        server = GatewayServer(pool, server_config)
        await server.start()
        try:
            yield server
        finally:
            try:
                await server.drain()  # health NOT_SERVING; in-flight RPCs finish
                await pool.drain(timeout_s=server_config.drain_timeout_s)
            finally:
                await server.stop()
    finally:
        await pool.shutdown()


async def _serve(args: argparse.Namespace, server_config: ServerConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()

    def on_signal() -> None:
        if stop.is_set() and main is not None:  # a second signal: stop waiting for in-flight requests
            print("mlaserve: second signal, shutting down now", flush=True)
            main.cancel()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    async with running_gateway(pool_config_from_args(args), server_config) as server:
        metrics = f", metrics on http://{server.config.metrics_host}:{server.metrics_port}/metrics"
        http = f", OpenAI API on {server.http.base_url}" if server.http is not None else ""
        print(
            f"mlaserve: serving {args.model} on {server.config.host}:{server.port}"
            f"{' (' + server.config.tls.describe() + ')' if server.config.tls else ''}"
            f"{http}{metrics if server.metrics_port else ''}; Ctrl-C to drain and stop",
            flush=True,
        )
        await stop.wait()
        print("mlaserve: draining...", flush=True)
    print("mlaserve: stopped", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:  # before Ray and the workers start: a bad TLS file, limit or chat template fails in a second
        server_config = server_config_from_args(args)
        http = server_config.http
        if http is not None and http.chat_template_file is not None:
            from mlaserve.worker.chat_template import load_chat_template

            load_chat_template(http.model, http.chat_template_file)
    except ValueError as e:
        print(f"mlaserve serve: {e}", file=sys.stderr)
        return 2
    init_ray(args.address)
    try:
        return asyncio.run(_serve(args, server_config))
    except asyncio.CancelledError:
        return 130
    except (OSError, ValueError) as e:
        print(f"mlaserve serve: {e}", file=sys.stderr)
        return 1
    finally:
        import ray

        ray.shutdown()
