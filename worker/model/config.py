"""ModelConfig: the shape and numerics of one DeepSeek MLA model, parsed from a checkpoint's config.json.

Torch-free (the cluster resolves presets and tokenizers without torch). Two config.json styles are
read: the one DeepSeek ships (`rope_scaling` with `type`, `rope_theta` at the top level,
`scoring_func` / `topk_method` spelled out) and the one transformers 5 writes (`rope_parameters`
with `rope_type` and `rope_theta`, `rope_interleave`, no `scoring_func` for V3). Where a V3 config
is silent about routing, the V3 defaults (sigmoid scores, noaux_tc) apply; for V2, softmax/greedy.

The latent cache layout fixes kv_lora_rank = 512 and qk_rope_head_dim = 64 (576 values per token);
other values are refused here, with the field named, before any weight is read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KV_LORA_RANK = 512  # latent width the paged cache and the kernel are built for
QK_ROPE_HEAD_DIM = 64  # RoPE part of each cached token
SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of the 64 RoPE dims: plain (`default`) or YaRN-scaled (`yarn`)."""

    dim: int = QK_ROPE_HEAD_DIM
    theta: float = 10000.0
    rope_type: str = "default"  # "default" | "yarn"
    interleave: bool = True  # DeepSeek's layout: rotate pairs (x0, x1), (x2, x3), ...
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # explicit cos/sin scale; derived from mscale* when None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "yarn"):
            raise ValueError(f"rope_scaling.type must be 'default' or 'yarn', got {self.rope_type!r}")
        if self.dim <= 0 or self.dim % 2:
            raise ValueError(f"qk_rope_head_dim must be a positive even number, got {self.dim}")
        if not self.theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.theta}")
        if self.rope_type == "yarn":
            if not self.factor > 0:
                raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
            if self.original_max_position_embeddings is None or self.original_max_position_embeddings <= 0:
                raise ValueError(
                    "rope_scaling.original_max_position_embeddings must be a positive integer for yarn"
                )

    @property
    def cos_sin_scale(self) -> float:
        """The factor on cos/sin (YaRN's attention factor; 1 for plain RoPE), as transformers computes it."""
        if self.rope_type == "default":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return yarn_get_mscale(self.factor, self.mscale) / yarn_get_mscale(
                self.factor, self.mscale_all_dim
            )
        return yarn_get_mscale(self.factor)

    @property
    def softmax_mscale(self) -> float:
        """Extra factor on the softmax scale: mscale(factor, mscale_all_dim)^2 under YaRN, else 1."""
        if self.rope_type == "default" or not self.mscale_all_dim:
            return 1.0
        m = yarn_get_mscale(self.factor, self.mscale_all_dim)
        return m * m


