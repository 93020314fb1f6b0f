"""Continuous batching: which sequences compute which tokens in the next engine step.

Pure Python (no torch). Each `schedule()`:

1. walks the running sequences in arrival order and gives each its next tokens (one for a
   decode, the next chunk for a prompt still being prefilled), growing its page table by the
   pages those tokens need. When the cache runs out, the latest-arrived running sequence is
   preempted by recompute: its pages are freed and it goes back to the front of the waiting
   queue with all its tokens so far (prompt + generated), to be prefilled again later. No request
   is ever lost: the oldest running sequence can always proceed, because add-time validation
   guarantees that one request alone fits the whole cache.
2. if nothing was preempted, admits waiting sequences (FIFO) while the token budget, the running
   limit and the free pages allow; new prefills join the running decodes in the same step.
   Admission reuses prefix-cached full pages of the prompt, computing only the rest (always at
   least the last prompt token, whose logits give the first output token).

`commit()` records that a planned step was launched: its tokens count as computed (the device
computes them in stream order) and each sampling sequence has one more token *pending* — sampled on
the device, its id not yet seen by the host. `record_token()` delivers that id later (one step
later when the engine overlaps steps), and publishes newly full pages to the prefix cache.
`update()` is both at once, for callers that wait for every step. While a token is pending the
sequence is scheduled on as usual: its next decode reads the pending token on the device
(`PENDING_TOKEN` in the plan); a sequence whose pending tokens reach max_tokens is not scheduled
again, and a preempted one is not re-admitted before its pending token has arrived. The engine
calls `finish()` when a sequence stops.
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .config import SchedulerConfig
from .errors import QueueFullError, RequestError
from .page_allocator import PageAllocator, extend_page_hashes

PENDING_TOKEN = -1  # a ScheduledSeq token that was sampled on the device and is not known to the host yet


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class SequenceState:
    """The scheduler's record of one request."""

    request_id: str
    arrival: int  # admission priority: smaller arrived earlier
    prompt_len: int
    max_len: int  # prompt_len + max_tokens (capped by the context): pages it may come to need
    token_ids: list[int]  # prompt + generated so far
    page_table: list[int] = field(default_factory=list)  # logical page -> physical page
    num_computed: int = 0  # tokens whose latents are in the cache
    num_registered: int = 0  # leading full pages published to the prefix cache
    page_hashes: list[int] = field(default_factory=list)  # chained hashes of full pages of token_ids
    cached_prompt_tokens: int | None = None  # prefix-cache hit of the first admission (usage)
    num_preemptions: int = 0
    num_pending: int = 0  # tokens sampled on the device whose ids have not reached token_ids yet
    admission: int = -1  # unique per admission (a new one after every preemption)
    status: SeqStatus = SeqStatus.WAITING

    @property
    def num_known(self) -> int:
        """Tokens of the sequence, pending ones included."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def done_generating(self) -> bool:
        """Its pending tokens already reach max_tokens: nothing more to compute."""
        return self.num_known >= self.max_len


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step: compute `token_ids` at positions start.. of its cache."""

    request_id: str
    token_ids: tuple[int, ...]  # [num_new] tokens this step writes latents of (PENDING_TOKEN: on device)
    start: int  # tokens already in the cache before this step (position of token_ids[0])
    page_table: tuple[int, ...]  # physical pages covering start + num_new tokens
    sample: bool  # these tokens end the sequence's known tokens: sample its next token
    admission: int = -1  # the sequence's admission number: same value = same rows in the cache

    @property
    def num_new(self) -> int:
        return len(self.token_ids)

    @property
    def seqlen(self) -> int:
        """Cache length after this step (this step's tokens included)."""
        return self.start + len(self.token_ids)


