"""Decode forwards on static per-bucket buffers, replayed as CUDA graphs on a GPU.

A decode forward (every sequence adds one token) launches hundreds of small kernels, and on a GPU
its host time dominates the step (docs/engine-performance.md). Here the batch is padded up to a
bucket size (1, 2, 4, ... max_batch), the inputs live in static device buffers that each step
refreshes with one host -> device copy, and on CUDA the forward of each bucket is captured once as a
CUDA graph, so a decode step becomes one graph launch.

Padding rows decode a token of their own: their latent goes to the cache's scratch page (never in
any page table) and their cache_seqlens is 0, so their attention reads nothing and no real
sequence's cache is touched. On the CPU the same static-buffer path runs eagerly (no graphs): that
is what the CPU tests check against the plain runner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .attention_metadata import AttentionMetadata, CacheWrite
from .config import PAGE_SIZE
from .kernels import get_mla_metadata
from .kv_cache import NUM_KV_HEADS, KVCache
from .model_runner import PAD_TOKEN_ID, host_inputs
from .scheduler import ScheduledSeq


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two from 1 up to the first one >= max_batch."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch!r}")
    sizes = [1]
    while sizes[-1] < max_batch:
        sizes.append(sizes[-1] * 2)
    return tuple(sizes)


@dataclass
class _Bucket:
    """Static device tensors of one bucket of B rows; views of one int32 buffer."""

    size: int  # B
    buffer: torch.Tensor  # [6B + B + B * max_pages] int32 on the device
    staging: torch.Tensor  # the same shape on the host (pinned on CUDA)
    input_ids: torch.Tensor  # [B, 1] int64
    positions: torch.Tensor  # [B, 1] int64
    slots: torch.Tensor  # [B] int64: cache slot of each row's new token
    cache_seqlens: torch.Tensor  # [B] int32
    block_table: torch.Tensor  # [B, max_pages] int32
    copied: Any = None  # torch.cuda.Event after the last staging -> buffer copy (CUDA)
    logits: torch.Tensor | None = None  # [B, 1, vocab] float32, written by each run
    graph: Any = None  # torch.cuda.CUDAGraph once captured


class DecodeGraphs:
    """Runs decode forwards of up to max_batch sequences with at most max_pages pages each."""

    def __init__(
        self,
        model: Any,
        num_heads: int,
        kv_cache: KVCache,
        *,
        max_batch: int,
        max_pages: int,
        use_graphs: bool | None = None,
    ) -> None:
        if kv_cache.scratch_page is None:
            raise ValueError(
                "DecodeGraphs needs a KVCache with a scratch page (KVCache(..., scratch_page=True))"
            )
        if max_pages < 1:
            raise ValueError(f"max_pages must be >= 1, got {max_pages!r}")
        self.model = model
        self.num_heads = num_heads
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self.max_pages = max_pages
        self.buckets = bucket_sizes(max_batch)
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._scratch_slot = kv_cache.scratch_page * PAGE_SIZE
        self._num_slots = kv_cache.num_pages * PAGE_SIZE  # slots a real sequence may write
        self._static: dict[int, _Bucket] = {}

    def supports(self, group: Sequence[ScheduledSeq]) -> bool:
        """True for a decode group that fits the largest bucket and the page-table width."""
        return (
            0 < len(group) <= self.buckets[-1]
            and all(s.num_new == 1 for s in group)
            and all(len(s.page_table) <= self.max_pages for s in group)
        )

    @torch.inference_mode()
    def forward(self, group: Sequence[ScheduledSeq]) -> torch.Tensor:  # [b, 1, vocab] float32
        """Last-token logits of a decode group. The tensor is the bucket's static output: it stays
        valid until the next decode forward of the same bucket."""
        if not self.supports(group):
            raise ValueError(
                f"not a decode group this runner takes (b = {len(group)}, largest bucket {self.buckets[-1]}, "
                f"max_pages {self.max_pages})"
            )
        b = len(group)
        bucket = self._bucket(next(size for size in self.buckets if size >= b))
        self._fill(bucket, group)
        self._run(bucket)
        assert bucket.logits is not None
        return bucket.logits[:b]

    # ---- static buffers ------------------------------------------------------------------------
    def _bucket(self, size: int) -> _Bucket:
        bucket = self._static.get(size)
        if bucket is None:
            bucket = self._new_bucket(size)
            self._static[size] = bucket
            if self.use_graphs:
                self._capture(bucket)
        return bucket

    def _new_bucket(self, size: int) -> _Bucket:
        n = 6 * size + size + size * self.max_pages  # three int64 fields as int32 pairs, then int32 fields
        buffer = torch.zeros(n, dtype=torch.int32, device=self.device)
        staging = torch.zeros(n, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        wide = buffer[: 6 * size].view(torch.int64)  # [3B]
        narrow = buffer[6 * size :]
        bucket = _Bucket(
            size=size,
            buffer=buffer,
            staging=staging,
            input_ids=wide[:size].view(size, 1),
            positions=wide[size : 2 * size].view(size, 1),
            slots=wide[2 * size :],
            cache_seqlens=narrow[:size],
            block_table=narrow[size:].view(size, self.max_pages),
        )
        self._fill(bucket, [])  # all rows padding: what a capture runs on
        return bucket

    def _fill(self, bucket: _Bucket, group: Sequence[ScheduledSeq]) -> None:
        """Writes the group's rows (then padding rows) into the bucket's buffer with one copy."""
        size, width = bucket.size, self.max_pages
        pad = size - len(group)
        h = host_inputs(group, 1, width)
        for s, slot in zip(group, h.slots, strict=True):
            if not 0 <= slot < self._num_slots:
                raise ValueError(
                    f"slot {slot} of request {s.request_id!r} is outside the cache ({self._num_slots} slots)"
                )
        ids = h.ids + [PAD_TOKEN_ID] * pad
        positions = h.positions + [0] * pad
        slots = h.slots + [self._scratch_slot] * pad
        seqlens = h.seqlens + [0] * pad
        table = h.table + [0] * (width * pad)
        wide = torch.tensor(ids + positions + slots, dtype=torch.int64)  # [3B]
        narrow = torch.tensor(seqlens + table, dtype=torch.int32)  # [B + B * width]
        if bucket.copied is not None:
            bucket.copied.synchronize()  # the previous copy out of the pinned staging buffer is done
        torch.cat((wide.view(torch.int32), narrow), out=bucket.staging)
        bucket.buffer.copy_(bucket.staging, non_blocking=True)
        if self.device.type == "cuda":
            bucket.copied = torch.cuda.Event()
            bucket.copied.record()

    # ---- running -----------------------------------------------------------------------------
    def _forward_static(self, bucket: _Bucket) -> torch.Tensor:  # [B, 1, vocab] float32
        """One eager forward over the bucket's static inputs (also what a graph captures)."""
        tile_scheduler_metadata, num_splits = get_mla_metadata(
            bucket.cache_seqlens, self.num_heads // NUM_KV_HEADS, NUM_KV_HEADS
        )
        meta = AttentionMetadata(
            block_table=bucket.block_table,
            cache_seqlens=bucket.cache_seqlens,
            slot_mapping=bucket.slots.view(bucket.size, 1),
            tile_scheduler_metadata=tile_scheduler_metadata,
            num_splits=num_splits,
            causal=True,
            cache_write=CacheWrite(slots=bucket.slots, rows=None),
        )
        return self.model.forward(
            bucket.input_ids, bucket.positions, self.kv_cache.layers, meta, only_last=True
        )

    def _run(self, bucket: _Bucket) -> None:
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            bucket.logits = self._forward_static(bucket)

    def _capture(self, bucket: _Bucket, warmups: int = 2) -> None:
        """Captures the bucket's forward (its buffers hold padding rows only: the warm-up forwards
        write nothing but the scratch page)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # lazy initialisation (cuBLAS workspaces, ...) off the capture
            for _ in range(warmups):
                self._forward_static(bucket)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            bucket.logits = self._forward_static(bucket)
        bucket.graph = graph

    @property
    def captured(self) -> tuple[int, ...]:
        """Bucket sizes with a captured graph."""
        return tuple(sorted(size for size, b in self._static.items() if b.graph is not None))
