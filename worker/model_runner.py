"""BatchPlan -> tensors -> model -> last-token logits -> sampler.

Decodes (one new token each) run as one forward with s_q = 1. Prefills run one forward per group
of sequences with the same number of new tokens (b = group size, s_q = that number), or one per
sequence. Each forward builds its AttentionMetadata once (block_table, cache_seqlens including
this forward's tokens, slot_mapping of the new tokens, and the kernel's split plan from
get_mla_metadata) and every layer shares it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .attention_metadata import AttentionMetadata
from .kernels import get_mla_metadata
from .kv_cache import NUM_KV_HEADS, KVCache, block_table, slot_mapping
from .sampler import Sampler, SamplingState
from .scheduler import BatchPlan, ScheduledSeq


class ModelRunner:
    def __init__(self, model: Any, num_heads: int, kv_cache: KVCache, group_prefills: bool = True) -> None:
        self.model = model
        self.num_heads = num_heads  # query heads of the attention (h_q)
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self.group_prefills = group_prefills
        self.num_forwards = 0

    def forward_groups(self, plan: BatchPlan) -> list[list[ScheduledSeq]]:
        """The sequences of each model forward of this plan."""
        groups: list[list[ScheduledSeq]] = []
        if plan.decodes:
            groups.append(list(plan.decodes))
        if self.group_prefills:
            by_len: dict[int, list[ScheduledSeq]] = {}
            for s in plan.prefills:
                by_len.setdefault(s.num_new, []).append(s)
            groups.extend(by_len.values())
        else:
            groups.extend([s] for s in plan.prefills)
        return groups

    @torch.inference_mode()
    def compute_logits(self, plan: BatchPlan) -> tuple[list[str], torch.Tensor]:
        """Runs the plan's forwards; returns the ids of the sequences that sample and their
        last-token logits [n, vocab] float32, in the same order."""
        ids: list[str] = []
        rows: list[torch.Tensor] = []
        for group in self.forward_groups(plan):
            logits = self._forward(group)  # [b, 1, vocab]
            keep = [i for i, s in enumerate(group) if s.sample]
            if keep:
                index = torch.tensor(keep, device=logits.device)
                rows.append(logits[:, -1].index_select(0, index))
                ids.extend(group[i].request_id for i in keep)
        if not rows:
            return ids, torch.empty(0, 0, dtype=torch.float32, device=self.device)
        return ids, torch.cat(rows).float()

    def execute(
        self, plan: BatchPlan, sampler: Sampler, states: Mapping[str, SamplingState]
    ) -> dict[str, int]:
        """Runs the plan and samples the next token of every sequence that completes its tokens."""
        ids, logits = self.compute_logits(plan)
        tokens = sampler.sample(logits, [states[i] for i in ids], ids) if ids else []
        return dict(zip(ids, tokens, strict=True))

    def _forward(
        self, group: Sequence[ScheduledSeq]
    ) -> torch.Tensor:  # [b, 1, vocab] float32: last-token logits
        s_q = group[0].num_new
        if any(s.num_new != s_q for s in group):
            raise ValueError("a forward needs sequences with the same number of new tokens")
        dev = self.device
        starts = [s.start for s in group]
        input_ids = torch.tensor([s.token_ids for s in group], dtype=torch.int64).to(dev)  # [b, s_q]
        positions = (torch.tensor(starts, dtype=torch.int64)[:, None] + torch.arange(s_q)[None, :]).to(
            dev
        )  # [b, s_q]
        cache_seqlens = torch.tensor([s.seqlen for s in group], dtype=torch.int32).to(dev)  # [b]
        tables = [s.page_table for s in group]
        tile_scheduler_metadata, num_splits = get_mla_metadata(
            cache_seqlens, s_q * self.num_heads // NUM_KV_HEADS, NUM_KV_HEADS
        )
        meta = AttentionMetadata(
            block_table=block_table(tables, dev),  # [b, max_pages] int32
            cache_seqlens=cache_seqlens,
            slot_mapping=slot_mapping(tables, starts, s_q, dev),  # [b, s_q] int64
            tile_scheduler_metadata=tile_scheduler_metadata,
            num_splits=num_splits,
            causal=True,
        )
        self.num_forwards += 1
        return self.model.forward(
            input_ids, positions, self.kv_cache.layers, meta, only_last=True
        )  # [b, 1, vocab]
