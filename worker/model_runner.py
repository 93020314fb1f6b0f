"""BatchPlan -> tensors -> model -> last-token logits -> sampler.

Decodes (one new token each) run as one forward with s_q = 1. Prefills are packed into as few
forwards as the padding allowance permits: sorted by their number of new tokens, longest first,
each forward left-pads its sequences to its longest one (padding slots are -1: nothing is
written; the model reads each sequence's last position, which left padding keeps real), as long
as its padding stays within `max_padding` x its real tokens (0: only equal lengths share a
forward). Each forward builds its AttentionMetadata once (block_table, cache_seqlens including
this forward's tokens, slot_mapping of the new tokens, and the kernel's split plan from
get_mla_metadata) and every layer shares it.

Decodes run on the persistent decode batch (decode_graphs.py, decode_batch.py) when the runner
has one — always in the engine: page tables stay on the device, and the input token of a
sequence whose previous token is still pending comes from that step's device-side samples.

Host -> device traffic: every integer input of a prefill forward is built on the host as one int32
buffer and copied to the device in one transfer (pinned and asynchronous on CUDA), then viewed as
the fields; the slots are checked against the cache size on the host, so nothing in the runner or
the model's cache write waits for the device.

`launch` runs a plan and samples without waiting for the device: the tokens stay on the device (the
next step's decode inputs) and travel to the host in one non-blocking copy, which
`LaunchedStep.results` waits for — one step later when the engine overlaps steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .attention_metadata import AttentionMetadata, CacheWrite
from .config import PAGE_SIZE
from .kernels import get_mla_metadata
from .kv_cache import NUM_KV_HEADS, KVCache
from .sampler import Sampler, SamplingState
from .scheduler import PENDING_TOKEN, BatchPlan, ScheduledSeq

if TYPE_CHECKING:  # decode_graphs builds its inputs with host_inputs below
    from .decode_graphs import DecodeGraphs

PAD_TOKEN_ID = 0  # input id of left padding (any valid id: padding rows are never written or read)
PAD_SLOT = -1  # slot_mapping of left padding: not written


def pack_prefills(prefills: Sequence[ScheduledSeq], max_padding: float) -> list[list[ScheduledSeq]]:
    """Groups prefills into forwards: longest first, each group padded to its first (longest)
    sequence, a sequence joining the open group while padding <= max_padding x real tokens."""
    groups: list[list[ScheduledSeq]] = []
    real = 0
    for s in sorted(prefills, key=lambda s: -s.num_new):  # stable: equal lengths keep plan order
        if groups:
            group = groups[-1]
            padded = (len(group) + 1) * group[0].num_new
            if padded - (real + s.num_new) <= max_padding * (real + s.num_new):
                group.append(s)
                real += s.num_new
                continue
        groups.append([s])
        real = s.num_new
    return groups


@dataclass(frozen=True)
class ForwardInputs:
    """The tensors of one model forward over b sequences padded to s_q new tokens."""

    input_ids: torch.Tensor  # [b, s_q] int64
    positions: torch.Tensor  # [b, s_q] int64
    slot_mapping: torch.Tensor  # [b, s_q] int64, PAD_SLOT for padding
    cache_seqlens: torch.Tensor  # [b] int32
    block_table: torch.Tensor  # [b, max_pages] int32, right-padded with page 0
    cache_write: CacheWrite  # slot_mapping checked on the host: [b * s_q] slots (+ the non-padding rows)


@dataclass(frozen=True)
class HostInputs:
    """The integer fields of one forward, built on the host (row-major, b rows of s_q new tokens)."""

    ids: list[int]  # [b * s_q]: left padding PAD_TOKEN_ID
    positions: list[int]  # [b * s_q]: left padding 0
    slots: list[int]  # [b * s_q]: cache slot of each new token, left padding PAD_SLOT
    seqlens: list[int]  # [b]: cache length after this forward
    table: list[int]  # [b * width]: page tables, right-padded with page 0


def host_inputs(group: Sequence[ScheduledSeq], s_q: int, width: int) -> HostInputs:
    """The group's new tokens left-padded to s_q, page tables right-padded to width."""
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    seqlens: list[int] = []
    table: list[int] = []
    for s in group:
        pad = s_q - s.num_new
        if pad:
            ids.extend([PAD_TOKEN_ID] * pad)
            pos.extend([0] * pad)
            slots.extend([PAD_SLOT] * pad)
        ids.extend(s.token_ids)
        pos.extend(range(s.start, s.seqlen))
        pages = s.page_table
        slots.extend(pages[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE for p in range(s.start, s.seqlen))
        seqlens.append(s.seqlen)
        table.extend(pages)
        if len(pages) < width:
            table.extend([0] * (width - len(pages)))
    return HostInputs(ids, pos, slots, seqlens, table)


def build_inputs(group: Sequence[ScheduledSeq], device: torch.device, num_slots: int) -> ForwardInputs:
    """Left-pads the group's new tokens to the longest and moves every field in one copy.
    num_slots: the cache's slot count, which every slot is checked against here on the host."""
    b = len(group)
    s_q = max(s.num_new for s in group)
    width = max(len(s.page_table) for s in group)
    h = host_inputs(group, s_q, width)
    slots = h.slots
    n = b * s_q
    # rows of the new tokens that are written (only when some are padding)
    rows = [r for r, slot in enumerate(slots) if slot != PAD_SLOT] if PAD_SLOT in slots else []
    wide, narrow = to_device(
        torch.tensor(h.ids + h.positions + slots + rows, dtype=torch.int64),  # [3n + m]
        torch.tensor(h.seqlens + h.table, dtype=torch.int32),  # [b + b * width]
        device,
    )
    slot_mapping = wide[2 * n : 3 * n]  # [n]
    return ForwardInputs(
        input_ids=wide[:n].view(b, s_q),
        positions=wide[n : 2 * n].view(b, s_q),
        slot_mapping=slot_mapping.view(b, s_q),
        cache_seqlens=narrow[:b],
        block_table=narrow[b:].view(b, width),
        cache_write=CacheWrite.from_host(slots, num_slots, slot_mapping, wide[3 * n :] if rows else None),
    )


def to_device(
    wide: torch.Tensor,  # [m] int64, on the host
    narrow: torch.Tensor,  # [k] int32, on the host
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([m] int64, [k] int32) on device
    """One host -> device transfer for both: they travel as one int32 buffer (the int64 values as
    word pairs), staged in pinned memory and copied asynchronously on CUDA."""
    m = wide.numel()
    parts = (wide.view(torch.int32), narrow)
    if device.type == "cuda":
        staged = torch.empty(2 * m + narrow.numel(), dtype=torch.int32, pin_memory=True)
        torch.cat(parts, out=staged)
        # The caching host allocator keeps the pinned block until the copy is done.
        buf = staged.to(device, non_blocking=True)
    else:
        buf = torch.cat(parts).to(device)
    return buf[: 2 * m].view(torch.int64), buf[2 * m :]


@dataclass
class LaunchedStep:
    """A step on its way: the sequences that sample, in token order, and their tokens coming back."""

    seqs: tuple[ScheduledSeq, ...]  # [n]
    tokens: torch.Tensor  # [2, n] int64 on the host (pinned on CUDA): tokens, non-finite flags
    copied: Any = None  # torch.cuda.Event recorded after the device -> host copy (CUDA)
    owners: list[Any] = field(default_factory=list)  # [n] the caller's record of each sequence

    def results(self) -> tuple[list[int], list[int]]:
        """Waits for the step's tokens: ([n] token ids, [n] non-finite flags)."""
        if self.copied is not None:
            self.copied.synchronize()
        tokens, bad = self.tokens.tolist()
        return tokens, bad


class ModelRunner:
    def __init__(
        self,
        model: Any,
        num_heads: int,
        kv_cache: KVCache,
        group_prefills: bool = True,
        max_padding: float = 0.0,
        decode_graphs: DecodeGraphs | None = None,
    ) -> None:
        if max_padding < 0:
            raise ValueError(f"max_padding must be >= 0, got {max_padding!r}")
        self.model = model
        self.num_heads = num_heads  # query heads of the attention (h_q)
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self.group_prefills = group_prefills
        self.max_padding = max_padding
        self.decode_graphs = decode_graphs  # decode forwards on the persistent batch / CUDA graphs
        self.num_forwards = 0
        self._sampled_index: dict[int, int] = {}  # admission -> index of its token in the last step's samples
        self._last_seqs: list[ScheduledSeq] = []  # rows of the last compute_logits, in logits order
        self._last_greedy: torch.Tensor | None = None  # [2, n] from the decode graph, when it covers all rows

    def forward_groups(self, plan: BatchPlan) -> list[list[ScheduledSeq]]:
        """The sequences of each model forward of this plan."""
        groups: list[list[ScheduledSeq]] = []
        if plan.decodes:
            groups.append(list(plan.decodes))
        if self.group_prefills:
            groups.extend(pack_prefills(plan.prefills, self.max_padding))
        else:
            groups.extend([s] for s in plan.prefills)
        return groups

    @torch.inference_mode()
    def compute_logits(self, plan: BatchPlan) -> tuple[list[str], torch.Tensor]:
        """Runs the plan's forwards; returns the ids of the sequences that sample and their
        last-token logits [n, vocab] float32, in the same order."""
        seqs: list[ScheduledSeq] = []
        rows: list[torch.Tensor] = []
        self._last_greedy = None
        for planned in self.forward_groups(plan):
            group, last, greedy = self._forward(planned)  # the group in logits order, [b, vocab]
            keep = [i for i, s in enumerate(group) if s.sample]
            if len(keep) == len(group):
                rows.append(last)
            elif keep:
                rows.append(last.index_select(0, torch.tensor(keep, device=last.device)))
            seqs.extend(group[i] for i in keep)
            if greedy is not None and len(keep) == len(group) and not plan.prefills:
                self._last_greedy = greedy  # the only group: its greedy tokens cover every row
        self._last_seqs = seqs
        ids = [s.request_id for s in seqs]
        if not rows:
            return ids, torch.empty(0, 0, dtype=torch.float32, device=self.device)
        return ids, (rows[0] if len(rows) == 1 else torch.cat(rows)).float()

    def execute(
        self, plan: BatchPlan, sampler: Sampler, states: Mapping[str, SamplingState]
    ) -> dict[str, int]:
        """Runs the plan and samples the next token of every sequence that completes its tokens
        (waits for them: `launch` is the form that does not)."""
        step = self.launch(plan, sampler, states.__getitem__)
        tokens, _ = step.results()
        return {s.request_id: t for s, t in zip(step.seqs, tokens, strict=True)}

    @torch.inference_mode()
    def launch(
        self, plan: BatchPlan, sampler: Sampler, state_of: Callable[[str], SamplingState]
    ) -> LaunchedStep:
        """Runs the plan and samples on the device; returns at once (no host sync on CUDA)."""
        ids, logits = self.compute_logits(plan)
        seqs = tuple(self._last_seqs)
        if not seqs:
            return LaunchedStep((), torch.empty(2, 0, dtype=torch.int64))
        sampled = sampler.sample_async(logits, [state_of(i) for i in ids], self._last_greedy)  # [2, n]
        if self.decode_graphs is not None:  # the next decode step reads its pending tokens from here
            self.decode_graphs.batch.sampled[: len(seqs)].copy_(sampled[0])
            self._sampled_index = {s.admission: i for i, s in enumerate(seqs)}
        if self.device.type != "cuda":
            return LaunchedStep(seqs, sampled)
        host = torch.empty(sampled.shape, dtype=torch.int64, pin_memory=True)
        host.copy_(sampled, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return LaunchedStep(seqs, host, copied)

    def _forward(
        self, group: Sequence[ScheduledSeq]
    ) -> tuple[Sequence[ScheduledSeq], torch.Tensor, torch.Tensor | None]:
        """One forward: the group in logits order, last-token logits [b, vocab] float32, and
        [2, b] greedy tokens when the forward computed them (a replayed decode graph)."""
        self.num_forwards += 1
        if self.decode_graphs is not None and self.decode_graphs.supports(group):
            out = self.decode_graphs.forward(group, self._sampled_index)
            return out.seqs, out.logits, out.greedy
        if any(t == PENDING_TOKEN for s in group for t in s.token_ids):
            raise RuntimeError("a forward with pending tokens needs the runner's decode graphs")
        inputs = build_inputs(group, self.device, self.kv_cache.num_pages * PAGE_SIZE)
        s_q = inputs.input_ids.shape[1]
        tile_scheduler_metadata, num_splits = get_mla_metadata(
            inputs.cache_seqlens, s_q * self.num_heads // NUM_KV_HEADS, NUM_KV_HEADS
        )
        meta = AttentionMetadata(
            block_table=inputs.block_table,
            cache_seqlens=inputs.cache_seqlens,
            slot_mapping=inputs.slot_mapping,
            tile_scheduler_metadata=tile_scheduler_metadata,
            num_splits=num_splits,
            causal=True,
            cache_write=inputs.cache_write,
        )
        logits = self.model.forward(
            inputs.input_ids, inputs.positions, self.kv_cache.layers, meta, only_last=True
        )  # [b, 1, vocab]
        return group, logits[:, -1], None
