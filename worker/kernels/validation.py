"""Argument checks shared by every backend of the kernel API.

Each check raises a ValueError/TypeError that names the offending argument, before any work is
launched, so a bad request never reaches a kernel (and never kills a worker).
"""

from __future__ import annotations

import torch

PAGE_SIZE = 64  # tokens per page of the latent cache
HEAD_DIM_QK = 576  # 512 latent + 64 RoPE
HEAD_DIM_V = 512  # V is the first 512 columns of the latent


def check_metadata_args(cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int) -> None:
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError("cache_seqlens must be a torch.Tensor")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if cache_seqlens.dim() != 1:
        raise ValueError(f"cache_seqlens must be 1-D [batch], got shape {tuple(cache_seqlens.shape)}")
    if int(num_q_tokens_per_head_k) < 1:
        raise ValueError(f"num_q_tokens_per_head_k must be >= 1, got {num_q_tokens_per_head_k}")
    if int(num_heads_k) < 1:
        raise ValueError(f"num_heads_k must be >= 1, got {num_heads_k}")


def check_attention_args(
    q: torch.Tensor,  # [b, s_q, h_q, 576]
    k_cache: torch.Tensor,  # [num_pages, 64, h_kv, 576]
    block_table: torch.Tensor,  # [b, max_pages] int32
    cache_seqlens: torch.Tensor,  # [b] int32
    head_dim_v: int,
    allowed_dtypes: tuple[torch.dtype, ...],
) -> None:
    """Checks shapes, dtypes and devices of flash_mla_with_kvcache's arguments."""
    for name, t in (
        ("q", q),
        ("k_cache", k_cache),
        ("block_table", block_table),
        ("cache_seqlens", cache_seqlens),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [batch, s_q, h_q, {HEAD_DIM_QK}], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(
            f"k_cache must be 4-D [num_pages, {PAGE_SIZE}, h_kv, {HEAD_DIM_QK}], got shape {tuple(k_cache.shape)}"
        )
    b, s_q, h_q, d = q.shape
    _, page_size, h_kv, d_k = k_cache.shape
    if d != HEAD_DIM_QK:
        raise ValueError(f"q's head dim must be {HEAD_DIM_QK}, got {d}")
    if d_k != HEAD_DIM_QK:
        raise ValueError(f"k_cache's head dim must be {HEAD_DIM_QK}, got {d_k}")
    if page_size != PAGE_SIZE:
        raise ValueError(f"k_cache's page size (dim 1) must be {PAGE_SIZE}, got {page_size}")
    if head_dim_v != HEAD_DIM_V:
        raise ValueError(f"head_dim_v must be {HEAD_DIM_V}, got {head_dim_v}")
    if s_q < 1:
        raise ValueError(f"q's s_q (dim 1) must be >= 1, got {s_q}")
    if h_kv < 1 or h_q % h_kv != 0:
        raise ValueError(f"q's head count h_q={h_q} must be a positive multiple of k_cache's h_kv={h_kv}")
    if q.dtype not in allowed_dtypes:
        raise TypeError(f"q must have dtype in {allowed_dtypes}, got {q.dtype}")
    if k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache must have the dtype of q ({q.dtype}), got {k_cache.dtype}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32, got {block_table.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != b:
        raise ValueError(f"block_table must be [batch={b}, max_pages], got shape {tuple(block_table.shape)}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if cache_seqlens.shape != (b,):
        raise ValueError(f"cache_seqlens must be [batch={b}], got shape {tuple(cache_seqlens.shape)}")
    for name, t in (("k_cache", k_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
