"""Command-line options that several `mlaserve` commands share: the bearer token and the sampling flags."""

from __future__ import annotations

import argparse
import os

from mlaserve.worker.types import SamplingParams

AUTH_TOKEN_ENV = "MLASERVE_AUTH_TOKEN"


def add_auth_token_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, purpose: str) -> None:
    """`--auth-token`, defaulting to $MLASERVE_AUTH_TOKEN; `purpose` says what the token does here."""
    parser.add_argument(
        "--auth-token", default=os.environ.get(AUTH_TOKEN_ENV), help=f"{purpose} (default: {AUTH_TOKEN_ENV})"
    )


def add_sampling_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, max_tokens: int = SamplingParams.max_tokens
) -> None:
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
