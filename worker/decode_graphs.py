"""Decode forwards over the persistent decode batch, replayed as CUDA graphs on a GPU.

A decode forward (every sequence adds one token) launches hundreds of small kernels; on a GPU their
launches would cost more host time than the GPU needs for them (docs/engine-performance.md). Here
a decode batch of b rows runs in the smallest bucket of at least b rows (`bucket_sizes`); its inputs
are the static buffers of worker/decode_batch.py, and on CUDA the forward of every bucket is
captured as a CUDA graph when the engine starts (`capture_all`), so a decode step is a few small
copies and one graph launch, and no serving step ever stalls on a capture.

The graph also computes the greedy token and the non-finite flag of every row (the sampler's
`greedy_tokens`), so an all-greedy decode step needs no sampling kernel of its own.

Padding rows (b..B) decode a token of their own: their latent goes to the cache's scratch page and
their cache length is 0, so their attention reads nothing and no real sequence's cache is touched;
their MoE routing is masked to experts the real rows already use (AttentionMetadata.token_mask),
so they read no extra expert weights. On the CPU the same path runs eagerly, with buckets of
exactly b rows (no padding), which is what the CPU tests check against the plain runner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .attention_metadata import AttentionMetadata, CacheWrite
from .config import PAGE_SIZE
from .decode_batch import BucketInputs, DecodeBatch
from .kernels import get_mla_metadata
from .kv_cache import NUM_KV_HEADS, KVCache
from .sampler import greedy_tokens
from .scheduler import ScheduledSeq


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, 8, 16, then steps of 8 up to 32, of 16 up to 64 and of 32 beyond, up to the first
    >= max_batch: from 16 rows on, padding stays within half the real rows; 15 buckets for 256."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch!r}")
    sizes = [1]
    while sizes[-1] < max_batch:
        last = sizes[-1]
        sizes.append(last * 2 if last < 16 else last + (8 if last < 32 else 16 if last < 64 else 32))
    return tuple(sizes)


@dataclass(frozen=True)
class DecodeOutput:
    """One decode forward: the rows' sequences and their last-token logits, in row order."""

    seqs: tuple[ScheduledSeq, ...]  # [b]
    logits: torch.Tensor  # [b, vocab] float32 (a view of the bucket's static output on CUDA)
    greedy: torch.Tensor | None  # [2, b] int64: argmax and non-finite flag per row (replayed graphs)


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    logits: torch.Tensor  # [B, vocab] float32, written by every replay
    greedy: torch.Tensor  # [2, B] int64


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
        buckets: Sequence[int] | None = None,
    ) -> None:
        """use_graphs None: on CUDA. buckets None: `bucket_sizes(max_batch)` with graphs, exactly b
        rows without (eager forwards need no padding); tests pass padded buckets to the CPU."""
        if kv_cache.scratch_page is None:
            raise ValueError(
                "DecodeGraphs needs a KVCache with a scratch page (KVCache(..., scratch_page=True))"
            )
        self.model = model
        self.num_heads = num_heads
        self.kv_cache = kv_cache
        self._scratch_slot = kv_cache.scratch_page * PAGE_SIZE
        self.device = kv_cache.device
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if buckets is None:
            buckets = bucket_sizes(max_batch) if self.use_graphs else range(1, max_batch + 1)
        self.buckets = tuple(sorted(set(buckets)))
        if not self.buckets or self.buckets[0] < 1 or self.buckets[-1] < max_batch:
            raise ValueError(f"buckets {self.buckets} must be >= 1 and reach max_batch = {max_batch}")
        self.max_batch = max_batch
        self.pads = self.buckets != tuple(range(1, self.buckets[-1] + 1))  # some batch sizes get padding rows
        self.batch = DecodeBatch(
            self.buckets[-1],
            max_pages,
            self.device,
            num_slots=kv_cache.num_pages * PAGE_SIZE,
            scratch_slot=self._scratch_slot,
        )
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._graphs: dict[int, _Graph] = {}

    @property
    def max_pages(self) -> int:
        return self.batch.max_pages

    def supports(self, group: Sequence[ScheduledSeq]) -> bool:
        """True for a decode group that fits the largest bucket and the page-table width."""
        return (
            0 < len(group) <= self.max_batch
            and all(s.num_new == 1 for s in group)
            and all(len(s.page_table) <= self.max_pages for s in group)
        )

    def bucket_for(self, b: int) -> int:
        return next(size for size in self.buckets if size >= b)

    @torch.inference_mode()
    def forward(
        self,
        group: Sequence[ScheduledSeq],
        sampled_index: Mapping[int, int] | None = None,  # admission -> index in batch.sampled
    ) -> DecodeOutput:
        """Last-token logits of a decode group, in row order (DecodeOutput.seqs). On CUDA the tensors
        are the bucket's static outputs: valid until the next decode forward of the same bucket."""
        if not self.supports(group):
            raise ValueError(
                f"not a decode group this runner takes (b = {len(group)}, at most {self.max_batch} rows, "
                f"max_pages {self.max_pages})"
            )
        b = len(group)
        size = self.bucket_for(b)
        graph = self._graphs.get(size)
        if graph is None and self.use_graphs:  # capture_all was not called: capture before the inputs are set
            graph = self._capture(self.batch.bucket(size))
        rows = self.batch.prepare(group, size, sampled_index or {})
        if graph is not None:
            graph.graph.replay()
            return DecodeOutput(rows.seqs, graph.logits[:b], graph.greedy[:, :b])
        logits = self._forward_static(rows.inputs)[:b]
        return DecodeOutput(rows.seqs, logits, None)

    def capture_all(self) -> None:
        """Captures every bucket's graph now (the engine does this at start-up, on CUDA)."""
        if self.use_graphs:
            for size in self.buckets:
                if size not in self._graphs:
                    self._capture(self.batch.bucket(size))

    @property
    def captured(self) -> tuple[int, ...]:
        """Bucket sizes with a captured graph."""
        return tuple(sorted(self._graphs))

    # ---- running -----------------------------------------------------------------------------
    def _forward_static(self, inputs: BucketInputs) -> torch.Tensor:  # [B, vocab] float32
        """One eager forward over a bucket's static inputs (also what a graph captures)."""
        size = inputs.size
        tile_scheduler_metadata, num_splits = get_mla_metadata(
            inputs.seqlens, self.num_heads // NUM_KV_HEADS, NUM_KV_HEADS
        )
        meta = AttentionMetadata(
            block_table=self.batch.block_table[:size],
            cache_seqlens=inputs.seqlens,
            slot_mapping=inputs.slots.view(size, 1),
            tile_scheduler_metadata=tile_scheduler_metadata,
            num_splits=num_splits,
            causal=True,
            cache_write=CacheWrite(slots=inputs.slots, rows=None),
            token_mask=inputs.seqlens > 0 if self.pads else None,  # padding rows: seqlen 0
        )
        ids = self.batch.input_ids(inputs).view(size, 1)
        logits = self.model.forward(
            ids, inputs.positions.view(size, 1), self.kv_cache.layers, meta, only_last=True
        )
        return logits[:, -1]

    @torch.inference_mode()
    def _capture(self, inputs: BucketInputs, warmups: int = 2) -> _Graph:
        """Captures a bucket's forward over padding rows only (its inputs are reset to them first)."""
        inputs.seqlens.zero_()
        inputs.sources.fill_(-1)
        inputs.slots.fill_(self._scratch_slot)  # warm-ups write only the scratch page
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # lazy initialisation (cuBLAS workspaces, ...) off the capture
            for _ in range(warmups):
                greedy_tokens(self._forward_static(inputs))
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward_static(inputs)
            greedy = greedy_tokens(logits)
        captured = _Graph(graph, logits, greedy)
        self._graphs[inputs.size] = captured
        return captured
