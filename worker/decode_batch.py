"""The persistent decode batch: rows of running sequences whose inputs live on the device.

A decode forward reads, per row, an input token, a position, the cache slot its latent goes to, the
cache length and a page table. Rebuilding all of that from Python lists every step costs time in
proportion to the page table's width (deepseek-v2-lite: 2,560 pages for its 163,840-token
context) and the batch; here the page tables stay on the device, one row per running sequence, and
each step changes only what changed:

- a sequence keeps its row while it decodes; rows are kept compact (the b decoding sequences hold
  rows 0..b-1), so a sequence whose row falls outside moves into a hole left by one that finished
  or was preempted: one device row copy, no page ids sent again;
- a sequence new to the batch (its prefill just ended, or it came back after a preemption) sends its
  page table once; a growing one sends the page it just got;
- the per-row vectors (token source, position, slot, length; a few ints a row) are sent whole for
  the rows of the step's bucket, in the same single host -> device transfer as the page patches.

The input token of a row is either known on the host (sent in that transfer) or the token the
previous step sampled for that sequence, still on the device (`sampled`, written by the model
runner after each step): the row's source index says which, so the engine can launch step N + 1
before it has seen step N's tokens.

Rows past b up to the bucket size are padding: token 0 at position 0, cache length 0 (their
attention reads nothing) and their latent goes to the cache's scratch page, in no page table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .config import PAGE_SIZE
from .model_runner import PAD_TOKEN_ID, to_device
from .scheduler import PENDING_TOKEN, ScheduledSeq


@dataclass
class BucketInputs:
    """Static device inputs of one bucket of B rows (views of two buffers a graph captures)."""

    size: int  # B
    wide: torch.Tensor  # [4B] int64: host ids | sources | positions | slots
    seqlens: torch.Tensor  # [B] int32: cache length of each row after this step (0: padding)

    @property
    def host_ids(self) -> torch.Tensor:  # [B] int64: input token of rows whose token the host knows
        return self.wide[: self.size]

    @property
    def sources(self) -> torch.Tensor:  # [B] int64: index into `sampled`, or -1: take host_ids
        return self.wide[self.size : 2 * self.size]

    @property
    def positions(self) -> torch.Tensor:  # [B] int64
        return self.wide[2 * self.size : 3 * self.size]

    @property
    def slots(self) -> torch.Tensor:  # [B] int64: cache slot of each row's new latent
        return self.wide[3 * self.size :]


@dataclass(frozen=True)
class DecodeRows:
    """One step's decode rows: seqs[r] holds row r; rows len(seqs).. of the bucket are padding."""

    seqs: tuple[ScheduledSeq, ...]
    inputs: BucketInputs


