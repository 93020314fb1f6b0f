"""ModelConfig parsing (DeepSeek's shipped config.json and transformers 5's), its derived numerics
(YaRN frequencies, cos/sin factor, softmax scale) against transformers' own, and its refusals."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding, yarn_apply_mscale

from mlaserve.worker.model import PRESETS, ModelConfig
from mlaserve.worker.model.rope import inverse_frequencies
from tests.worker.hf_checkpoints import hf_written, tiny_v2_config, tiny_v3_config

# config.json as DeepSeek ships DeepSeek-V2-Lite and DeepSeek-V3 (trimmed of auto_map).
V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 102400,
}
V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}


def hf_rope(hf_config) -> tuple[torch.Tensor, float]:
    rope_type = hf_config.rope_parameters["rope_type"]
    if rope_type == "default":
        return DeepseekV3RotaryEmbedding.compute_default_rope_parameters(hf_config)
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config, None)


def assert_numerics_match_hf(ours: ModelConfig, hf_config) -> None:
    inv_freq, attention_factor = hf_rope(hf_config)
    torch.testing.assert_close(inverse_frequencies(ours.rope), inv_freq.float(), rtol=1e-6, atol=0)
    assert math.isclose(ours.rope.cos_sin_scale, attention_factor, rel_tol=1e-9)
    hf_scale = yarn_apply_mscale(hf_config.rope_parameters, hf_config.qk_head_dim**-0.5)
    assert math.isclose(ours.softmax_scale, hf_scale, rel_tol=1e-9)


def test_deepseek_shipped_v2_lite():
    cfg = ModelConfig.from_dict(V2_LITE)
    assert cfg.model_type == "deepseek_v2" and cfg.q_lora_rank is None
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size) == (
        27,
        2048,
        16,
        102400,
    )
    assert (
        cfg.moe.n_routed_experts == 64 and cfg.moe.n_shared_experts == 2 and cfg.moe.num_experts_per_tok == 6
    )
    assert (cfg.moe.topk_method, cfg.moe.scoring_func, cfg.moe.norm_topk_prob) == ("greedy", "softmax", False)
    assert cfg.rope.rope_type == "yarn" and cfg.rope.factor == 40 and cfg.rope.mscale_all_dim == 0.707
    assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert cfg.eos_token_id == 100001 and cfg.max_model_len == 163840
    # The softmax scale carries YaRN's mscale(40, 0.707)^2: written out, not via our helper.
    mscale = 0.1 * 0.707 * math.log(40) + 1
    assert math.isclose(cfg.softmax_scale, 192**-0.5 * mscale * mscale, rel_tol=1e-12)
    preset = PRESETS["deepseek-v2-lite"].config
    assert cfg == dataclasses.replace(preset, bos_token_id=100000, eos_token_id=100001)


def test_deepseek_shipped_v3():
    cfg = ModelConfig.from_dict(V3)
    assert cfg.q_lora_rank == 1536 and cfg.moe.topk_method == "noaux_tc" and cfg.moe.scoring_func == "sigmoid"
    assert (cfg.moe.n_group, cfg.moe.topk_group, cfg.moe.routed_scaling_factor) == (8, 4, 2.5)
    assert cfg.moe.norm_topk_prob and cfg.moe.scale_after_norm and cfg.rope.interleave
    assert [cfg.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]
    hf = DeepseekV3Config(**{k: v for k, v in V3.items() if k != "quantization_config"})
    assert_numerics_match_hf(ModelConfig.from_dict(V3), hf)


@pytest.mark.parametrize("style", ["hf-v2", "hf-v2-yarn", "hf-v3", "hf-v3-no-yarn"])
def test_transformers_written_configs_match_hf_numerics(style):
    hf = {
        "hf-v2": lambda: tiny_v2_config(),
        "hf-v2-yarn": lambda: tiny_v2_config(
            rope_scaling={
                "type": "yarn",
                "rope_theta": 5000.0,
                "factor": 16.0,
                "original_max_position_embeddings": 64,
                "beta_fast": 24,
                "beta_slow": 2,
                "mscale": 0.8,
                "mscale_all_dim": 0.9,
            }
        ),
        "hf-v3": lambda: tiny_v3_config(),
        "hf-v3-no-yarn": lambda: tiny_v3_config(rope_scaling=None, rope_theta=20000.0, rope_interleave=False),
    }[style]()
    data = hf_written(hf)
    assert "rope_parameters" in data
    ours = ModelConfig.from_dict(data)
    assert ours.num_hidden_layers == hf.num_hidden_layers and ours.q_lora_rank == hf.q_lora_rank
    assert ours.rope.interleave == data.get("rope_interleave", True)
    assert ours.moe.n_routed_experts == hf.n_routed_experts
    if style.startswith("hf-v3"):  # transformers' V3 config has no scoring_func/topk_method: V3 defaults
        assert "scoring_func" not in data and ours.moe.topk_method == "noaux_tc"
    assert_numerics_match_hf(ours, hf)


def test_both_styles_of_the_same_model_agree():
    shipped = copy.deepcopy(V2_LITE)
    hf = DeepseekV2Config(**shipped)
    assert ModelConfig.from_dict(hf_written(hf)) == ModelConfig.from_dict(shipped)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"kv_lora_rank": 256}, "kv_lora_rank"),
        ({"qk_rope_head_dim": 32}, "qk_rope_head_dim"),
        ({"model_type": "llama"}, "model_type"),
        ({"topk_method": "random"}, "topk_method"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"n_group": 3}, "n_group"),
        ({"topk_group": 2, "n_group": 1}, "topk_group"),
        ({"num_experts_per_tok": 65}, "num_experts_per_tok"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.type"),
        ({"hidden_size": "big"}, "hidden_size"),
        ({"num_hidden_layers": None}, "num_hidden_layers"),
    ],
)
def test_bad_values_name_the_field(change, field):
    bad = {**V2_LITE, **change}
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ModelConfig.from_dict(bad)


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)


def test_presets_are_valid_and_kernel_shaped():
    assert {"tiny", "deepseek-v2-lite", "deepseek-v3-tiny"} <= set(PRESETS)
    for name, preset in PRESETS.items():
        c = preset.config
        assert c.kv_lora_rank + c.qk_rope_head_dim == 576, name
        assert c.vocab_size >= 258, name  # byte tokenizer fits