@dataclass(frozen=True)
class MoEConfig:
    """Routed + shared experts of the MoE layers. n_routed_experts == 0 means a dense model."""

    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 0
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    # deepseek_v2 (original code): normalised weights are not scaled; deepseek_v3: always scaled.
    scale_after_norm: bool = True

    def __post_init__(self) -> None:
        if self.n_routed_experts < 0:
            raise ValueError(f"n_routed_experts must be >= 0, got {self.n_routed_experts}")
        if self.n_routed_experts == 0:
            return
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method must be one of {TOPK_METHODS}, got {self.topk_method!r}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
        if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
            raise ValueError("topk_method 'noaux_tc' needs scoring_func 'sigmoid'")
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, n_routed_experts={self.n_routed_experts}], "
                f"got {self.num_experts_per_tok}"
            )
        if self.moe_intermediate_size <= 0:
            raise ValueError(f"moe_intermediate_size must be > 0, got {self.moe_intermediate_size}")
        if self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.n_group < 1 or self.n_routed_experts % self.n_group:
            raise ValueError(
                f"n_group must divide n_routed_experts={self.n_routed_experts}, got {self.n_group}"
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
        if self.topk_method == "noaux_tc" and self.n_routed_experts // self.n_group < 2:
            raise ValueError("noaux_tc scores groups by their top-2 experts: each group needs >= 2 experts")
        per_group = self.n_routed_experts // self.n_group
        if self.topk_method != "greedy" and self.topk_group * per_group < self.num_experts_per_tok:
            raise ValueError(
                f"topk_group={self.topk_group} groups of {per_group} experts cannot hold "
                f"num_experts_per_tok={self.num_experts_per_tok}"
            )
        if self.moe_layer_freq < 1:
            raise ValueError(f"moe_layer_freq must be >= 1, got {self.moe_layer_freq}")
        if self.first_k_dense_replace < 0:
            raise ValueError(f"first_k_dense_replace must be >= 0, got {self.first_k_dense_replace}")

    @property
    def enabled(self) -> bool:
        return self.n_routed_experts > 0


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model code needs; built once from config.json (or a preset) and never mutated."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 300
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    q_lora_rank: int | None = None
    kv_lora_rank: int = KV_LORA_RANK
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = QK_ROPE_HEAD_DIM
    v_head_dim: int = 32
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    rope: RopeConfig = field(default_factory=RopeConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type must be one of {SUPPORTED_MODEL_TYPES}, got {self.model_type!r}")
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "qk_nope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.kv_lora_rank != KV_LORA_RANK:
            raise ValueError(
                f"kv_lora_rank must be {KV_LORA_RANK} (the latent cache layout), got {self.kv_lora_rank}"
            )
        if self.qk_rope_head_dim != QK_ROPE_HEAD_DIM:
            raise ValueError(
                f"qk_rope_head_dim must be {QK_ROPE_HEAD_DIM} (the latent cache layout), got {self.qk_rope_head_dim}"
            )
        if self.rope.dim != self.qk_rope_head_dim:
            raise ValueError(
                f"rope.dim ({self.rope.dim}) must equal qk_rope_head_dim ({self.qk_rope_head_dim})"
            )
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"q_lora_rank must be null or a positive integer, got {self.q_lora_rank}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        dense_layers = [i for i in range(self.num_hidden_layers) if not self.is_moe_layer(i)]
        if dense_layers and self.intermediate_size <= 0:
            raise ValueError(f"intermediate_size must be > 0 (layers {dense_layers} are dense)")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times YaRN's mscale^2: the scale of the (absorbed) attention scores."""
        return self.qk_head_dim**-0.5 * self.rope.softmax_mscale

    @property
    def max_model_len(self) -> int:
        return self.max_position_embeddings

    def is_moe_layer(self, layer: int) -> bool:
        moe = self.moe
        return moe.enabled and layer >= moe.first_k_dense_replace and layer % moe.moe_layer_freq == 0

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Parses a config.json dict (DeepSeek's own style or transformers 5's)."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type must be one of {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
        is_v3 = model_type == "deepseek_v3"
        hidden_act = d.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu', got {hidden_act!r}")
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias = true is not supported (no DeepSeek checkpoint uses it)")
        if d.get("quantization_config") and d["quantization_config"].get("quant_method") not in (None, "fp8"):
            raise ValueError(
                f"quantization_config.quant_method {d['quantization_config'].get('quant_method')!r} "
                "is not supported (only block-wise fp8)"
            )
        max_pos = _int(d, "max_position_embeddings", 4096)
        rope = _parse_rope(d, max_pos, default_interleave=True)

        n_routed = d.get("n_routed_experts") or 0
        default_method = "noaux_tc" if is_v3 else "greedy"
        default_scoring = "sigmoid" if is_v3 else "softmax"
        moe = MoEConfig(
            n_routed_experts=int(n_routed),
            n_shared_experts=int(d.get("n_shared_experts") or 0),
            num_experts_per_tok=int(d.get("num_experts_per_tok") or 1),
            moe_intermediate_size=int(d.get("moe_intermediate_size") or 0),
            topk_method=d.get("topk_method") or default_method,
            scoring_func=d.get("scoring_func") or default_scoring,
            n_group=int(d.get("n_group") or 1),
            topk_group=int(d.get("topk_group") or 1),
            norm_topk_prob=bool(d.get("norm_topk_prob", is_v3)),
            routed_scaling_factor=float(d.get("routed_scaling_factor") or 1.0),
            first_k_dense_replace=int(d.get("first_k_dense_replace") or 0),
            moe_layer_freq=int(d.get("moe_layer_freq") or 1),
            scale_after_norm=is_v3,
        )
        q_lora = d.get("q_lora_rank")
        return cls(
            model_type=model_type,
            vocab_size=_int(d, "vocab_size"),
            hidden_size=_int(d, "hidden_size"),
            intermediate_size=_int(d, "intermediate_size", 0),
            num_hidden_layers=_int(d, "num_hidden_layers"),
            num_attention_heads=_int(d, "num_attention_heads"),
            q_lora_rank=None if q_lora is None else int(q_lora),
            kv_lora_rank=_int(d, "kv_lora_rank"),
            qk_nope_head_dim=_int(d, "qk_nope_head_dim"),
            qk_rope_head_dim=_int(d, "qk_rope_head_dim"),
            v_head_dim=_int(d, "v_head_dim"),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_pos,
            attention_bias=bool(d.get("attention_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=_first_id(d.get("bos_token_id")),
            eos_token_id=_first_id(d.get("eos_token_id")),
            rope=rope,
            moe=moe,
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ModelConfig:
        return cls.from_json_file(Path(directory) / "config.json")


def _int(d: dict[str, Any], key: str, default: int | None = None) -> int:
    value = d.get(key, default)
    if value is None:
        raise ValueError(f"config.json lacks {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return int(value)


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _parse_rope(d: dict[str, Any], max_pos: int, *, default_interleave: bool) -> RopeConfig:
    """Reads `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (DeepSeek's config.json)."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"rope_scaling must be an object or null, got {params!r}")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    interleave = bool(d.get("rope_interleave", default_interleave))
    dim = _int(d, "qk_rope_head_dim")
    if rope_type == "default":
        return RopeConfig(dim=dim, theta=theta, interleave=interleave)
    if rope_type != "yarn":
        raise ValueError(f"rope_scaling.type must be 'yarn' (or absent), got {rope_type!r}")
    original = int(params.get("original_max_position_embeddings") or max_pos)
    factor = params.get("factor")
    factor = float(factor) if factor is not None else max_pos / original
    return RopeConfig(
        dim=dim,
        theta=theta,
        rope_type="yarn",
        interleave=interleave,
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=None if params.get("mscale") is None else float(params["mscale"]),
        mscale_all_dim=None if params.get("mscale_all_dim") is None else float(params["mscale_all_dim"]),
        attention_factor=None
        if params.get("attention_factor") is None
        else float(params["attention_factor"]),
        truncate=bool(params.get("truncate", True)),
    )