class DecodeBatch:
    """Rows 0..max_rows-1 of decoding sequences, page tables up to max_pages wide, on `device`."""

    def __init__(
        self,
        max_rows: int,
        max_pages: int,
        device: torch.device,
        *,
        num_slots: int,
        scratch_slot: int,
    ) -> None:
        if max_rows < 1 or max_pages < 1:
            raise ValueError(f"max_rows and max_pages must be >= 1, got {max_rows}, {max_pages}")
        self.max_rows = max_rows
        self.max_pages = max_pages
        self.device = device
        self._num_slots = num_slots  # slots a real sequence may write
        self._scratch_slot = scratch_slot
        self.block_table = torch.zeros(max_rows, max_pages, dtype=torch.int32, device=device)  # [R, W]
        self.sampled = torch.zeros(max_rows, dtype=torch.int64, device=device)  # [R] last step's tokens
        self._buckets: dict[int, BucketInputs] = {}
        self._row_of: dict[int, int] = {}  # admission -> row
        self._holder: list[int | None] = [None] * max_rows  # row -> admission
        self._sent: list[int] = [0] * max_rows  # row -> leading pages of its page table on the device
        self._last_page: list[int] = [-1] * max_rows  # row -> the last page sent (a cheap identity check)
        self.pages_sent = 0  # page ids sent so far (the tests check that steady decoding sends few)

    def bucket(self, size: int) -> BucketInputs:
        """The static inputs of a bucket of `size` rows (made on first use)."""
        inputs = self._buckets.get(size)
        if inputs is None:
            if not 1 <= size <= self.max_rows:
                raise ValueError(f"bucket size {size} outside [1, {self.max_rows}]")
            wide = torch.zeros(4 * size, dtype=torch.int64, device=self.device)
            inputs = BucketInputs(size, wide, torch.zeros(size, dtype=torch.int32, device=self.device))
            inputs.slots.fill_(self._scratch_slot)  # all padding: what a graph capture runs on
            inputs.sources.fill_(-1)
            self._buckets[size] = inputs
        return inputs

    def input_ids(self, inputs: BucketInputs) -> torch.Tensor:  # [B] int64
        """Each row's input token: the previous step's sampled token or the host's (graph-capturable)."""
        src = inputs.sources
        from_device = self.sampled.index_select(0, src.clamp(min=0))
        return torch.where(src >= 0, from_device, inputs.host_ids)

    # ---- one step -----------------------------------------------------------------------------
    def prepare(
        self,
        decodes: Sequence[ScheduledSeq],
        bucket_size: int,
        sampled_index: Mapping[int, int],  # admission -> index in `sampled` of its pending token
    ) -> DecodeRows:
        """Assigns rows, sends what changed and fills the bucket's inputs (one host -> device copy)."""
        b = len(decodes)
        if not 0 < b <= bucket_size:
            raise ValueError(f"{b} decodes do not fit a bucket of {bucket_size} rows")
        for s in decodes:
            if s.num_new != 1:
                raise ValueError(f"request {s.request_id!r}: a decode row takes one token, got {s.num_new}")
            if len(s.page_table) > self.max_pages:
                raise ValueError(
                    f"request {s.request_id!r}: {len(s.page_table)} pages exceed the batch's {self.max_pages}"
                )
        rows, moves = self._assign_rows(decodes)
        by_row: list[ScheduledSeq | None] = [None] * b
        for s, r in zip(decodes, rows, strict=True):
            by_row[r] = s
        seqs = tuple(s for s in by_row if s is not None)
        assert len(seqs) == b

        width = self.max_pages
        host_ids: list[int] = []
        sources: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seqlens: list[int] = []
        patch_at: list[int] = []
        patch_page: list[int] = []
        for r, s in enumerate(seqs):
            token = s.token_ids[0]
            if token == PENDING_TOKEN:
                index = sampled_index.get(s.admission)
                if index is None:
                    raise RuntimeError(f"request {s.request_id!r}: its pending token is not on the device")
                host_ids.append(PAD_TOKEN_ID)
                sources.append(index)
            else:
                host_ids.append(token)
                sources.append(-1)
            pos = s.start
            pages = s.page_table
            slot = pages[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE
            if not 0 <= slot < self._num_slots:
                raise ValueError(
                    f"slot {slot} of request {s.request_id!r} is outside the cache ({self._num_slots} slots)"
                )
            positions.append(pos)
            slots.append(slot)
            seqlens.append(pos + 1)
            sent = self._sent[r]
            if sent and pages[sent - 1] != self._last_page[r]:
                raise RuntimeError(f"request {s.request_id!r}: its page table changed under its row")
            if len(pages) > sent:
                patch_at.extend(range(r * width + sent, r * width + len(pages)))
                patch_page.extend(pages[sent:])
                self._sent[r] = len(pages)
                self._last_page[r] = pages[-1]
        pad = bucket_size - b
        host_ids += [PAD_TOKEN_ID] * pad
        sources += [-1] * pad
        positions += [0] * pad
        slots += [self._scratch_slot] * pad
        seqlens += [0] * pad
        self.pages_sent += len(patch_page)

        move_src = [src for src, _ in moves]
        move_dst = [dst for _, dst in moves]
        wide, narrow = to_device(
            torch.tensor(
                host_ids + sources + positions + slots + move_src + move_dst + patch_at, dtype=torch.int64
            ),
            torch.tensor(seqlens + patch_page, dtype=torch.int32),
            self.device,
        )
        n = 4 * bucket_size
        inputs = self.bucket(bucket_size)
        inputs.wide.copy_(wide[:n], non_blocking=True)
        inputs.seqlens.copy_(narrow[:bucket_size], non_blocking=True)
        if moves:  # sources are rows >= b, destinations rows < b: no row is both
            m = len(moves)
            src_rows, dst_rows = wide[n : n + m], wide[n + m : n + 2 * m]
            self.block_table.index_copy_(0, dst_rows, self.block_table.index_select(0, src_rows))
        if patch_at:
            at = wide[n + 2 * len(moves) :]
            self.block_table.view(-1).index_copy_(0, at, narrow[bucket_size:])
        return DecodeRows(seqs, inputs)

    def _assign_rows(self, decodes: Sequence[ScheduledSeq]) -> tuple[list[int], list[tuple[int, int]]]:
        """Rows 0..b-1 for this step's decodes: kept where they are, moved into holes from rows >= b,
        or new. Sequences not decoding this step give their rows up. Returns each decode's row and
        the (from, to) row moves whose page tables the device copies."""
        b = len(decodes)
        wanted = {s.admission for s in decodes}
        if len(wanted) != b:
            raise ValueError("a sequence appears twice among the decodes")
        for admission, held in list(self._row_of.items()):
            if admission not in wanted:
                self._release(held)
        holes = [r for r in range(b) if self._holder[r] is None]
        holes.reverse()  # pop() from the front
        rows: list[int] = []
        moves: list[tuple[int, int]] = []
        for s in decodes:
            r: int | None = self._row_of.get(s.admission)
            if r is not None and r >= b:  # move into a hole
                dst = holes.pop()
                moves.append((r, dst))
                self._holder[dst], self._sent[dst], self._last_page[dst] = (
                    s.admission,
                    self._sent[r],
                    self._last_page[r],
                )
                self._release(r)
                self._row_of[s.admission] = dst
                r = dst
            rows.append(-1 if r is None else r)
        for i, s in enumerate(decodes):
            if rows[i] < 0:  # new to the batch: its page table is sent whole
                r = holes.pop()
                self._holder[r], self._sent[r], self._last_page[r] = s.admission, 0, -1
                self._row_of[s.admission] = r
                rows[i] = r
        return rows, moves

    def _release(self, row: int) -> None:
        admission = self._holder[row]
        if admission is not None and self._row_of.get(admission) == row:
            del self._row_of[admission]
        self._holder[row], self._sent[row], self._last_page[row] = None, 0, -1

    def check_integrity(self) -> None:
        """Raises AssertionError when the host's row bookkeeping is inconsistent."""
        for admission, r in self._row_of.items():
            assert self._holder[r] == admission, f"row {r} is held by {self._holder[r]}, not {admission}"
        held = [r for r, a in enumerate(self._holder) if a is not None]
        assert len(held) == len(self._row_of), "a row is held by no sequence"