@dataclass(frozen=True)
class BatchPlan:
    """What the model runner computes in one step (typed message scheduler -> runner)."""

    decodes: tuple[ScheduledSeq, ...]  # one new token each: batched together with s_q = 1
    prefills: tuple[ScheduledSeq, ...]  # several new tokens each (a prompt or a chunk of it)
    preempted: tuple[str, ...] = ()  # request ids sent back to the waiting queue this step

    @property
    def seqs(self) -> tuple[ScheduledSeq, ...]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.seqs)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    """Continuous batching over one PageAllocator. Single-threaded, like the engine."""

    def __init__(self, config: SchedulerConfig, allocator: PageAllocator) -> None:
        self.config = config
        self.allocator = allocator
        self.page_size = allocator.page_size
        self._seqs: dict[str, SequenceState] = {}
        self._waiting: deque[SequenceState] = deque()
        self._running: list[SequenceState] = []  # sorted by arrival
        self._arrivals = itertools.count()
        self._admissions = itertools.count()
        self.num_preemptions = 0  # sequences preempted by recompute, over the scheduler's life
        self.num_prefix_hit_tokens = 0  # tokens served from the prefix cache at admission

    # ----------------------------------------------------------------------------- requests
    def add(self, request_id: str, token_ids: Sequence[int], max_tokens: int) -> SequenceState:
        if request_id in self._seqs:
            raise RequestError("request_id", f"{request_id!r} is already in use")
        if not token_ids:
            raise RequestError("prompt", "the prompt must hold at least one token")
        max_len = len(token_ids) + max_tokens
        if pages_for(max_len, self.page_size) > self.allocator.num_pages:
            raise RequestError(
                "max_tokens",
                f"prompt ({len(token_ids)} tokens) + max_tokens ({max_tokens}) needs "
                f"{pages_for(max_len, self.page_size)} pages, more than the whole cache ({self.allocator.num_pages})",
            )
        if self.config.max_waiting is not None and len(self._waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting} requests)")
        seq = SequenceState(
            request_id=request_id,
            arrival=next(self._arrivals),
            prompt_len=len(token_ids),
            max_len=max_len,
            token_ids=list(token_ids),
        )
        self._seqs[request_id] = seq
        self._waiting.append(seq)
        return seq

    def get(self, request_id: str) -> SequenceState | None:
        return self._seqs.get(request_id)

    def abort(self, request_id: str) -> bool:
        """Drops a request wherever it is and frees its pages. False if unknown."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        self.finish(request_id)
        return True

    def finish(self, request_id: str) -> SequenceState:
        """Removes a finished request and frees its pages."""
        seq = self._seqs.pop(request_id)
        if seq.status is SeqStatus.RUNNING:
            self._running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self._waiting.remove(seq)
        self._free_pages(seq)
        seq.status = SeqStatus.FINISHED
        return seq

    # ---------------------------------------------------------------------------- queries
    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def queued_prompt_tokens(self) -> int:
        """Tokens the waiting requests still have to prefill (recomputed ones included)."""
        return sum(s.num_known for s in self._waiting)

    @property
    def reserved_pages(self) -> int:
        """Pages the running requests may still claim before they reach max_tokens."""
        return sum(max(0, pages_for(s.max_len, self.page_size) - len(s.page_table)) for s in self._running)

    @property
    def num_pending(self) -> int:
        """Tokens sampled on the device that the host has not recorded yet."""
        return sum(s.num_pending for s in self._seqs.values())

    def running_ids(self) -> list[str]:
        return [s.request_id for s in self._running]

    def waiting_ids(self) -> list[str]:
        return [s.request_id for s in self._waiting]

    # -------------------------------------------------------------------------- scheduling
    def schedule(self) -> BatchPlan:
        budget = self.config.max_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[str] = []

        i = 0
        while i < len(self._running) and budget > 0:
            seq = self._running[i]
            if seq.done_generating:  # finishes when its pending tokens arrive
                i += 1
                continue
            num_new = min(seq.num_known - seq.num_computed, budget)
            needed = pages_for(seq.num_computed + num_new, self.page_size) - len(seq.page_table)
            while needed > self.allocator.num_free:
                victim = self._running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break  # it was the last running sequence and gave its own pages back
            if needed > 0:
                seq.page_table.extend(self.allocator.allocate(needed))
            scheduled.append(self._scheduled(seq, num_new))
            budget -= num_new
            i += 1

        if not preempted:
            budget = self._admit(budget, scheduled)

        decodes = tuple(s for s in scheduled if s.num_new == 1)
        prefills = tuple(s for s in scheduled if s.num_new > 1)
        return BatchPlan(decodes=decodes, prefills=prefills, preempted=tuple(preempted))

    def _admit(self, budget: int, scheduled: list[ScheduledSeq]) -> int:
        ps = self.page_size
        while self._waiting and budget > 0 and len(self._running) < self.config.max_running_seqs:
            seq = self._waiting[0]
            if seq.num_pending:
                break  # preempted with a token in flight: admitted once it has arrived (FIFO)
            n = len(seq.token_ids)
            extend_page_hashes(seq.page_hashes, seq.token_ids, ps)
            # At least the last token is computed: its logits give the next token.
            matched = self.allocator.match_prefix(seq.page_hashes[: (n - 1) // ps])
            num_cached = len(matched) * ps
            num_new = min(n - num_cached, budget)
            # Pages for the whole prompt are taken at admission, not chunk by chunk: a long prompt
            # admitted on its first chunk's pages alone would be preempted by its own next chunk.
            new_pages = pages_for(n, ps) - len(matched)
            revived = sum(1 for p in matched if self.allocator.is_free(p))  # cached-free pages it takes back
            # The watermark keeps room for running decodes; with none running it would only
            # stall a request that needs the whole cache.
            watermark = self.config.watermark_pages if self._running else 0
            if self.allocator.num_free - revived - new_pages < watermark:
                break  # FIFO: the head waits for pages; later requests do not overtake it
            self.allocator.acquire(matched)
            seq.page_table = matched + self.allocator.allocate(new_pages)
            seq.num_computed = num_cached
            seq.num_registered = len(matched)
            if seq.cached_prompt_tokens is None:
                seq.cached_prompt_tokens = min(num_cached, seq.prompt_len)
            self.num_prefix_hit_tokens += num_cached
            self._waiting.popleft()
            seq.status = SeqStatus.RUNNING
            seq.admission = next(self._admissions)
            bisect.insort(self._running, seq, key=lambda s: s.arrival)
            scheduled.append(self._scheduled(seq, num_new))
            budget -= num_new
        return budget

    def _scheduled(self, seq: SequenceState, num_new: int) -> ScheduledSeq:
        end = seq.num_computed + num_new
        tokens = seq.token_ids[seq.num_computed : end]
        if len(tokens) < num_new:  # the rest is pending on the device
            tokens = tokens + [PENDING_TOKEN] * (num_new - len(tokens))
        return ScheduledSeq(
            request_id=seq.request_id,
            token_ids=tuple(tokens),
            start=seq.num_computed,
            page_table=tuple(seq.page_table),
            sample=end == seq.num_known,
            admission=seq.admission,
        )

    def _preempt(self, seq: SequenceState) -> None:
        self._running.remove(seq)
        self._free_pages(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._waiting.appendleft(seq)

    def _free_pages(self, seq: SequenceState) -> None:
        # Reversed: the tail pages become the least recently used ones and are evicted first.
        self.allocator.free(reversed(seq.page_table))
        seq.page_table = []
        seq.num_computed = 0
        seq.num_registered = 0

    # ------------------------------------------------------------------------------ update
    def commit(self, plan: BatchPlan) -> None:
        """Records a launched step: its tokens count as computed, and every sequence that samples
        has one more pending token (its id comes with record_token)."""
        for s in plan.seqs:
            seq = self._seqs[s.request_id]
            if seq.num_computed != s.start or seq.admission != s.admission:
                raise RuntimeError(f"request {s.request_id!r} changed between schedule() and commit()")
            seq.num_computed = s.seqlen
            if s.sample:
                seq.num_pending += 1
            self._register_full_pages(seq)

    def record_token(self, request_id: str, token: int) -> None:
        """The id of a request's oldest pending token (a running or preempted request)."""
        seq = self._seqs[request_id]
        if seq.num_pending < 1:
            raise RuntimeError(f"request {request_id!r} has no pending token")
        seq.num_pending -= 1
        seq.token_ids.append(int(token))
        if seq.status is SeqStatus.RUNNING:
            self._register_full_pages(seq)

    def update(self, plan: BatchPlan, sampled: Mapping[str, int]) -> None:
        """commit() and record_token() at once: the step is done and its tokens are known."""
        self.commit(plan)
        for s in plan.seqs:
            if s.sample:
                self.record_token(s.request_id, sampled[s.request_id])

    def _register_full_pages(self, seq: SequenceState) -> None:
        # Only pages whose tokens are all known: a pending token's page is hashed once it arrives.
        num_full = min(seq.num_computed, len(seq.token_ids)) // self.page_size
        if num_full <= seq.num_registered:
            return
        extend_page_hashes(seq.page_hashes, seq.token_ids[: num_full * self.page_size], self.page_size)
        for idx in range(seq.num_registered, num_full):
            self.allocator.register(seq.page_table[idx], seq.page_hashes[idx])
        seq.num_registered = num_full

    # --------------------------------------------------------------------------- integrity
    def check_integrity(self) -> None:
        """Raises AssertionError when the scheduler's or the allocator's bookkeeping is inconsistent."""
        self.allocator.check_integrity()
        ps = self.page_size
        running_ids = [s.request_id for s in self._running]
        waiting_ids = [s.request_id for s in self._waiting]
        assert len(set(running_ids)) == len(running_ids), "a request is twice in the running list"
        assert len(set(waiting_ids)) == len(waiting_ids), "a request is twice in the waiting queue"
        assert not set(running_ids) & set(waiting_ids), "a request is both running and waiting"
        assert set(running_ids) | set(waiting_ids) == set(self._seqs), "a request is lost or unknown"
        arrivals = [s.arrival for s in self._running]
        assert arrivals == sorted(arrivals), "the running list is not in arrival order"
        assert len(self._running) <= self.config.max_running_seqs, "too many running requests"
        refs: dict[int, int] = {}
        for seq in self._seqs.values():
            assert seq.prompt_len <= seq.num_known <= seq.max_len, f"{seq.request_id}: bad length"
            assert seq.num_pending >= 0, f"{seq.request_id}: negative pending tokens"
            if seq.status is SeqStatus.WAITING:
                assert not seq.page_table and seq.num_computed == 0, f"waiting {seq.request_id} holds pages"
                continue
            assert seq.status is SeqStatus.RUNNING, f"{seq.request_id} has status {seq.status}"
            assert seq.num_computed < seq.num_known or seq.done_generating, (
                f"{seq.request_id} has no token left to compute"
            )
            assert len(seq.page_table) >= pages_for(seq.num_computed, ps), f"{seq.request_id} lacks pages"
            assert len(seq.page_table) <= pages_for(seq.num_known, ps), f"{seq.request_id} holds extra pages"
            assert len(set(seq.page_table)) == len(seq.page_table), f"{seq.request_id} maps a page twice"
            for page in seq.page_table:
                refs[page] = refs.get(page, 0) + 1
        for page in range(self.allocator.num_pages):
            assert self.allocator.ref_count(page) == refs.get(page, 0), (
                f"page {page}: {self.allocator.ref_count(page)} references, {refs.get(page, 0)} holders"
            )
