"""The paged MLA decode kernel API (FlashMLA's original signatures).

    get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)
        -> (tile_scheduler_metadata, num_splits)
    flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
                           tile_scheduler_metadata, num_splits, softmax_scale=None, causal=False)
        -> (out, softmax_lse)

Two backends implement it: the compiled sm_90a kernels (`sm90`, built from csrc/ into `_C`) and
the float32 torch reference (`reference`). Calls on CUDA tensors of a Hopper GPU go to the
compiled kernels when they are built; everything else goes to the reference.
`MLASERVE_KERNEL_BACKEND=reference` forces the reference. `backend()` says which one is live.
"""

from __future__ import annotations

import functools
import os

import torch

from . import reference


@functools.cache
def _compiled():
    """The sm90 wrapper module, or None when the extension is not built / no Hopper GPU is visible."""
    if os.environ.get("MLASERVE_KERNEL_BACKEND", "").lower() == "reference":
        return None
    try:
        from . import sm90
    except ImportError:
        return None
    return sm90 if sm90.is_supported() else None


def backend() -> str:
    """'sm90' when the compiled Hopper kernels serve CUDA tensors here, else 'reference'."""
    return "sm90" if _compiled() is not None else "reference"


def _impl(t: torch.Tensor):
    compiled = _compiled()
    if compiled is not None and t.is_cuda:
        return compiled
    return reference


def get_mla_metadata(cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int):
    """Split-KV plan for one decode step; reusable across all layers of that step."""
    return _impl(cache_seqlens).get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)


def flash_mla_with_kvcache(
    q: torch.Tensor,  # [b, s_q, h_q, 576]
    k_cache: torch.Tensor,  # [num_pages, 64, h_kv, 576]
    block_table: torch.Tensor,  # [b, max_pages] int32
    cache_seqlens: torch.Tensor,  # [b] int32
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over the paged latent cache: (out [b, s_q, h_q, 512], lse [b, h_q, s_q] fp32)."""
    return _impl(q).flash_mla_with_kvcache(
        q,
        k_cache,
        block_table,
        cache_seqlens,
        head_dim_v,
        tile_scheduler_metadata,
        num_splits,
        softmax_scale=softmax_scale,
        causal=causal,
    )


__all__ = ["backend", "flash_mla_with_kvcache", "get_mla_metadata", "reference"]
