"""mlaserve.protos: the gRPC API (`mlaserve.v1.Decoder`) and its committed generated code.

    from mlaserve.protos import decoder_pb2, decoder_pb2_grpc

The generated modules load on first access, so the regeneration script
(`python -m mlaserve.protos.generate`) runs even when they are missing or stale.
"""

from __future__ import annotations

import importlib
from typing import Any

_GENERATED = {
    "decoder_pb2": "mlaserve.protos.mlaserve.v1.decoder_pb2",
    "decoder_pb2_grpc": "mlaserve.protos.mlaserve.v1.decoder_pb2_grpc",
}


def __getattr__(name: str) -> Any:
    if name in _GENERATED:
        return importlib.import_module(_GENERATED[name])
    raise AttributeError(f"module 'mlaserve.protos' has no attribute {name!r}")


__all__ = list(_GENERATED)
