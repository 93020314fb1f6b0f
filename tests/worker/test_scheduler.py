"""Scheduler: continuous batching, preemption by recompute and prefix caching, against a simulated cache.

The simulated "model" reads each sequence's earlier tokens back from a simulated cache through the
page table the scheduler hands out (positions < start), writes the new tokens at their slots, and
samples a token that is a fixed function of the whole sequence. If the scheduler ever handed out
a wrong page table, reused a page still in use, or lost tokens on preemption, the sampled tokens
would differ from the same function evaluated on the true sequence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from mlaserve.worker.config import SchedulerConfig
from mlaserve.worker.errors import QueueFullError, RequestError
from mlaserve.worker.page_allocator import PageAllocator, prefix_page_hashes
from mlaserve.worker.scheduler import PENDING_TOKEN, BatchPlan, Scheduler, pages_for

VOCAB = 1000


def next_token(tokens: list[int]) -> int:
    """The oracle "model": a deterministic function of the whole sequence."""
    h = 17
    for t in tokens:
        h = (h * 1_000_003 + t) % 2_147_483_647
    return h % VOCAB


@dataclass
class SimRequest:
    prompt: list[int]
    max_tokens: int
    output: list[int]


class Simulator:
    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.ps = sched.page_size
        self.cache: dict[int, int] = {}  # slot -> token id
        self.requests: dict[str, SimRequest] = {}
        self.finished: dict[str, list[int]] = {}
        self.max_tokens_in_step = 0

    def add(self, request_id: str, prompt: list[int], max_tokens: int) -> None:
        self.sched.add(request_id, prompt, max_tokens)
        self.requests[request_id] = SimRequest(prompt, max_tokens, [])

    def step(self) -> BatchPlan:
        plan = self.sched.schedule()
        cfg = self.sched.config
        assert plan.num_tokens <= cfg.max_batched_tokens
        assert self.sched.num_running <= cfg.max_running_seqs
        assert len({s.request_id for s in plan.seqs}) == len(plan.seqs), "a request is scheduled twice"
        assert not {s.request_id for s in plan.seqs} & set(plan.preempted)
        assert all(s.num_new == 1 for s in plan.decodes) and all(s.num_new > 1 for s in plan.prefills)
        sampled = {}
        for s in plan.seqs:
            assert len(s.page_table) >= pages_for(s.seqlen, self.ps)
            seen = [
                self.cache.get(s.page_table[p // self.ps] * self.ps + p % self.ps) for p in range(s.start)
            ]
            tokens = seen + list(s.token_ids)
            req = self.requests[s.request_id]
            assert tokens == (req.prompt + req.output)[: s.seqlen], f"{s.request_id} sees a corrupted cache"
            for i, t in enumerate(s.token_ids):
                p = s.start + i
                page = s.page_table[p // self.ps]
                assert self.sched.allocator.ref_count(page) == 1, "a step writes into a shared page"
                self.cache[page * self.ps + p % self.ps] = t
            if s.sample:
                sampled[s.request_id] = next_token(tokens)
        self.sched.update(plan, sampled)
        for request_id, token in sampled.items():
            req = self.requests[request_id]
            req.output.append(token)
            if len(req.output) == req.max_tokens:
                self.sched.finish(request_id)
                self.finished[request_id] = req.output
                del self.requests[request_id]
        self.sched.check_integrity()
        return plan

    def abort(self, request_id: str) -> None:
        assert self.sched.abort(request_id)
        del self.requests[request_id]
        self.sched.check_integrity()


def expected_output(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


@pytest.mark.parametrize(
    ("num_pages", "max_running", "max_tokens_per_step", "watermark"),
    [(10, 8, 64, 0), (24, 4, 24, 1), (60, 32, 512, 2)],
)
def test_random_workload_matches_oracle(
    seed: int, num_pages, max_running, max_tokens_per_step, watermark
) -> None:
    rng = random.Random(seed)
    ps = 4
    sched = Scheduler(
        SchedulerConfig(
            max_running_seqs=max_running, max_batched_tokens=max_tokens_per_step, watermark_pages=watermark
        ),
        PageAllocator(num_pages, page_size=ps),
    )
    sim = Simulator(sched)
    shared = [[rng.randrange(VOCAB) for _ in range(rng.randrange(4, 14))] for _ in range(3)]
    specs: dict[str, tuple[list[int], int]] = {}
    aborted: set[str] = set()
    n = 0
    for _ in range(400):
        if n < 40 and rng.random() < 0.5:
            for _ in range(rng.randrange(1, 4)):
                head = list(rng.choice(shared)) if rng.random() < 0.6 else []
                prompt = head + [rng.randrange(VOCAB) for _ in range(rng.randrange(0 if head else 1, 10))]
                max_tokens = rng.randrange(1, 12)
                if pages_for(len(prompt) + max_tokens, ps) > num_pages:
                    continue
                specs[f"r{n}"] = (prompt, max_tokens)
                sim.add(f"r{n}", prompt, max_tokens)
                n += 1
        if sim.requests and rng.random() < 0.03:
            victim = rng.choice(sorted(sim.requests))
            sim.abort(victim)
            aborted.add(victim)
        sim.step()
        if n >= 40 and not sim.requests:
            break
    while sched.has_unfinished():
        sim.step()
    assert set(sim.finished) | aborted == set(specs)
    for request_id, out in sim.finished.items():
        assert out == expected_output(*specs[request_id]), request_id
    assert sched.allocator.num_used == 0
    if num_pages == 10:
        assert sched.num_preemptions > 0, "the small cache should have forced preemptions"
    assert sched.num_prefix_hit_tokens > 0


def test_preempts_latest_arrival_and_requeues_it_first() -> None:
    ps = 4
    sched = Scheduler(SchedulerConfig(), PageAllocator(4, page_size=ps))
    sim = Simulator(sched)
    sim.add("a", [1, 2, 3], 8)  # grows to 11 tokens = 3 pages
    sim.add("b", [4, 5, 6], 8)
    sim.step()  # both prefilled: 1 page each, 4 tokens each after sampling
    preempted = []
    while "b" not in preempted:
        preempted += sim.step().preempted
    assert preempted == ["b"] and sched.waiting_ids()[0] == "b"
    assert sched.get("b").num_preemptions == 1 and sched.get("b").page_table == []
    while sched.has_unfinished():
        sim.step()
    assert sim.finished["a"] == expected_output([1, 2, 3], 8)
    assert sim.finished["b"] == expected_output([4, 5, 6], 8)


def test_prefix_hit_computes_only_the_rest_and_at_least_one_token() -> None:
    ps = 4
    sched = Scheduler(SchedulerConfig(), PageAllocator(16, page_size=ps))
    sim = Simulator(sched)
    prompt = list(range(10, 22))  # 12 tokens = 3 full pages
    sim.add("first", prompt, 1)
    sim.step()
    assert sim.finished["first"] == expected_output(prompt, 1)
    assert sched.allocator.num_cached == 3
    # Same prompt: every page is cached, but the last token must be computed for its logits.
    sim.add("same", prompt, 2)
    plan = sim.step()
    (s,) = plan.seqs
    assert s.start == 8 and s.token_ids == tuple(prompt[8:])
    assert sched.get("same").cached_prompt_tokens == 8
    # A longer prompt with the same start reuses all three pages.
    sim.add("longer", prompt + [7, 7], 1)
    plan = sim.step()
    longer = next(s for s in plan.seqs if s.request_id == "longer")
    assert longer.start == 12 and longer.token_ids == (7, 7)
    assert longer.page_table[:3] == tuple(sched.allocator.match_prefix(prefix_page_hashes(prompt, ps)))
    while sched.has_unfinished():
        sim.step()
    assert sim.finished["same"] == expected_output(prompt, 2)
    assert sim.finished["longer"] == expected_output(prompt + [7, 7], 1)


def test_chunked_prefill_respects_the_token_budget() -> None:
    sched = Scheduler(SchedulerConfig(max_batched_tokens=5), PageAllocator(16, page_size=4))
    sim = Simulator(sched)
    prompt = list(range(1, 14))  # 13 tokens: chunks of 5, 5, 3
    sim.add("long", prompt, 3)
    sizes = []
    while sched.has_unfinished():
        plan = sim.step()
        sizes.append([s.num_new for s in plan.seqs])
    assert sizes == [[5], [5], [3], [1], [1]]
    assert sim.finished["long"] == expected_output(prompt, 3)


def test_add_validation() -> None:
    sched = Scheduler(SchedulerConfig(max_waiting=1), PageAllocator(2, page_size=4))
    with pytest.raises(RequestError) as e:
        sched.add("x", [1] * 5, 4)  # 9 tokens = 3 pages > 2
    assert e.value.field == "max_tokens"
    with pytest.raises(RequestError) as e:
        sched.add("x", [], 1)
    assert e.value.field == "prompt"
    sched.add("x", [1], 1)
    with pytest.raises(RequestError) as e:
        sched.add("x", [1], 1)
    assert e.value.field == "request_id"
    with pytest.raises(QueueFullError):
        sched.add("y", [1], 1)
    assert sched.abort("x") and not sched.abort("x")
    sched.check_integrity()


def test_long_prompt_is_admitted_only_with_pages_for_all_of_it() -> None:
    """A prompt prefilled in chunks gets all its pages at admission, so its own next chunk never
    preempts it (the thrash where one request was preempted and re-admitted on every step)."""
    ps = 4
    sched = Scheduler(
        SchedulerConfig(max_running_seqs=8, max_batched_tokens=4, watermark_pages=1),
        PageAllocator(8, page_size=ps),
    )
    sim = Simulator(sched)
    sim.add("decoding", list(range(1, 9)), max_tokens=8)  # 2 prompt pages, grows to 4
    for _ in range(3):
        sim.step()
    sim.add("long", list(range(100, 120)), max_tokens=1)  # 5 pages: fits only once "decoding" is done
    while sim.requests:
        plan = sim.step()
        for s in plan.prefills + plan.decodes:
            if s.request_id == "long":
                assert len(s.page_table) >= pages_for(20, ps)
    assert sched.num_preemptions == 0
    assert sim.finished["long"] == expected_output(list(range(100, 120)), 1)
    assert sim.finished["decoding"] == expected_output(list(range(1, 9)), 8)


class PipelinedSimulator(Simulator):
    """The engine's overlap: step N + 1 is scheduled, computed and committed before the tokens of
    step N are recorded. The simulated device keeps each sequence's last sampled token, which a
    PENDING_TOKEN in the plan stands for."""

    def __init__(self, sched: Scheduler) -> None:
        super().__init__(sched)
        self.device_token: dict[str, int] = {}  # request -> token sampled in the last computed step
        self.in_flight: list[tuple[str, int]] = []
        self.wasted = 0

    def step(self) -> BatchPlan:
        plan = self.sched.schedule()
        assert plan.num_tokens <= self.sched.config.max_batched_tokens
        assert len({s.request_id for s in plan.seqs}) == len(plan.seqs), "a request is scheduled twice"
        launched = []
        for s in plan.seqs:
            token_ids = [self.device_token[s.request_id] if t == PENDING_TOKEN else t for t in s.token_ids]
            assert PENDING_TOKEN not in s.token_ids[:-1], "only a sequence's last token can be pending"
            seen = [
                self.cache.get(s.page_table[p // self.ps] * self.ps + p % self.ps) for p in range(s.start)
            ]
            tokens = seen + token_ids
            req = self.requests.get(s.request_id)
            assert req is not None, f"{s.request_id} scheduled after it finished"
            truth = (
                req.prompt
                + req.output
                + ([self.device_token[s.request_id]] if self._pending(s.request_id) else [])
            )
            assert tokens == truth[: s.seqlen], f"{s.request_id} sees a corrupted cache"
            for i, t in enumerate(token_ids):
                p = s.start + i
                self.cache[s.page_table[p // self.ps] * self.ps + p % self.ps] = t
            if s.sample:
                launched.append((s.request_id, next_token(tokens)))
        self.sched.commit(plan)
        previous, self.in_flight = self.in_flight, launched
        for request_id, token in launched:
            self.device_token[request_id] = token
        self._record(previous)
        self.sched.check_integrity()
        return plan

    def _pending(self, request_id: str) -> bool:
        seq = self.sched.get(request_id)
        return seq is not None and seq.num_pending > 0 and any(r == request_id for r, _ in self.in_flight)

    def _record(self, tokens: list[tuple[str, int]]) -> None:
        for request_id, token in tokens:
            req = self.requests.get(request_id)
            if req is None:  # finished or aborted after this row was launched: dropped
                self.wasted += 1
                continue
            self.sched.record_token(request_id, token)
            req.output.append(token)
            if len(req.output) == req.max_tokens:
                self.sched.finish(request_id)
                self.finished[request_id] = req.output
                del self.requests[request_id]

    def drain(self) -> None:
        while self.sched.has_unfinished() or self.in_flight:
            self.step()


@pytest.mark.parametrize(("num_pages", "max_running", "budget"), [(10, 8, 64), (24, 4, 24), (60, 32, 512)])
def test_pipelined_steps_match_the_oracle(seed: int, num_pages, max_running, budget) -> None:
    """Pending tokens through preemption, prefix hits, aborts and max_tokens: same outputs as the oracle."""
    rng = random.Random(seed)
    ps = 4
    sched = Scheduler(
        SchedulerConfig(max_running_seqs=max_running, max_batched_tokens=budget),
        PageAllocator(num_pages, page_size=ps),
    )
    sim = PipelinedSimulator(sched)
    shared = [[rng.randrange(VOCAB) for _ in range(rng.randrange(4, 14))] for _ in range(3)]
    specs: dict[str, tuple[list[int], int]] = {}
    aborted: set[str] = set()
    for n in range(40):
        head = list(rng.choice(shared)) if rng.random() < 0.6 else []
        prompt = head + [rng.randrange(VOCAB) for _ in range(rng.randrange(0 if head else 1, 10))]
        max_tokens = rng.randrange(1, 12)
        if pages_for(len(prompt) + max_tokens, ps) > num_pages:
            continue
        specs[f"r{n}"] = (prompt, max_tokens)
        sim.add(f"r{n}", prompt, max_tokens)
        for _ in range(rng.randrange(0, 3)):
            sim.step()
        if sim.requests and rng.random() < 0.1:
            victim = rng.choice(sorted(sim.requests))
            sim.abort(victim)
            aborted.add(victim)
    sim.drain()
    assert set(sim.finished) | aborted == set(specs)
    for request_id, out in sim.finished.items():
        assert out == expected_output(*specs[request_id]), request_id
    assert sched.allocator.num_used == 0 and sched.num_pending == 0
    if num_pages == 10:
        assert sched.num_preemptions > 0, "the small cache should have forced preemptions"
    assert sched.num_prefix_hit_tokens > 0
