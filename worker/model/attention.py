"""Multi-head latent attention in its weight-absorbed form over the paged latent cache.

Per layer and token: the latent c_kv = RMSNorm(kv_a(x)[:512]) and the roped k_pe (64) are written as
one 576-value row into the slot AttentionMetadata.slot_mapping names. Queries absorb W_UK (the key
half of kv_b_proj): q_latent = q_nope @ W_UK, so that [q_latent, q_pe] (576) scores directly against
the cached rows; the kernel returns a 512-wide latent output per head, W_UV (the value half of
kv_b_proj) lifts it to v_head_dim, and o_proj mixes the heads. Prefill (s_q > 1) and decode
(s_q = 1) share this path; the kernel's causal rule hides the later tokens of the same forward.

A negative slot means "padding, do not write" (left-padded prefill batches).

On CUDA bf16 with Triton (fused.use_fused) the latent's RMSNorm, both RoPEs, the cache write and the
query's RoPE half are one kernel (fused/mla_prep.py), and the W_UK / W_UV products write straight into
the kernel's query buffer / o_proj's input (no cat, no copies); the torch path below is its oracle.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..attention_metadata import AttentionMetadata, CacheWrite
from . import fused
from .config import ModelConfig
from .layers import RMSNorm
from .rope import RotaryEmbedding

LATENT_DIM = 576  # kv_lora_rank + qk_rope_head_dim


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        c = config
        self.num_heads = c.num_attention_heads
        self.kv_lora_rank = c.kv_lora_rank
        self.qk_nope_head_dim = c.qk_nope_head_dim
        self.qk_rope_head_dim = c.qk_rope_head_dim
        self.v_head_dim = c.v_head_dim
        self.softmax_scale = c.softmax_scale
        q_out = c.num_attention_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, q_out, bias=False, dtype=dtype)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias, dtype=dtype)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, dtype=dtype)
            self.q_b_proj = nn.Linear(c.q_lora_rank, q_out, bias=False, dtype=dtype)
        self.kv_a_proj_with_mqa = nn.Linear(
            c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias, dtype=dtype
        )
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, dtype=dtype)
        self.kv_b_proj = nn.Linear(
            c.kv_lora_rank,
            c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim),
            bias=False,
            dtype=dtype,
        )
        self.o_proj = nn.Linear(
            c.num_attention_heads * c.v_head_dim, c.hidden_size, bias=c.attention_bias, dtype=dtype
        )
        self.q_lora = c.q_lora_rank is not None

    def forward(
        self,
        x: torch.Tensor,  # [b, s_q, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],  # each [b, s_q, 32] float32
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,  # [num_pages, 64, 1, 576]
        meta: AttentionMetadata,
        cache_write: CacheWrite,
    ) -> torch.Tensor:  # [b, s_q, hidden]
        if fused.use_fused(x) and x.dtype == kv_cache.dtype:
            return self._forward_fused(x, cos_sin, rotary, kv_cache, meta)
        b, s, _ = x.shape
        h, nope, rope, rank = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(b, s, h, nope + rope)  # [b, s_q, h, qk_head_dim]
        q_nope, q_pe = q.split([nope, rope], dim=-1)  # [b, s_q, h, nope], [b, s_q, h, 64]

        kv = self.kv_a_proj_with_mqa(x)  # [b, s_q, 576]
        c_kv, k_pe = kv.split([rank, rope], dim=-1)  # [b, s_q, 512], [b, s_q, 64]
        c_kv = self.kv_a_layernorm(c_kv)
        cos, sin = cos_sin
        q_pe = rotary.apply(q_pe, cos, sin)
        k_pe = rotary.apply(k_pe, cos, sin)
        write_latent(kv_cache, cache_write, torch.cat((c_kv, k_pe), dim=-1))

        w_kv = self.kv_b_proj.weight.view(h, nope + self.v_head_dim, rank)  # [h, nope + v, 512]
        w_uk, w_uv = w_kv[:, :nope], w_kv[:, nope:]  # [h, nope, 512], [h, v, 512]
        q_latent = torch.einsum("bshn,hnc->bshc", q_nope, w_uk)  # [b, s_q, h, 512]
        q_full = torch.cat((q_latent, q_pe), dim=-1).to(kv_cache.dtype).contiguous()  # [b, s_q, h, 576]
        out, _ = kernels.flash_mla_with_kvcache(
            q_full,
            kv_cache,
            meta.block_table,
            meta.cache_seqlens,
            rank,
            meta.tile_scheduler_metadata,
            meta.num_splits,
            softmax_scale=self.softmax_scale,
            causal=meta.causal,
        )  # [b, s_q, h, 512]
        o = torch.einsum("bshc,hvc->bshv", out.to(x.dtype), w_uv)  # [b, s_q, h, v]
        return self.o_proj(o.reshape(b, s, h * self.v_head_dim))

    def _forward_fused(
        self,
        x: torch.Tensor,  # [b, s_q, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],  # each [b, s_q, 32] float32
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,  # [num_pages, 64, 1, 576], x's dtype
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [b, s_q, hidden]
        from .fused.mla_prep import mla_prep

        b, s, _ = x.shape
        t = b * s
        h, nope, rank, v = self.num_heads, self.qk_nope_head_dim, self.kv_lora_rank, self.v_head_dim
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(t, h, nope + self.qk_rope_head_dim)  # [T, h, qk_head_dim]
        kv = self.kv_a_proj_with_mqa(x).view(t, LATENT_DIM)  # [T, 576]
        q_full = torch.empty(b, s, h, LATENT_DIM, dtype=x.dtype, device=x.device)  # [b, s_q, h, 576]
        qf = q_full.view(t, h, LATENT_DIM)
        cos, sin = cos_sin
        mla_prep(
            q,
            kv,
            cos.reshape(t, -1),
            sin.reshape(t, -1),
            self.kv_a_layernorm.weight,
            self.kv_a_layernorm.eps,
            meta.slot_mapping.reshape(t),
            kv_cache.view(-1, LATENT_DIM),
            qf,
            nope=nope,
            interleave=rotary.rope.interleave,
        )
        w_kv = self.kv_b_proj.weight.view(h, nope + v, rank)  # [h, nope + v, 512]
        w_uk, w_uv = w_kv[:, :nope], w_kv[:, nope:]  # [h, nope, 512], [h, v, 512]
        # q_latent = q_nope @ W_UK per head, into the first 512 columns of each head's query row.
        torch.bmm(q[..., :nope].transpose(0, 1), w_uk, out=qf[..., :rank].transpose(0, 1))  # [h, T, 512]
        out, _ = kernels.flash_mla_with_kvcache(
            q_full,
            kv_cache,
            meta.block_table,
            meta.cache_seqlens,
            rank,
            meta.tile_scheduler_metadata,
            meta.num_splits,
            softmax_scale=self.softmax_scale,
            causal=meta.causal,
        )  # [b, s_q, h, 512]
        o = torch.empty(t, h, v, dtype=x.dtype, device=x.device)  # [T, h, v]
        torch.bmm(
            out.to(x.dtype).view(t, h, rank).transpose(0, 1), w_uv.transpose(1, 2), out=o.transpose(0, 1)
        )
        return self.o_proj(o.view(b, s, h * v))


def write_latent(
    kv_cache: torch.Tensor,  # [num_pages, 64, 1, 576]
    write: CacheWrite,
    latent: torch.Tensor,  # [b, s_q, 576]
) -> None:
    """Stores each new token's latent row at its slot."""
    flat = kv_cache.view(-1, LATENT_DIM)  # [num_pages * 64, 576]
    rows = latent.reshape(-1, LATENT_DIM).to(kv_cache.dtype)  # [b * s_q, 576]
    if write.rows is not None:
        rows = rows.index_select(0, write.rows)
    flat.index_copy_(0, write.slots, rows)
