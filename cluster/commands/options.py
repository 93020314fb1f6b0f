"""Command-line options that several `mlaserve` commands share: the bearer token, TLS and the sampling flags."""

from __future__ import annotations

import argparse
import os

from mlaserve.cluster.tls import ClientTLSConfig, TLSConfig
from mlaserve.worker.types import SamplingParams

AUTH_TOKEN_ENV = "MLASERVE_AUTH_TOKEN"
# The clients' TLS flags default to these (set once in a shell, used by generate, status, batch, bench).
# The client certificate has names of its own, so a shell that also starts a gateway keeps the two apart.
CLIENT_TLS_ENV = {
    "tls_ca": "MLASERVE_TLS_CA",
    "tls_cert": "MLASERVE_TLS_CLIENT_CERT",
    "tls_key": "MLASERVE_TLS_CLIENT_KEY",
    "tls_server_name": "MLASERVE_TLS_SERVER_NAME",
}

Parser = argparse.ArgumentParser | argparse._ArgumentGroup


def add_auth_token_argument(parser: Parser, purpose: str) -> None:
    """`--auth-token`, defaulting to $MLASERVE_AUTH_TOKEN; `purpose` says what the token does here."""
    parser.add_argument(
        "--auth-token", default=os.environ.get(AUTH_TOKEN_ENV), help=f"{purpose} (default: {AUTH_TOKEN_ENV})"
    )


def add_server_tls_arguments(parser: Parser) -> None:
    """The gateway's `--tls-cert`, `--tls-key`, `--tls-client-ca` (read back by `server_tls_from_args`)."""
    parser.add_argument(
        "--tls-cert",
        default=None,
        metavar="PEM",
        help="serve TLS with this certificate chain (with --tls-key)",
    )
    parser.add_argument(
        "--tls-key", default=None, metavar="PEM", help="the certificate's unencrypted private key"
    )
    parser.add_argument(
        "--tls-client-ca",
        default=None,
        metavar="PEM",
        help="mutual TLS: accept only clients with a certificate signed by this CA",
    )


def server_tls_from_args(args: argparse.Namespace) -> TLSConfig | None:
    """The gateway's TLSConfig (None: plaintext); TLSConfigError (a ValueError) naming the bad flag."""
    return TLSConfig.from_files(
        getattr(args, "tls_cert", None), getattr(args, "tls_key", None), getattr(args, "tls_client_ca", None)
    )


def add_client_tls_arguments(parser: Parser) -> None:
    """A client's `--tls`, `--tls-ca`, `--tls-cert`, `--tls-key`, `--tls-server-name` (read back by
    `client_tls_from_args`); each defaults to its environment variable (CLIENT_TLS_ENV)."""
    env = CLIENT_TLS_ENV
    parser.add_argument(
        "--tls", action="store_true", help="connect with TLS (implied by the other --tls-* flags)"
    )
    parser.add_argument(
        "--tls-ca",
        default=os.environ.get(env["tls_ca"]) or None,
        metavar="PEM",
        help=f"TLS: trust the server certificates this CA signed (default: {env['tls_ca']}, else the system's roots)",
    )
    parser.add_argument(
        "--tls-cert",
        default=os.environ.get(env["tls_cert"]) or None,
        metavar="PEM",
        help=f"mutual TLS: this client's certificate (with --tls-key; default: {env['tls_cert']})",
    )
    parser.add_argument(
        "--tls-key",
        default=os.environ.get(env["tls_key"]) or None,
        metavar="PEM",
        help=f"mutual TLS: the client certificate's private key (default: {env['tls_key']})",
    )
    parser.add_argument(
        "--tls-server-name",
        default=os.environ.get(env["tls_server_name"]) or None,
        metavar="NAME",
        help="TLS: the name to check the server's certificate against, when the address dialled is "
        f"not in it (e.g. an SSH tunnel; default: {env['tls_server_name']})",
    )


def client_tls_from_args(args: argparse.Namespace) -> ClientTLSConfig | None:
    """The client's ClientTLSConfig (None: plaintext); TLSConfigError (a ValueError) naming the bad flag."""
    return ClientTLSConfig.from_files(
        getattr(args, "tls_ca", None),
        getattr(args, "tls_cert", None),
        getattr(args, "tls_key", None),
        getattr(args, "tls_server_name", None),
        enabled=bool(getattr(args, "tls", False)),
    )


def add_sampling_arguments(parser: Parser, *, max_tokens: int = SamplingParams.max_tokens) -> None:
    """The SamplingParams flags (read back by `sampling_from_args`)."""
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=max_tokens,
        help=f"tokens to generate at most (default {max_tokens})",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    parser.add_argument(
        "--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: off)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling (reproducible output)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating after the EOS token")


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """SamplingParams from the flags of `add_sampling_arguments`; raises ValueError naming the bad one."""
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
