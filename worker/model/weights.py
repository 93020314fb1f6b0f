"""Reading Hugging Face safetensors checkpoints into a DeepseekForCausalLM.

Names are the checkpoint's own (the model mirrors them); the only reshaping is for routed experts,
which checkpoints store per expert (`mlp.experts.E.{gate,up,down}_proj.weight`, as DeepSeek ships
them and as transformers 5.17's save_pretrained writes them) or fused (`mlp.experts.gate_up_proj`
[E, 2I, H] / `mlp.experts.down_proj` [E, H, I]); both land in the fused parameters. Block-wise fp8
weights (`weight` float8_e4m3fn + `weight_scale_inv`, 128x128 blocks, DeepSeek-V3's release format)
are dequantised on the fly. Tensors of layers past num_hidden_layers (V3's multi-token-prediction
layer) are skipped. Every parameter must be filled exactly once, else a ValueError names the gaps.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from .deepseek import DeepseekForCausalLM

INDEX_FILE = "model.safetensors.index.json"
FP8_BLOCK = 128
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|_scale_inv)$")


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """tensor name -> safetensors file, from model.safetensors.index.json or every *.safetensors file."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(
                f"{index} is not a safetensors index (weight_map missing or bad JSON: {e})"
            ) from None
        files = {name: directory / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise FileNotFoundError(f"{index} names {file.name}, which is missing from {directory}")
        return files
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    files: dict[str, Path] = {}
    for file in shards:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if name in files:
                    raise ValueError(f"tensor {name} appears in both {files[name].name} and {file.name}")
                files[name] = file
    return files


def iter_tensors(files: dict[str, Path], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every checkpoint tensor, fp8 ones dequantised to float32; file by file."""
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    dev = "cpu" if device.type == "meta" else str(device)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device=dev) as f:
            for name in names:
                if name.endswith("_scale_inv"):
                    continue
                tensor = f.get_tensor(name)
                if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    scale_name = name + "_scale_inv"
                    if scale_name not in files:
                        raise ValueError(f"fp8 tensor {name} has no {scale_name}")
                    with safe_open(str(files[scale_name]), framework="pt", device=dev) as g:
                        tensor = dequantize_fp8(tensor, g.get_tensor(scale_name))
                yield name, tensor


def dequantize_fp8(
    weight: torch.Tensor,  # [out, in] float8
    scale_inv: torch.Tensor,  # [ceil(out / 128), ceil(in / 128)] float32
) -> torch.Tensor:  # [out, in] float32
    """Block-wise fp8 -> float32: each 128x128 block times its scale."""
    out_dim, in_dim = weight.shape
    scale = (
        scale_inv.to(torch.float32).repeat_interleave(FP8_BLOCK, 0)[:out_dim].repeat_interleave(FP8_BLOCK, 1)
    )
    return weight.to(torch.float32) * scale[:, :in_dim]


class _Filler:
    """Copies checkpoint tensors into the model's parameters and buffers, tracking what is filled."""

    def __init__(self, model: DeepseekForCausalLM) -> None:
        self.model = model
        self.targets: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=True))
        self.targets.update(model.named_buffers())
        self.targets = {k: v for k, v in self.targets.items() if not k.startswith("rotary.")}
        self.filled: set[str] = set()
        self.expert_parts: dict[str, set[tuple[int, str]]] = {}  # fused param -> {(expert, part)}

    def put(self, name: str, tensor: torch.Tensor) -> None:
        m = _EXPERT.match(name)
        if m:
            self._put_expert(m.group(1), int(m.group(2)), m.group(3), name, tensor)
            return
        if name == "lm_head.weight" and self.model.config.tie_word_embeddings:
            self._copy("model.embed_tokens.weight", name, tensor)
            return
        if name not in self.targets:
            layer = _LAYER.match(name)
            if (layer and int(layer.group(1)) >= self.model.config.num_hidden_layers) or _IGNORED.search(
                name
            ):
                return  # multi-token-prediction layers, rotary caches, fp8 scales (consumed above)
            raise ValueError(f"checkpoint tensor {name} has no place in the model (wrong config or naming?)")
        self._copy(name, name, tensor)

    def _copy(self, target_name: str, source_name: str, tensor: torch.Tensor) -> None:
        target = self.targets[target_name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(
                f"checkpoint tensor {source_name} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(tensor)
        self.filled.add(target_name)

    def _put_expert(self, prefix: str, expert: int, part: str, name: str, tensor: torch.Tensor) -> None:
        fused_name = f"{prefix}.down_proj" if part == "down_proj" else f"{prefix}.gate_up_proj"
        if fused_name not in self.targets:
            layer = _LAYER.match(name)
            if layer and int(layer.group(1)) >= self.model.config.num_hidden_layers:
                return
            raise ValueError(f"checkpoint tensor {name} has no place in the model (is this layer dense?)")
        fused = self.targets[fused_name]  # [E, 2I, H] or [E, H, I]
        if expert >= fused.shape[0]:
            raise ValueError(
                f"checkpoint tensor {name}: expert {expert} >= n_routed_experts {fused.shape[0]}"
            )
        inter = fused.shape[2] if part == "down_proj" else fused.shape[1] // 2
        dest = {
            "gate_proj": fused[expert, :inter],
            "up_proj": fused[expert, inter:],
            "down_proj": fused[expert],
        }[part]
        if tuple(tensor.shape) != tuple(dest.shape):
            raise ValueError(
                f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, the model expects {tuple(dest.shape)}"
            )
        with torch.no_grad():
            dest.copy_(tensor)
        self.expert_parts.setdefault(fused_name, set()).add((expert, part))

    def check_complete(self) -> None:
        for fused_name, parts in self.expert_parts.items():
            n = self.targets[fused_name].shape[0]
            wanted = {"down_proj"} if fused_name.endswith("down_proj") else {"gate_proj", "up_proj"}
            missing = [
                f"{fused_name.rsplit('.', 1)[0]}.{e}.{p}.weight"
                for e in range(n)
                for p in sorted(wanted)
                if (e, p) not in parts
            ]
            if missing:
                raise ValueError(f"checkpoint lacks {len(missing)} expert tensors, e.g. {missing[:5]}")
            self.filled.add(fused_name)
        missing = sorted(set(self.targets) - self.filled)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:8]}")


def load_checkpoint_weights(model: DeepseekForCausalLM, directory: Path) -> None:
    """Fills every parameter of `model` (already on its device) from the checkpoint in `directory`."""
    files = checkpoint_files(directory)
    filler = _Filler(model)
    for name, tensor in iter_tensors(files, model.device):
        filler.put(name, tensor)
    filler.check_complete()
