"""`mlaserve status`: print the cluster's workers and cache occupancy (asks a gateway over gRPC)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import grpc

from mlaserve.cluster.commands.options import (
    add_auth_token_argument,
    add_client_tls_arguments,
    client_tls_from_args,
)
from mlaserve.cluster.tls import ClientTLSConfig

DEFAULT_SERVER = "127.0.0.1:50051"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=os.environ.get("MLASERVE_SERVER", DEFAULT_SERVER),
        help=f"gateway HOST:PORT (default: MLASERVE_SERVER, else {DEFAULT_SERVER})",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    parser.add_argument("--json", action="store_true", help="print the ClusterStatus message as JSON")
    add_auth_token_argument(parser, "bearer token")
    add_client_tls_arguments(parser)


async def _status(args: argparse.Namespace, tls: ClientTLSConfig | None) -> int:
    from google.protobuf.json_format import MessageToJson

    from mlaserve.cluster.client import DecoderClient, format_status_table

    async with DecoderClient(args.server, timeout=args.timeout, token=args.auth_token, tls=tls) as client:
        status = await client.status()
    if args.json:
        print(
            MessageToJson(status, always_print_fields_with_no_presence=True, preserving_proto_field_name=True)
        )
    else:
        print(format_status_table(status))
    return 0


def run(args: argparse.Namespace) -> int:
    from mlaserve.cluster.client import rpc_error_hint

    try:
        tls = client_tls_from_args(args)
        return asyncio.run(_status(args, tls))
    except grpc.aio.AioRpcError as e:
        hint = rpc_error_hint(e, tls)
        print(f"mlaserve status: {args.server}: {e.code().name}: {e.details()}{hint}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"mlaserve status: {e}", file=sys.stderr)
        return 2
