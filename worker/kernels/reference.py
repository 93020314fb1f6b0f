"""Float32 reference of the paged MLA decode API: the test oracle and the CPU backend.

Written for clarity, not speed: every sequence's pages are gathered through the page table,
attention is computed densely in float32, and only keys inside each sequence's length (and its
causal window) are ever read, so whatever lies in unused slots (NaN included) never matters.
"""

from __future__ import annotations

import math

import torch

from .validation import HEAD_DIM_QK, PAGE_SIZE, check_attention_args, check_metadata_args

TILE_METADATA_FIELDS = 8  # columns of tile_scheduler_metadata, as in FlashMLA's original API


def get_mla_metadata(
    cache_seqlens: torch.Tensor,  # [b] int32
    num_q_tokens_per_head_k: int,
    num_heads_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference split plan: one split per sequence, one scheduler part.

    Returns (tile_scheduler_metadata [1, 8] int32, num_splits [b + 1] int32, the prefix sum of
    splits per sequence). The reference attention ignores the plan; it exists so that code written
    against the API runs unchanged on the CPU.
    """
    check_metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)
    b = cache_seqlens.shape[0]
    device = cache_seqlens.device
    metadata = torch.zeros(1, TILE_METADATA_FIELDS, dtype=torch.int32, device=device)
    if b > 0:
        metadata[0, 2] = b - 1  # last sequence of the (only) part
    num_splits = torch.arange(b + 1, dtype=torch.int32, device=device)
    return metadata, num_splits


def gather_sequence(
    k_cache: torch.Tensor,  # [num_pages, 64, h_kv, 576]
    page_ids: torch.Tensor,  # [max_pages] int32
    seqlen: int,
) -> torch.Tensor:  # [seqlen, h_kv, 576] float32
    """The first `seqlen` latent tokens of one sequence, in logical order."""
    num_pages = (seqlen + PAGE_SIZE - 1) // PAGE_SIZE
    if num_pages > page_ids.shape[0]:
        raise ValueError(
            f"sequence of {seqlen} tokens needs {num_pages} pages, block_table has {page_ids.shape[0]}"
        )
    ids = page_ids[:num_pages].long()
    if num_pages and (int(ids.min()) < 0 or int(ids.max()) >= k_cache.shape[0]):
        raise ValueError(f"block_table holds a page id outside [0, {k_cache.shape[0]})")
    pages = k_cache.index_select(0, ids)  # [num_pages, 64, h_kv, 576]
    return pages.reshape(num_pages * PAGE_SIZE, k_cache.shape[2], HEAD_DIM_QK)[:seqlen].float()


def flash_mla_with_kvcache(
    q: torch.Tensor,  # [b, s_q, h_q, 576]
    k_cache: torch.Tensor,  # [num_pages, 64, h_kv, 576]
    block_table: torch.Tensor,  # [b, max_pages] int32
    cache_seqlens: torch.Tensor,  # [b] int32
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor | None = None,
    num_splits: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [b, s_q, h_q, head_dim_v] in q's dtype, softmax_lse [b, h_q, s_q] float32).

    With causal and s_q > 1, query token i of a sequence of length L sees keys < L - s_q + i + 1.
    A query row that sees no key gets out = 0 and lse = +inf.
    """
    check_attention_args(
        q, k_cache, block_table, cache_seqlens, head_dim_v, (torch.bfloat16, torch.float16, torch.float32)
    )
    b, s_q, h_q, _ = q.shape
    h_kv = k_cache.shape[2]
    group = h_q // h_kv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(HEAD_DIM_QK)
    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float32, device=q.device)
    seqlens = cache_seqlens.tolist()
    for i, seqlen in enumerate(seqlens):
        if seqlen < 0:
            raise ValueError(f"cache_seqlens[{i}] = {seqlen} is negative")
        if seqlen == 0:
            continue
        kv = gather_sequence(k_cache, block_table[i], seqlen)  # [L, h_kv, 576]
        kv = kv.repeat_interleave(group, dim=1).transpose(0, 1)  # [h_q, L, 576]
        qi = q[i].float().transpose(0, 1)  # [h_q, s_q, 576]
        scores = torch.matmul(qi, kv.transpose(1, 2)) * scale  # [h_q, s_q, L]
        if causal:
            key_pos = torch.arange(seqlen, device=q.device)
            limit = seqlen - s_q + 1 + torch.arange(s_q, device=q.device)  # [s_q]: keys < limit are visible
            visible = key_pos[None, :] < limit[:, None]  # [s_q, L]
            scores = scores.masked_fill(~visible[None], -math.inf)
        row_lse = torch.logsumexp(scores, dim=-1)  # [h_q, s_q]; -inf where no key is visible
        has_keys = torch.isfinite(row_lse)
        probs = torch.exp(scores - torch.where(has_keys, row_lse, 0.0)[..., None])
        probs = torch.where(has_keys[..., None], probs, 0.0)
        o = torch.matmul(probs, kv[..., :head_dim_v])  # [h_q, s_q, dv]
        out[i] = o.transpose(0, 1)
        lse[i] = torch.where(has_keys, row_lse, math.inf)
    return out.to(q.dtype), lse
