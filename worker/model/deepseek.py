"""The DeepSeek-V2/V3 causal LM over the paged latent cache.

Module and parameter names match the Hugging Face checkpoints (`model.layers.N.self_attn.kv_b_proj`,
`model.layers.N.mlp.experts.gate_up_proj`, `lm_head`, ...), so loading is mostly by name.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention_metadata import AttentionMetadata, CacheWrite
from .attention import LATENT_DIM, MLAttention
from .config import ModelConfig
from .layers import DenseMLP, RMSNorm
from .moe import MoE
from .rope import RotaryEmbedding

PAGE_SIZE = 64


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.self_attn = MLAttention(config, dtype=dtype)
        self.mlp: nn.Module = (
            MoE(config.moe, config.hidden_size, dtype=dtype)
            if config.is_moe_layer(layer)
            else DenseMLP(config.hidden_size, config.intermediate_size, dtype=dtype)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)

    def forward(
        self,
        x: torch.Tensor,  # [b, s_q, hidden]: the previous layer's MLP output (layer 0: the embeddings)
        residual: torch.Tensor | None,  # [b, s_q, hidden]: the residual stream before x (layer 0: None)
        cos_sin: tuple[torch.Tensor, torch.Tensor],  # each [b, s_q, 32]
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,  # [num_pages, 64, 1, 576]
        meta: AttentionMetadata,
        cache_write: CacheWrite,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (this layer's MLP output, the residual stream before it)
        """The residual stream is carried beside the sublayer outputs, so that each residual add
        happens inside the next norm (one fused kernel on CUDA); the sums are the same as
        `x = x + attn(norm(x)); x = x + mlp(norm(x))`, bit for bit on the torch path."""
        h, residual = self.input_layernorm.add(x, residual)
        h = self.self_attn(h, cos_sin, rotary, kv_cache, meta, cache_write)
        h, residual = self.post_attention_layernorm.add(h, residual)
        mlp = self.mlp(h, meta.token_mask) if isinstance(self.mlp, MoE) else self.mlp(h)
        return mlp, residual


class DeepseekModel(nn.Module):
    def __init__(self, config: ModelConfig, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, dtype=dtype) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)


class DeepseekForCausalLM(nn.Module):
    """forward(input_ids, positions, kv_caches, meta) -> logits [b, s_q, vocab] float32."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = DeepseekModel(config, dtype=dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        self.rotary = RotaryEmbedding(config.rope)
        self.tie_weights()

    def tie_weights(self) -> None:
        """lm_head shares the embedding matrix when the config says so (re-done after moving devices)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.inference_mode()
    def compile_fused_kernels(self) -> int:
        """Compiles the fused MoE kernels for every tile bucket up to moe.FUSED_MAX_TOKENS by running the
        first MoE layer on zeros (Triton compiles on first use, ~1-2 s per kernel and config; the disk
        cache makes later starts fast). Call at start-up so no serving step waits for a compile.
        Returns how many bucket sizes ran (0 where the fused path is off)."""
        from . import fused
        from .fused.configs import table
        from .moe import FUSED_MAX_TOKENS, MoE

        probe = torch.zeros(1, 1, self.config.hidden_size, dtype=self.dtype, device=self.device)
        moe = next((layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)), None)
        if moe is None or not fused.use_fused(probe):
            return 0
        sizes = sorted({min(t, FUSED_MAX_TOKENS) for t in table()})
        for t in sizes:
            moe(probe.expand(t, 1, -1).contiguous())
        return len(sizes)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [b, s_q] int64
        positions: torch.Tensor,  # [b, s_q] int64
        kv_caches: list[torch.Tensor],  # per layer [num_pages, 64, 1, 576]
        meta: AttentionMetadata,
        *,
        only_last: bool = False,
    ) -> torch.Tensor:  # [b, s_q, vocab] float32 ([b, 1, vocab] with only_last)
        """One forward over b sequences of s_q new tokens each (prefill: s_q > 1, decode: s_q = 1).

        meta.cache_seqlens counts each sequence's cached tokens including these s_q; the new tokens'
        latents are written at meta.slot_mapping (negative = left padding, not written) before
        attention reads the cache. With only_last, logits are computed for the last position only.
        """
        self._check_inputs(input_ids, positions, kv_caches)
        cache_write = meta.cache_write or CacheWrite.from_slot_mapping(
            meta.slot_mapping, kv_caches[0].shape[0] * PAGE_SIZE
        )
        cos_sin = self.rotary.cos_sin(positions)
        x = self.model.embed_tokens(input_ids)  # [b, s_q, hidden]
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x, residual = layer(x, residual, cos_sin, self.rotary, kv_cache, meta, cache_write)
        if only_last:
            x = x[:, -1:]
            residual = residual[:, -1:] if residual is not None else None
        x, _ = self.model.norm.add(x, residual)
        return self.lm_head(x).to(torch.float32)

    def _check_inputs(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor]
    ) -> None:
        c = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [b, s_q], got shape {tuple(input_ids.shape)}")
        if positions.shape != input_ids.shape:
            raise ValueError(
                f"positions must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(positions.shape)}"
            )
        if len(kv_caches) != c.num_hidden_layers:
            raise ValueError(
                f"kv_caches must hold one tensor per layer ({c.num_hidden_layers}), got {len(kv_caches)}"
            )
        cache = kv_caches[0]
        if cache.dim() != 4 or cache.shape[1:] != (PAGE_SIZE, 1, LATENT_DIM):
            raise ValueError(
                f"each kv_cache must be [num_pages, {PAGE_SIZE}, 1, {LATENT_DIM}], got {tuple(cache.shape)}"
            )
