"""mlaserve.worker.model: the DeepSeek MLA model (V2/V3), its config, presets and checkpoint loading.

`from mlaserve.worker.model import load_model, ModelConfig, PRESETS`. The torch modules load on
first use, so that config and presets stay importable without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import ModelConfig, MoEConfig, RopeConfig
from .presets import PRESETS, Preset, get_preset

_LAZY = {
    "LoadedModel": "mlaserve.worker.model.loader",
    "load_model": "mlaserve.worker.model.loader",
    "build_model": "mlaserve.worker.model.loader",
    "DeepseekForCausalLM": "mlaserve.worker.model.deepseek",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mlaserve.worker.model' has no attribute {name!r}")


__all__ = [
    "PRESETS",
    "DeepseekForCausalLM",
    "LoadedModel",
    "MoEConfig",
    "ModelConfig",
    "Preset",
    "RopeConfig",
    "build_model",
    "get_preset",
    "load_model",
]
