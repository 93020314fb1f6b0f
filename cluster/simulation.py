"""Discrete-event simulation of the router in front of N workers (no GPU, no Ray, no torch).

Each simulated worker models what decides time-to-first-token and preemptions on a real one:

- a finite pool of pages of ``page_size`` tokens, with a prefix cache (full prompt pages of shared
  prefixes stay cached after their request ends, count as free, and are evicted LRU on demand);
- continuous batching: each step admits waiting requests FCFS while their prompt pages fit above a
  small watermark (and a per-step prefill token budget), then every running request decodes one
  token; a step costs ``base + per_seq * batch + per_kv_token * context + per_prefill_token *
  prefill`` seconds;
- preemption by recompute: when a running request needs a new page and none is free, the most
  recently admitted request loses its pages and goes back to the head of the queue, to be prefilled
  again from prompt + tokens generated so far.

Load reports are snapshots taken every ``report_interval_s`` and delivered ``report_delay_s``
later, so the router (the real ``Router``) works from stale information, as in the pool. Requests
arrive as a Poisson stream modulated by bursts, with long-tailed (log-normal) prompt and output
lengths and a share of requests that start with one of a few shared system prompts.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from mlaserve.cluster.router import (
    POLICIES,
    AllQueuesFull,
    NoEligibleWorker,
    Router,
    RouterConfig,
    RouteRequest,
)
from mlaserve.worker.load import WorkerLoad


@dataclass(frozen=True)
class WorkloadConfig:
    num_requests: int = 2000
    rate: float = 6.0  # mean arrivals per second outside bursts
    burst_rate: float = 40.0  # arrivals per second inside a burst
    mean_calm_s: float = 8.0  # mean length of a calm period (exponential)
    mean_burst_s: float = 2.0  # mean length of a burst (exponential)
    prompt_median: int = 300
    prompt_sigma: float = 1.1  # log-normal shape: a long tail of long prompts
    prompt_max: int = 12000
    output_median: int = 300
    output_sigma: float = 1.0
    max_tokens_choices: tuple[int, ...] = (512, 1024, 2048, 4096)
    shared_prefix_fraction: float = 0.3  # requests that start with a shared system prompt
    shared_prefix_groups: int = 6
    shared_prefix_pages: int = 12
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.rate <= 0 or self.burst_rate <= 0:
            raise ValueError("rate and burst_rate must be > 0")
        if not (0.0 <= self.shared_prefix_fraction <= 1.0):
            raise ValueError(f"shared_prefix_fraction must be in [0, 1], got {self.shared_prefix_fraction}")
        if not self.max_tokens_choices or min(self.max_tokens_choices) < 1:
            raise ValueError("max_tokens_choices must be non-empty positive integers")


@dataclass(frozen=True)
class WorkerModel:
    total_pages: int = 768
    page_size: int = 64
    max_running: int = 256
    max_batched_tokens: int = 4096  # tokens per step: decodes count 1, prompts are prefilled in chunks
    watermark: float = 0.0  # fraction of pages kept free when admitting (the engine's watermark_pages)
    step_base_s: float = 0.010
    step_per_seq_s: float = 0.00005
    step_per_kv_token_s: float = 4e-8
    prefill_per_token_s: float = 4e-5

    def __post_init__(self) -> None:
        if min(self.total_pages, self.page_size, self.max_running, self.max_batched_tokens) < 1:
            raise ValueError("total_pages, page_size, max_running and max_batched_tokens must be >= 1")
        if not (0.0 <= self.watermark < 1.0):
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")


@dataclass(frozen=True)
class SimConfig:
    num_workers: int = 4
    worker: WorkerModel = field(default_factory=WorkerModel)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    report_interval_s: float = 0.2
    report_delay_s: float = 0.05
    max_queued_per_worker: int | None = 64
    router: RouterConfig = field(default_factory=RouterConfig)
    seeds: tuple[int, ...] = (0, 1, 2)  # compare_policies: one workload per seed, results pooled

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.report_interval_s <= 0 or self.report_delay_s < 0:
            raise ValueError("report_interval_s must be > 0 and report_delay_s >= 0")
        if not self.seeds:
            raise ValueError("seeds must name at least one workload seed")


@dataclass(frozen=True)
class SimRequest:
    request_id: str
    arrival: float
    prompt_tokens: int
    max_tokens: int
    output_tokens: int  # what the model would generate before EOS (<= max_tokens)
    prefix_hashes: tuple[int, ...] = ()  # hashes of the shared prefix's full pages


@dataclass(frozen=True)
class SimResult:
    policy: str
    completed: int
    rejected: int
    preemptions: int
    ttft_p50_s: float
    ttft_p99_s: float
    e2e_p99_s: float
    peak_occupancy: float  # highest used/total of any worker at any step
    prefix_hit_tokens: int  # prompt tokens served from a prefix cache
    makespan_s: float  # simulated seconds until the last request finished (summed over runs)
    ttft_s: tuple[float, ...] = field(default=(), repr=False)  # every completed request's TTFT
    e2e_s: tuple[float, ...] = field(default=(), repr=False)

    @staticmethod
    def pooled(results: Sequence[SimResult]) -> SimResult:
        """One result over several runs of a policy: percentiles of all their requests together."""
        if not results:
            raise ValueError("pooled() needs at least one result")
        ttft = tuple(t for r in results for t in r.ttft_s)
        e2e = tuple(t for r in results for t in r.e2e_s)
        return SimResult(
            policy=results[0].policy,
            completed=sum(r.completed for r in results),
            rejected=sum(r.rejected for r in results),
            preemptions=sum(r.preemptions for r in results),
            ttft_p50_s=_percentile(ttft, 50),
            ttft_p99_s=_percentile(ttft, 99),
            e2e_p99_s=_percentile(e2e, 99),
            peak_occupancy=max(r.peak_occupancy for r in results),
            prefix_hit_tokens=sum(r.prefix_hit_tokens for r in results),
            makespan_s=sum(r.makespan_s for r in results),
            ttft_s=ttft,
            e2e_s=e2e,
        )


def make_workload(cfg: WorkloadConfig, worker: WorkerModel) -> list[SimRequest]:
    """A seeded synthetic workload; every request fits one worker's whole page pool."""
    rng = random.Random(cfg.seed)
    capacity = worker.total_pages * worker.page_size
    prefix_tokens = cfg.shared_prefix_pages * worker.page_size
    reqs: list[SimRequest] = []
    t = 0.0
    burst = False
    phase_end = rng.expovariate(1.0 / cfg.mean_calm_s)
    while len(reqs) < cfg.num_requests:
        t += rng.expovariate(cfg.burst_rate if burst else cfg.rate)
        while t > phase_end:  # an arrival past the phase's end belongs to the next phase
            burst = not burst
            phase_end += rng.expovariate(1.0 / (cfg.mean_burst_s if burst else cfg.mean_calm_s))
        prompt = max(
            1, min(cfg.prompt_max, int(rng.lognormvariate(math.log(cfg.prompt_median), cfg.prompt_sigma)))
        )
        max_tokens = rng.choice(cfg.max_tokens_choices)
        output = max(
            1, min(max_tokens, int(rng.lognormvariate(math.log(cfg.output_median), cfg.output_sigma)))
        )
        hashes: tuple[int, ...] = ()
        if cfg.shared_prefix_groups and rng.random() < cfg.shared_prefix_fraction:
            group = rng.randrange(cfg.shared_prefix_groups)
            prompt += prefix_tokens
            full = min(cfg.shared_prefix_pages, prompt // worker.page_size)
            hashes = tuple(hash(("prefix", group, i)) for i in range(full))
        prompt = min(prompt, capacity - max_tokens - worker.page_size)
        reqs.append(
            SimRequest(f"r{len(reqs)}", t, prompt, max_tokens, output, hashes[: prompt // worker.page_size])
        )
    return reqs


@dataclass(eq=False)
class _Seq:
    req: SimRequest
    arrival: int  # admission order: the latest-arrived running request is preempted first
    generated: int = 0
    computed: int = 0  # tokens whose latents are in the cache
    own_pages: int = 0
    shared: list[int] = field(default_factory=list)  # prefix-cache page hashes referenced
    first_token: float | None = None
    running: bool = False

    @property
    def tokens(self) -> int:  # prompt + generated: what a recompute prefills again
        return self.req.prompt_tokens + self.generated

    @property
    def pages(self) -> int:
        return self.own_pages + len(self.shared)


class _SimWorker:
    """One worker's page pool and continuous batching, step for step like worker/scheduler.py."""

    def __init__(self, worker_id: str, model: WorkerModel):
        self.id = worker_id
        self.m = model
        self.free = model.total_pages  # pages neither owned nor cached
        self.cache: OrderedDict[int, int] = OrderedDict()  # prefix page hash -> refcount (LRU order)
        self.cached_free = 0  # cached pages with refcount 0
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []  # in arrival order
        self.busy = False
        self.seq = 0
        self.preemptions = 0
        self.peak_occupancy = 0.0
        self.hit_tokens = 0
        self._plan: list[tuple[_Seq, int]] = []
        self._tokens_window: deque[tuple[float, int]] = deque()

    # pages ---------------------------------------------------------------------------------
    def available(self) -> int:
        """Free pages plus cached pages nobody references (evictable)."""
        return self.free + self.cached_free

    def used(self) -> int:
        return self.m.total_pages - self.available()

    def _take(self, n: int) -> None:
        while self.free < n:  # evict least recently used unreferenced cached pages
            victim = next(h for h, c in self.cache.items() if c == 0)
            del self.cache[victim]
            self.cached_free -= 1
            self.free += 1
        self.free -= n

    def _alloc(self, s: _Seq, n: int) -> None:
        """Give ``s`` its next ``n`` pages; shared-prefix pages become cached pages it references."""
        self._take(n)
        start = s.pages
        for idx in range(start, start + n):
            h = s.req.prefix_hashes[idx] if idx < len(s.req.prefix_hashes) else None
            if h is not None and h not in self.cache:
                self.cache[h] = 1
                s.shared.append(h)
            else:
                s.own_pages += 1

    def _release(self, s: _Seq) -> None:
        self.free += s.own_pages
        s.own_pages = 0
        for h in s.shared:
            self.cache[h] -= 1
            self.cached_free += self.cache[h] == 0
        s.shared = []
        s.computed = 0

    def _preempt(self, s: _Seq) -> None:
        self.running.remove(s)
        s.running = False
        self._release(s)
        self.waiting.appendleft(s)
        self.preemptions += 1

    # scheduling ----------------------------------------------------------------------------
    def _admit(self, budget: int) -> int:
        ps = self.m.page_size
        watermark = math.ceil(self.m.watermark * self.m.total_pages)
        while self.waiting and budget > 0 and len(self.running) < self.m.max_running:
            s = self.waiting[0]
            n = s.tokens
            hits = 0  # leading prompt pages in the prefix cache (the last token is always computed)
            for h in s.req.prefix_hashes[: (n - 1) // ps]:
                if h not in self.cache:
                    break
                hits += 1
            matched = list(s.req.prefix_hashes[:hits])
            num_new = min(n - hits * ps, budget)
            new_pages = -(-(hits * ps + num_new) // ps) - hits
            revived = sum(1 for h in matched if self.cache[h] == 0)
            # Admit only when the whole prompt's pages fit, not just its first chunk: a long prompt
            # admitted on its first chunk's pages would be preempted again at its next chunk.
            whole = -(-n // ps) - hits
            if self.available() - revived - whole < (watermark if self.running else 0):
                break  # FIFO: the head waits for pages
            self.waiting.popleft()
            for h in matched:
                self.cached_free -= self.cache[h] == 0
                self.cache[h] += 1
                self.cache.move_to_end(h)
            s.shared = matched
            s.own_pages = 0
            self._alloc(s, new_pages)
            s.computed = hits * ps
            self.hit_tokens += hits * ps
            bisect.insort(self.running, s, key=lambda x: x.arrival)
            s.running = True
            self._plan.append((s, num_new))
            budget -= num_new
        return budget

    def start_step(self) -> float | None:
        """Plan one step (decodes and prefill chunks); its duration, or None if idle."""
        ps = self.m.page_size
        budget = self.m.max_batched_tokens
        self._plan = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            s = self.running[i]
            num_new = min(s.tokens - s.computed, budget)
            needed = -(-(s.computed + num_new) // ps) - s.pages
            while needed > self.available():
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is s:
                    break
            if not s.running:
                break
            if needed > 0:
                self._alloc(s, needed)
            self._plan.append((s, num_new))
            budget -= num_new
            i += 1
        if not preempted:
            self._admit(budget)
        if not self._plan:
            return None
        self.peak_occupancy = max(self.peak_occupancy, self.used() / self.m.total_pages)
        m = self.m
        prefill = sum(n for _, n in self._plan if n > 1)
        kv = sum(s.computed + n for s, n in self._plan)
        return (
            m.step_base_s
            + m.step_per_seq_s * len(self._plan)
            + m.step_per_kv_token_s * kv
            + m.prefill_per_token_s * prefill
        )

    def finish_step(self, now: float) -> list[_Seq]:
        """Record the planned step; returns the requests that finished."""
        done: list[_Seq] = []
        sampled = 0
        for s, n in self._plan:
            s.computed += n
            if s.computed < s.tokens:
                continue  # a prefill chunk that does not reach the end of the known tokens
            s.generated += 1
            sampled += 1
            if s.first_token is None:
                s.first_token = now
            if s.generated >= s.req.output_tokens:
                self.running.remove(s)
                s.running = False
                self._release(s)
                done.append(s)
        self._plan = []
        self._tokens_window.append((now, sampled))
        while self._tokens_window and self._tokens_window[0][0] < now - 1.0:
            self._tokens_window.popleft()
        return done

    def snapshot(self) -> WorkerLoad:
        """A load report, built the way Engine.load() builds it."""
        self.seq += 1
        ps = self.m.page_size
        return WorkerLoad(
            worker_id=self.id,
            seq=self.seq,
            total_pages=self.m.total_pages,
            free_pages=self.available(),
            reserved_pages=sum(
                max(0, -(-(s.req.prompt_tokens + s.req.max_tokens) // ps) - s.pages) for s in self.running
            ),
            running=len(self.running),
            waiting=len(self.waiting),
            queued_prompt_tokens=sum(s.tokens for s in self.waiting),
            tokens_per_s=float(sum(n for _, n in self._tokens_window)),
            page_size=ps,
            cached_page_hashes=frozenset(self.cache),
        )


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[k]


def simulate(
    cfg: SimConfig, policy: str | None = None, workload: list[SimRequest] | None = None
) -> SimResult:
    """Run the workload through ``num_workers`` simulated workers behind the real Router."""
    policy = policy or cfg.router.policy
    reqs = workload if workload is not None else make_workload(cfg.workload, cfg.worker)
    now = 0.0
    router = Router(
        replace(cfg.router, policy=policy, max_queued_per_worker=cfg.max_queued_per_worker), clock=lambda: now
    )
    workers = {f"w{i}": _SimWorker(f"w{i}", cfg.worker) for i in range(cfg.num_workers)}
    events: list[tuple[float, int, str, object]] = []
    counter = 0

    def push(t: float, kind: str, payload: object) -> None:
        nonlocal counter
        counter += 1
        heapq.heappush(events, (t, counter, kind, payload))

    for i, w in enumerate(workers.values()):
        router.update_load(w.snapshot(), as_of=0.0)
        push(cfg.report_interval_s * (i + 1) / cfg.num_workers, "snapshot", w.id)
    for r in reqs:
        push(r.arrival, "arrival", r)

    rejected = 0
    arrival = 0
    ttft: list[float] = []
    e2e: list[float] = []
    outstanding = len(reqs)
    while outstanding:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrival":
            assert isinstance(payload, SimRequest)
            r = payload
            try:
                decision = router.route(
                    RouteRequest(r.request_id, r.prompt_tokens, r.max_tokens, r.prefix_hashes)
                )
            except (AllQueuesFull, NoEligibleWorker):
                rejected += 1
                outstanding -= 1
                continue
            w = workers[decision.worker_id]
            w.waiting.append(_Seq(r, arrival))
            arrival += 1
            if not w.busy:
                dt = w.start_step()
                if dt is not None:
                    w.busy = True
                    push(now + dt, "step", w.id)
        elif kind == "step":
            w = workers[str(payload)]
            for s in w.finish_step(now):
                router.release(s.req.request_id)
                assert s.first_token is not None
                ttft.append(s.first_token - s.req.arrival)
                e2e.append(now - s.req.arrival)
                outstanding -= 1
            dt = w.start_step()
            w.busy = dt is not None
            if dt is not None:
                push(now + dt, "step", w.id)
        elif kind == "snapshot":
            w = workers[str(payload)]
            push(now + cfg.report_delay_s, "report", (w.snapshot(), now))
            push(now + cfg.report_interval_s, "snapshot", w.id)
        else:  # report
            assert isinstance(payload, tuple)
            report, taken_at = payload
            router.update_load(report, as_of=taken_at)
    router.check_integrity()
    return SimResult(
        policy=policy,
        completed=len(ttft),
        rejected=rejected,
        preemptions=sum(w.preemptions for w in workers.values()),
        ttft_p50_s=_percentile(ttft, 50),
        ttft_p99_s=_percentile(ttft, 99),
        e2e_p99_s=_percentile(e2e, 99),
        peak_occupancy=max(w.peak_occupancy for w in workers.values()),
        prefix_hit_tokens=sum(w.hit_tokens for w in workers.values()),
        makespan_s=now,
        ttft_s=tuple(ttft),
        e2e_s=tuple(e2e),
    )


def compare_policies(cfg: SimConfig, policies: Sequence[str] = POLICIES) -> list[SimResult]:
    """Every policy on the same workloads (one per seed in ``cfg.seeds``), pooled per policy."""
    runs: dict[str, list[SimResult]] = {p: [] for p in policies}
    for seed in cfg.seeds:
        run_cfg = replace(
            cfg, workload=replace(cfg.workload, seed=seed), router=replace(cfg.router, seed=seed)
        )
        reqs = make_workload(run_cfg.workload, run_cfg.worker)
        for p in policies:
            runs[p].append(simulate(run_cfg, p, reqs))
    return [SimResult.pooled(runs[p]) for p in policies]


def markdown_table(results: Sequence[SimResult]) -> str:
    lines = [
        "| policy | p50 TTFT (s) | p99 TTFT (s) | p99 latency (s) | preemptions | rejections | peak occupancy | prefix-hit tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.policy} | {r.ttft_p50_s:.3f} | {r.ttft_p99_s:.3f} | {r.e2e_p99_s:.2f} | {r.preemptions} "
            f"| {r.rejected} | {r.peak_occupancy:.1%} | {r.prefix_hit_tokens} |"
        )
    return "\n".join(lines)
