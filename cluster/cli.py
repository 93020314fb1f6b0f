"""The `mlaserve` command: one subcommand per module under mlaserve.cluster.commands.

Each command module exposes `add_arguments(parser)` and `run(args) -> int`; it is imported only
when its subcommand runs, so `mlaserve --help` stays fast and pulls in neither torch nor Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "generate": (
        "mlaserve.cluster.commands.generate",
        "generate text: offline engine, or a gRPC client with --server",
    ),
    "serve": ("mlaserve.cluster.commands.serve", "start the Ray workers and the gRPC gateway"),
    "status": ("mlaserve.cluster.commands.status", "print the cluster's workers and cache occupancy"),
    "demo": (
        "mlaserve.cluster.commands.demo",
        "start a local cluster on the tiny model, ask it, print the answer",
    ),
    "bench": ("mlaserve.cluster.commands.bench", "benchmarks (e.g. `mlaserve bench router`)"),
    "batch": ("mlaserve.cluster.commands.batch", "run a JSONL batch job against the cluster"),
}


def build_parser(commands: dict[str, tuple[str, str]] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlaserve", description="MLA decoding service for DeepSeek-V2/V3 models"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in commands.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help / the error and exits
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    sub_parser = argparse.ArgumentParser(prog=f"mlaserve {name}", description=COMMANDS[name][1])
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
