"""DecodeBatch: persistent decode rows on the device, changed by diffs, against a from-scratch oracle.

Random steps in which sequences join, grow a page, leave (finished / preempted) and come back under a
new admission: after every prepare() the device block table's first b rows must be exactly the
rows' page tables, the bucket inputs exactly each row's token source, position, slot and length,
and padding rows must attend to nothing and write only the scratch slot. Steady decoding must send
only new page ids.
"""

from __future__ import annotations

import random

import pytest
import torch

from mlaserve.worker.config import PAGE_SIZE
from mlaserve.worker.decode_batch import DecodeBatch
from mlaserve.worker.scheduler import PENDING_TOKEN, ScheduledSeq

NUM_PAGES = 64
SCRATCH = NUM_PAGES * PAGE_SIZE


def make_batch(rows: int = 8, width: int = 6) -> DecodeBatch:
    return DecodeBatch(
        rows, width, torch.device("cpu"), num_slots=NUM_PAGES * PAGE_SIZE, scratch_slot=SCRATCH
    )


class Seq:
    def __init__(self, rid: str, admission: int, pages: list[int], length: int) -> None:
        self.rid, self.admission, self.pages, self.length = rid, admission, pages, length

    def scheduled(self, token: int) -> ScheduledSeq:
        return ScheduledSeq(
            self.rid, (token,), self.length, tuple(self.pages), True, admission=self.admission
        )


def test_rows_follow_joins_growth_and_departures(seed: int) -> None:
    rng = random.Random(seed)
    batch = make_batch()
    free = list(range(NUM_PAGES))
    rng.shuffle(free)
    live: list[Seq] = []
    admissions = iter(range(10_000))
    sampled_index: dict[int, int] = {}
    for step in range(120):
        # departures and comebacks (a comeback is a new admission: its row is new)
        for s in list(live):
            if rng.random() < 0.12:
                live.remove(s)
                free.extend(s.pages)
                if rng.random() < 0.5 and len(free) >= len(s.pages):
                    back = Seq(s.rid, next(admissions), [free.pop() for _ in s.pages], s.length)
                    live.append(back)
        while len(live) < batch.max_rows and rng.random() < 0.5 and len(free) >= 2:
            n = rng.randint(1, 2 * PAGE_SIZE)
            live.append(
                Seq(
                    f"q{step}-{len(live)}",
                    next(admissions),
                    [free.pop() for _ in range(n // PAGE_SIZE + 1)],
                    n,
                )
            )
        if not live:
            continue
        decodes = rng.sample(live, rng.randint(1, len(live)))  # some running sequences sit this step out
        scheduled = []
        for s in decodes:
            if s.length % PAGE_SIZE == 0 and s.length // PAGE_SIZE >= len(s.pages):
                if len(s.pages) == batch.max_pages or not free:
                    live.remove(s)
                    free.extend(s.pages)
                    continue
                s.pages.append(free.pop())  # grows into a new page
            pending = s.admission in sampled_index and rng.random() < 0.7
            scheduled.append(s.scheduled(PENDING_TOKEN if pending else rng.randrange(1000)))
        if not scheduled:
            continue
        bucket = rng.choice([b for b in (1, 2, 4, 8) if b >= len(scheduled)])
        rows = batch.prepare(scheduled, bucket, sampled_index)
        batch.check_integrity()
        b = len(scheduled)
        assert sorted(r.request_id for r in rows.seqs) == sorted(s.request_id for s in scheduled)
        table = batch.block_table
        inp = rows.inputs
        for r, s in enumerate(rows.seqs):
            assert table[r, : len(s.page_table)].tolist() == list(s.page_table), f"step {step} row {r}"
            pos = s.start
            assert inp.positions[r] == pos and inp.seqlens[r] == pos + 1
            assert inp.slots[r] == s.page_table[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE
            if s.token_ids[0] == PENDING_TOKEN:
                assert inp.sources[r] == sampled_index[s.admission]
            else:
                assert inp.sources[r] == -1 and inp.host_ids[r] == s.token_ids[0]
        assert (
            (inp.seqlens[b:] == 0).all()
            and (inp.slots[b:] == SCRATCH).all()
            and (inp.sources[b:] == -1).all()
        )
        # the step "samples": its tokens go to `sampled` in row order, indexed for the next step
        tokens = torch.tensor([rng.randrange(1000) for _ in range(b)])
        ids = batch.input_ids(inp)[:b]
        for r, s in enumerate(rows.seqs):
            expected = (
                batch.sampled[sampled_index[s.admission]]
                if s.token_ids[0] == PENDING_TOKEN
                else s.token_ids[0]
            )
            assert ids[r] == expected
        batch.sampled[:b] = tokens
        sampled_index = {s.admission: r for r, s in enumerate(rows.seqs)}
        for s in decodes:
            s.length += 1


def test_steady_decoding_sends_only_new_pages() -> None:
    batch = make_batch(rows=4, width=8)
    seqs = [Seq(f"r{i}", i, [i * 4], PAGE_SIZE - 2) for i in range(4)]
    batch.prepare([s.scheduled(1) for s in seqs], 4, {})
    assert batch.pages_sent == 4
    for _ in range(10):
        for s in seqs:
            s.length += 1
            if s.length // PAGE_SIZE >= len(s.pages):
                s.pages.append(s.pages[-1] + 1)
        batch.prepare([s.scheduled(1) for s in seqs], 4, {})
    assert batch.pages_sent == 8  # one new page each, nothing re-sent
    # one leaves: the last row moves into its hole without sending its pages again
    rows = batch.prepare([s.scheduled(1) for s in seqs[1:]], 4, {})
    assert batch.pages_sent == 8
    assert [s.request_id for s in rows.seqs] == ["r3", "r1", "r2"]  # r3 took r0's row 0
    assert batch.block_table[0, :2].tolist() == seqs[3].pages


def test_errors_name_the_request() -> None:
    batch = make_batch()
    with pytest.raises(RuntimeError, match="pending token"):
        batch.prepare([Seq("a", 0, [1], 5).scheduled(PENDING_TOKEN)], 1, {})
    with pytest.raises(ValueError, match="outside the cache"):
        batch.prepare([Seq("b", 1, [NUM_PAGES + 3], 5).scheduled(7)], 1, {})
    with pytest.raises(ValueError, match="fit a bucket"):
        batch.prepare([Seq(f"c{i}", 10 + i, [i], 5).scheduled(7) for i in range(3)], 2, {})
    s = Seq("d", 20, [4], 5)
    batch.prepare([s.scheduled(7)], 1, {})
    s.pages = [9]  # a page table that changed under its row (same admission)
    with pytest.raises(RuntimeError, match="changed under its row"):
        batch.prepare([s.scheduled(7)], 1, {})
