"""AttentionMetadata: the tensors one model forward needs to read and write the paged latent cache.

Built by the model runner once per forward and shared by every layer of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheWrite:
    """Where this forward's new latent rows go; computed once per forward, shared by all layers."""

    slots: torch.Tensor  # [n] int64: flat slot (page * 64 + offset) of each written row
    rows: torch.Tensor | None  # [n] int64: which of the b * s_q new tokens to write; None = all of them

    @classmethod
    def from_slot_mapping(cls, slot_mapping: torch.Tensor, num_slots: int) -> CacheWrite:
        """slot_mapping [b, s_q] int64 on the device; a negative slot marks padding (not written).
        Checks the slots against the cache size, which costs one device -> host sync."""
        slots = slot_mapping.reshape(-1).to(torch.int64)
        if slots.numel() == 0:
            return cls(slots=slots, rows=None)
        valid = slots >= 0
        all_valid, top = torch.stack((valid.all().to(torch.int64), slots.max())).tolist()  # one host sync
        if top >= num_slots:
            raise ValueError(f"slot_mapping holds slot {top}, the cache has {num_slots} slots")
        rows = None
        if not all_valid:
            rows = valid.nonzero().squeeze(1)
            slots = slots.index_select(0, rows)
        return cls(slots=slots, rows=rows)

    @classmethod
    def from_host(
        cls,
        slots: Sequence[int],  # [n]: the slot_mapping, flattened, on the host (negative = padding)
        num_slots: int,
        device_slots: torch.Tensor,  # [n] int64: the same values on the device
        device_rows: torch.Tensor
        | None,  # [m] int64: indices of the non-negative slots on the device, or None
    ) -> CacheWrite:
        """The model runner's path: slots checked on the host, where it built them; no device sync."""
        top = max(slots, default=-1)
        if top >= num_slots:
            raise ValueError(f"slot_mapping holds slot {top}, the cache has {num_slots} slots")
        if device_rows is None:
            if any(slot < 0 for slot in slots):
                raise ValueError("slot_mapping has padding slots but no device_rows were given")
            return cls(slots=device_slots, rows=None)
        return cls(slots=device_slots.index_select(0, device_rows), rows=device_rows)


@dataclass(frozen=True)
class AttentionMetadata:
    block_table: torch.Tensor  # [b, max_pages] int32: logical page -> physical page
    cache_seqlens: torch.Tensor  # [b] int32: tokens in the cache per sequence, this forward's included
    slot_mapping: torch.Tensor  # [b, s_q] int64: physical slot (page * 64 + offset) of each new token
    tile_scheduler_metadata: torch.Tensor  # from get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    num_splits: torch.Tensor  # [b + 1] int32, from get_mla_metadata
    causal: bool = True  # query token i sees keys < seqlen - s_q + i + 1
    # Where the new latent rows go, checked on the host by the model runner; None: the model derives it
    # from slot_mapping (and checks it on the device, one host sync per forward).
    cache_write: CacheWrite | None = None
    # [b * s_q] bool: False for padding rows of a decode bucket, whose MoE routing then reuses experts
    # that real rows use (no extra expert weights read); None: every row is real.
    token_mask: torch.Tensor | None = None
