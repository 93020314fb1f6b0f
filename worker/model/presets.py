"""Built-in model presets: a ModelConfig plus how to make random weights for it. Torch-free.

Presets carry no checkpoint: their weights are drawn from a fixed seed when load_model asks for
one (never before: `deepseek-v2-lite` is 15.7 billion parameters), and their tokenizer is the
byte-level one (ids 0-255 = bytes, then BOS, EOS).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig, MoEConfig, RopeConfig

BYTE_BOS_ID = 256
BYTE_EOS_ID = 257
BYTE_VOCAB_SIZE = 258  # 256 bytes + BOS + EOS


@dataclass(frozen=True)
class Preset:
    name: str
    config: ModelConfig
    seed: int = 0
    init_on_device: bool = False  # draw weights on the target device (big presets) instead of the CPU
    description: str = ""


def _tiny() -> ModelConfig:
    """V2-style: no q_lora, softmax greedy routing, 1 dense layer then MoE."""
    return ModelConfig(
        model_type="deepseek_v2",
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        q_lora_rank=None,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=4096,
        bos_token_id=BYTE_BOS_ID,
        eos_token_id=BYTE_EOS_ID,
        rope=RopeConfig(theta=10000.0),
        moe=MoEConfig(
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            topk_method="greedy",
            scoring_func="softmax",
            first_k_dense_replace=1,
            scale_after_norm=False,
        ),
    )


def _v3_tiny() -> ModelConfig:
    """V3-style: q_lora, sigmoid noaux_tc group routing, YaRN, normalised and scaled expert weights."""
    return ModelConfig(
        model_type="deepseek_v3",
        vocab_size=320,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        q_lora_rank=64,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=8192,
        bos_token_id=BYTE_BOS_ID,
        eos_token_id=BYTE_EOS_ID,
        rope=RopeConfig(
            theta=10000.0,
            rope_type="yarn",
            factor=4.0,
            original_max_position_embeddings=2048,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        moe=MoEConfig(
            n_routed_experts=16,
            n_shared_experts=1,
            num_experts_per_tok=4,
            moe_intermediate_size=32,
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            first_k_dense_replace=1,
            scale_after_norm=True,
        ),
    )


def _v2_lite() -> ModelConfig:
    """DeepSeek-V2-Lite's published shape (27 layers, 64 routed + 2 shared experts, top-6)."""
    return ModelConfig(
        model_type="deepseek_v2",
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        num_hidden_layers=27,
        num_attention_heads=16,
        q_lora_rank=None,
        qk_nope_head_dim=128,
        v_head_dim=128,
        max_position_embeddings=163840,
        bos_token_id=BYTE_BOS_ID,
        eos_token_id=BYTE_EOS_ID,
        rope=RopeConfig(
            theta=10000.0,
            rope_type="yarn",
            factor=40.0,
            original_max_position_embeddings=4096,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=0.707,
            mscale_all_dim=0.707,
        ),
        moe=MoEConfig(
            n_routed_experts=64,
            n_shared_experts=2,
            num_experts_per_tok=6,
            moe_intermediate_size=1408,
            topk_method="greedy",
            scoring_func="softmax",
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            first_k_dense_replace=1,
            scale_after_norm=False,
        ),
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny", _tiny(), seed=1234, description="V2-style toy model: CPU-fast, byte tokenizer"),
        Preset(
            "deepseek-v3-tiny",
            _v3_tiny(),
            seed=4321,
            description="V3-style toy model: q_lora, noaux_tc, YaRN",
        ),
        Preset(
            "deepseek-v2-lite",
            _v2_lite(),
            seed=0,
            init_on_device=True,
            description="DeepSeek-V2-Lite shape with random weights (GPU benchmarks)",
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"model {name!r} is neither a checkpoint directory nor a preset ({sorted(PRESETS)})"
        ) from None
