"""Regenerate the committed Python code of the protos: `python -m mlaserve.protos.generate`.

Runs grpc_tools.protoc on every .proto under protos/ (import root: protos/, so the files keep
their `mlaserve/v1/...` names in descriptors and reflection) and rewrites the generated gRPC
module's import so that it loads as `mlaserve.protos.mlaserve.v1.<name>_pb2`. The staleness test
(tests/cluster/test_proto_generated.py) calls `generate()` into a temporary directory and
compares the result with the committed files.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import re
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent  # protos/, the -I root
PACKAGE_PREFIX = "mlaserve.protos"  # what `mlaserve/...` under protos/ imports as
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

# `from mlaserve.v1 import decoder_pb2 as ...` -> `from mlaserve.protos.mlaserve.v1 import ...`
_IMPORT = re.compile(r"^from (mlaserve(?:\.\w+)*) import (\w+_pb2)\b", re.MULTILINE)


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """The .proto sources, relative to the import root, in a stable order."""
    return sorted(p.relative_to(root) for p in root.rglob("*.proto"))


def generated_files(root: Path = PROTO_ROOT) -> list[Path]:
    """The generated files each .proto yields, relative to the import root."""
    out: list[Path] = []
    for proto in proto_files(root):
        stem = proto.with_suffix("")
        out.extend(stem.parent / f"{stem.name}{suffix}" for suffix in GENERATED_SUFFIXES)
    return out


def _fix_imports(text: str) -> str:
    return _IMPORT.sub(lambda m: f"from {PACKAGE_PREFIX}.{m.group(1)} import {m.group(2)}", text)


def generate(out_dir: Path, root: Path = PROTO_ROOT) -> list[Path]:
    """Compile every .proto under `root` into `out_dir` (same relative layout); return the files."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    sources = [str(p) for p in proto_files(root)]
    if not sources:
        raise FileNotFoundError(f"no .proto files under {root}")
    argv = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *sources,
    ]
    # protoc resolves sources against the -I roots; run it with paths relative to `root`.
    cwd = os.getcwd()
    os.chdir(root)
    try:
        code = protoc.main(argv)
    finally:
        os.chdir(cwd)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}: {' '.join(argv)}")
    written: list[Path] = []
    for rel in generated_files(root):
        path = out_dir / rel
        if not path.is_file():
            raise RuntimeError(f"protoc did not write {path}")
        if path.suffix == ".py":
            path.write_text(_fix_imports(path.read_text()))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlaserve.protos.generate", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out", type=Path, default=PROTO_ROOT, help="output root (default: next to the protos)"
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
