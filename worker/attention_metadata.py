"""AttentionMetadata: the tensors one model forward needs to read and write the paged latent cache.

Built by the model runner once per forward and shared by every layer of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    block_table: torch.Tensor  # [b, max_pages] int32: logical page -> physical page
    cache_seqlens: torch.Tensor  # [b] int32: tokens in the cache per sequence, this forward's included
    slot_mapping: torch.Tensor  # [b, s_q] int64: physical slot (page * 64 + offset) of each new token
    tile_scheduler_metadata: torch.Tensor  # from get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    num_splits: torch.Tensor  # [b + 1] int32, from get_mla_metadata
    causal: bool = True  # query token i sees keys < seqlen - s_q + i + 1
