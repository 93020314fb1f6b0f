"""mlaserve.worker: the per-GPU engine (model, paged latent cache, continuous batching).

`from mlaserve.worker import Engine, SamplingParams`. Heavy modules (torch) load on first use, so
that the cluster's pure-policy code can import the typed messages without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .load import WorkerLoad
from .types import FinishReason, RequestDelta, RequestOutput, SamplingParams, Usage

_LAZY = {"Engine": "mlaserve.worker.engine", "EngineConfig": "mlaserve.worker.config"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mlaserve.worker' has no attribute {name!r}")


__all__ = [
    "Engine",
    "EngineConfig",
    "FinishReason",
    "RequestDelta",
    "RequestOutput",
    "SamplingParams",
    "Usage",
    "WorkerLoad",
]
