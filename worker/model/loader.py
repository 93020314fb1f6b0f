"""load_model: a checkpoint directory or a preset name -> LoadedModel (model, config, tokenizer).

Checkpoints: config.json + safetensors (single file or sharded with model.safetensors.index.json),
tokenizer.json when present. Presets: random weights drawn from the preset's fixed seed. The model
is built on the meta device and materialised once on the target device, so a big model is never
allocated twice. Nothing here touches the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..tokenizer import TextTokenizer, load_tokenizer
from .config import ModelConfig
from .deepseek import DeepseekForCausalLM
from .presets import PRESETS
from .weights import load_checkpoint_weights


@dataclass(frozen=True)
class LoadedModel:
    model: DeepseekForCausalLM
    config: ModelConfig
    tokenizer: TextTokenizer
    device: torch.device
    dtype: torch.dtype
    source: str  # the directory or preset name it came from


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None -> bfloat16 on CUDA, float32 elsewhere; strings like 'bfloat16' / 'float32' accepted."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        names = {
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
            "float32": torch.float32,
            "fp32": torch.float32,
        }
        if dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
        return names[dtype]
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    return dtype


def _materialise(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> DeepseekForCausalLM:
    with torch.device("meta"):
        model = DeepseekForCausalLM(config, dtype=dtype)
    model.to_empty(device=device)
    model.tie_weights()
    model.rotary.reset_parameters()
    return model


@torch.no_grad()
def init_random_(model: DeepseekForCausalLM, seed: int, *, on_device: bool = False) -> None:
    """Deterministic random weights: matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norms = 1,
    score-correction biases ~ N(0, 0.01^2). Drawn on the CPU (same values on every device) unless
    on_device, which is for presets too big to draw on the CPU."""
    gen_device = model.device if on_device else torch.device("cpu")
    gen = torch.Generator(device=gen_device).manual_seed(seed)
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    for name in sorted(tensors):
        t = tensors[name]
        if name.endswith("norm.weight"):
            t.fill_(1.0)
            continue
        if name.endswith("e_score_correction_bias"):
            std = 0.01
        elif name == "model.embed_tokens.weight":
            std = 1.0
        else:
            std = t.shape[-1] ** -0.5  # fan_in of an (out, in) or (E, out, in) weight
        if on_device:
            t.normal_(0.0, std, generator=gen)
        else:
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32) * std)


def build_model(
    config: ModelConfig,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    seed: int = 0,
    init_on_device: bool = False,
) -> DeepseekForCausalLM:
    """A model of `config` with random weights from `seed` (presets, tests, benchmarks)."""
    dev = torch.device(device) if device is not None else default_device()
    model = _materialise(config, dev, resolve_dtype(dtype, dev))
    init_random_(model, seed, on_device=init_on_device and dev.type != "cpu")
    return model.eval().requires_grad_(False)


def load_model(
    model: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> LoadedModel:
    """A checkpoint directory (config.json + safetensors [+ tokenizer.json]) or a preset name."""
    dev = torch.device(device) if device is not None else default_device()
    dt = resolve_dtype(dtype, dev)
    path = Path(model)
    if path.is_dir():
        config = ModelConfig.from_pretrained(path)
        tokenizer = load_tokenizer(str(path))
        net = _materialise(config, dev, dt)
        load_checkpoint_weights(net, path)
        net = net.eval().requires_grad_(False)
    elif str(model) in PRESETS:
        preset = PRESETS[str(model)]
        config = preset.config
        tokenizer = load_tokenizer(str(model))
        net = build_model(
            config, device=dev, dtype=dt, seed=preset.seed, init_on_device=preset.init_on_device
        )
    else:
        raise ValueError(
            f"model {str(model)!r} is neither a checkpoint directory nor a preset ({sorted(PRESETS)})"
        )
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size {config.vocab_size}"
        )
    return LoadedModel(model=net, config=config, tokenizer=tokenizer, device=dev, dtype=dt, source=str(model))
