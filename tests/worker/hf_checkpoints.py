"""Tiny random DeepSeek checkpoints written by transformers' own classes (the HF-parity oracle).

    ckpt = write_v2_checkpoint(tmp_path / "v2", seed=seed)            # no q_lora, softmax greedy MoE
    ckpt = write_v3_checkpoint(tmp_path / "v3", seed=seed, sharded=True)  # q_lora, sigmoid noaux_tc, YaRN
    ckpt.path    # directory: config.json, *.safetensors (+ index when sharded), tokenizer.json
    ckpt.model   # the transformers model (float32, eval, eager attention) whose weights were saved

The configs keep kv_lora_rank = 512 and qk_rope_head_dim = 64 (the latent cache layout) and are tiny
elsewhere. Weights are redrawn at a useful scale (transformers' init std 0.02 makes near-uniform
attention and near-zero logits, which would hide mistakes): matrices ~ N(0, 1/fan_in), norms around 1,
score-correction biases non-zero. The tokenizer is mlaserve's byte-level one (BOS 256, EOS 257),
so the vocabulary is >= 258.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from mlaserve.worker.tokenizer import build_byte_tokenizer

VOCAB = 300
BOS, EOS = 256, 257


@dataclass
class HFCheckpoint:
    path: Path
    model: torch.nn.Module  # DeepseekV2ForCausalLM | DeepseekV3ForCausalLM


def _common(overrides: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=16,
        v_head_dim=32,
        first_k_dense_replace=1,
        max_position_embeddings=1024,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
        attn_implementation="eager",
        experts_implementation="eager",
    )
    kw.update(overrides)
    return kw


def tiny_v2_config(**overrides: Any) -> DeepseekV2Config:
    """DeepSeek-V2(-Lite) style: q_lora_rank None, softmax greedy routing, no YaRN."""
    kw = _common(
        dict(
            q_lora_rank=None,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=3,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
            norm_topk_prob=False,
            rope_theta=10000.0,
        )
    )
    kw.update(overrides)
    return DeepseekV2Config(**kw)


def tiny_v3_config(**overrides: Any) -> DeepseekV3Config:
    """DeepSeek-V3 style: q_lora, sigmoid noaux_tc group routing, YaRN with mscale, interleaved rope."""
    kw = _common(
        dict(
            q_lora_rank=48,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            max_position_embeddings=1024,
            rope_scaling={
                "type": "yarn",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "original_max_position_embeddings": 128,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
        )
    )
    kw.update(overrides)
    return DeepseekV3Config(**kw)


def hf_written(config: DeepseekV2Config | DeepseekV3Config) -> dict[str, Any]:
    """The config.json dict transformers 5 writes for `config`."""
    return json.loads(config.to_json_string())


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        elif name.endswith("embed_tokens.weight"):
            p.copy_(torch.randn(p.shape, generator=gen))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    for name, b in sorted(model.named_buffers()):
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.05 * torch.randn(b.shape, generator=gen))


def write_hf_checkpoint(
    config: DeepseekV2Config | DeepseekV3Config,
    directory: str | Path,
    *,
    seed: int,
    max_shard_size: str | None = None,
    tokenizer: bool = True,
) -> HFCheckpoint:
    """Builds the transformers model of `config`, randomises it from `seed`, saves it to `directory`."""
    directory = Path(directory)
    torch.manual_seed(seed)
    cls = DeepseekV3ForCausalLM if isinstance(config, DeepseekV3Config) else DeepseekV2ForCausalLM
    model = cls(config).to(torch.float32).eval()
    randomize_(model, seed)
    kwargs: dict[str, Any] = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    if tokenizer:
        build_byte_tokenizer().save(str(directory / "tokenizer.json"))
    return HFCheckpoint(path=directory, model=model)


def write_v2_checkpoint(
    directory: str | Path, *, seed: int, sharded: bool = False, **overrides: Any
) -> HFCheckpoint:
    return write_hf_checkpoint(
        tiny_v2_config(**overrides), directory, seed=seed, max_shard_size="300KB" if sharded else None
    )


def write_v3_checkpoint(
    directory: str | Path, *, seed: int, sharded: bool = False, **overrides: Any
) -> HFCheckpoint:
    return write_hf_checkpoint(
        tiny_v3_config(**overrides), directory, seed=seed, max_shard_size="300KB" if sharded else None
    )
