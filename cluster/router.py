"""Request placement: WorkerLoad reports + one request -> the worker that should serve it.

Pure policy (no Ray, no gRPC, no torch) so it can be property-tested and driven by the simulator
(`mlaserve bench router`) with the same code the pool runs.

Policies (`RouterConfig.policy`):

- ``occupancy`` (default): predict each worker's page occupancy after admitting the request
  (pages in use + pages promised to admitted requests + pages the waiting queue's prompts will
  take + this router's in-flight reservations + this request's prompt and expected output
  pages) and pick the lowest cost ``occ + w * occ / (1 - occ)``: a penalty that grows without
  bound as occupancy -> 1, so a worker close to full is only chosen when every worker is.
  A report shows the pages running requests hold *now*; they keep growing until they finish, so
  the prediction is at least the expected final footprint of the requests this router has placed
  there and not yet seen finish. Queue depth breaks ties.
- ``prefix``: prefer the worker already holding the longest run of the prompt's full pages in its
  prefix cache (WorkerLoad.cached_page_hashes, or pages of requests routed there since its last
  report), as long as its predicted occupancy stays under ``prefix_max_occupancy``; otherwise
  fall back to ``occupancy``.
- ``round_robin``: the next eligible worker in id order.
- ``power_of_two``: two eligible workers drawn at random (seeded), the lower occupancy cost wins.

In-flight reservations: every routed request reserves its predicted pages on its worker until
the first load report that includes it (a report whose snapshot was taken after the route,
``update_load(load, as_of=...)``) or until it finishes (``release``). A burst that arrives
between two load reports therefore spreads out instead of herding onto the worker that looked
emptiest in the last report. The request's expected footprint stays on the worker until
``release``.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from mlaserve.worker.load import WorkerLoad

POLICIES = ("occupancy", "prefix", "round_robin", "power_of_two")

# Cost of a worker whose predicted occupancy reaches or passes 1: above every finite penalty,
# still ordered by how far it overflows (so the least-overflowing worker wins when all are full).
_OVERFLOW_COST = 1e12


class NoEligibleWorker(Exception):
    """No worker can take the request: none is known, healthy and not draining."""


class AllQueuesFull(NoEligibleWorker):
    """Every healthy worker's admission queue is at its limit."""


@dataclass(frozen=True)
class RouterConfig:
    policy: str = "occupancy"
    # Expected output length as a fraction of max_tokens (outputs usually stop before max_tokens).
    output_fraction: float = 0.5
    # Weight of the occ / (1 - occ) penalty against the plain predicted occupancy.
    penalty_weight: float = 1.0
    # prefix policy: a cache hit is only followed while predicted occupancy stays below this.
    prefix_max_occupancy: float = 0.85
    # Requests a worker may have queued (waiting + routed-but-unreported); None = unlimited.
    max_queued_per_worker: int | None = None
    # A reservation no report has covered after this long counts as reported (a lost report).
    reservation_ttl_s: float = 300.0
    # A placement never released after this long is forgotten (a caller that lost track of it).
    placement_ttl_s: float = 3600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not (0.0 <= self.output_fraction <= 1.0):
            raise ValueError(f"output_fraction must be in [0, 1], got {self.output_fraction!r}")
        if not (self.penalty_weight >= 0.0 and math.isfinite(self.penalty_weight)):
            raise ValueError(f"penalty_weight must be a finite number >= 0, got {self.penalty_weight!r}")
        if not (0.0 < self.prefix_max_occupancy <= 1.0):
            raise ValueError(f"prefix_max_occupancy must be in (0, 1], got {self.prefix_max_occupancy!r}")
        if self.max_queued_per_worker is not None and self.max_queued_per_worker < 1:
            raise ValueError(
                f"max_queued_per_worker must be >= 1 or None, got {self.max_queued_per_worker!r}"
            )
        if not (self.reservation_ttl_s > 0 and self.placement_ttl_s > 0):
            raise ValueError("reservation_ttl_s and placement_ttl_s must be > 0")


@dataclass(frozen=True)
class RouteRequest:
    """What the router needs to know about one request."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    prefix_hashes: tuple[int, ...] = ()  # chained hashes of the prompt's full pages (prefix_page_hashes)

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("request_id must be a non-empty string")
        if self.prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be >= 1, got {self.prompt_tokens!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens!r}")


@dataclass(frozen=True)
class RouteDecision:
    request_id: str
    worker_id: str
    policy: str  # the policy that decided (``prefix`` may fall back to ``occupancy``)
    reserved_pages: int  # pages reserved on the worker for this request
    predicted_occupancy: float  # the worker's predicted occupancy after admitting it
    cached_pages: int = 0  # prompt pages the worker already holds (prefix policy)


@dataclass
class _Placement:
    """A routed request that has not been released."""

    request_id: str
    worker_id: str
    pages: int  # expected footprint (prompt + expected output, minus cached pages)
    stamp: float  # router-clock time of the route
    prefix_hashes: tuple[int, ...]
    reported: bool = False  # a load report taken after the route has arrived (reservation released)


@dataclass
class _WorkerState:
    load: WorkerLoad
    draining: bool = False  # set by the pool before the worker's own report says so
    reserved_pages: int = 0  # pages of placements no report includes yet (in-flight reservations)
    active_pages: int = 0  # expected footprint of every unreleased placement
    unreported: set[str] = field(default_factory=set)
    active: set[str] = field(default_factory=set)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Router:
    """Stateful placement policy. Not thread-safe: drive it from one thread / event loop."""

    def __init__(self, config: RouterConfig | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config or RouterConfig()
        self._clock = clock
        self._rng = random.Random(self.config.seed)
        self._workers: dict[str, _WorkerState] = {}
        self._placements: dict[str, _Placement] = {}
        self._rr_next = 0
        # (policy, worker_id) -> requests routed; read by the gateway's metrics.
        self.decisions: Counter[tuple[str, str]] = Counter()
        self.prefix_hits = 0  # requests routed to a worker holding >= 1 of their pages

    # ---- worker reports --------------------------------------------------------------------

    def update_load(self, load: WorkerLoad, as_of: float | None = None) -> bool:
        """Take a load report; returns False if it is older than the one held (by seq).

        ``as_of`` is the router-clock time before which the report's snapshot was surely taken
        *after*: reservations stamped before it are included in the report and are released.
        Without ``as_of`` reservations stay until ``release`` (or their TTL).
        """
        state = self._workers.get(load.worker_id)
        if state is None:
            self._workers[load.worker_id] = _WorkerState(load=load)
            return True
        if load.seq <= state.load.seq:
            return False
        state.load = load
        if as_of is not None:
            for rid in [r for r in state.unreported if self._placements[r].stamp < as_of]:
                self._mark_reported(rid)
        return True

    def remove_worker(self, worker_id: str) -> list[str]:
        """Forget a worker (dead or drained); returns the request ids that were reserved on it."""
        state = self._workers.pop(worker_id, None)
        if state is None:
            return []
        rids = sorted(state.active)
        for rid in rids:
            del self._placements[rid]
        return rids

    def set_draining(self, worker_id: str, draining: bool = True) -> None:
        if worker_id in self._workers:
            self._workers[worker_id].draining = draining

    @property
    def worker_ids(self) -> list[str]:
        return sorted(self._workers)

    def load_of(self, worker_id: str) -> WorkerLoad | None:
        state = self._workers.get(worker_id)
        return state.load if state else None

    # ---- reservations ----------------------------------------------------------------------

    def release(self, request_id: str) -> bool:
        """The request finished or failed: forget its placement (and reservation, if held)."""
        placed = self._placements.pop(request_id, None)
        if placed is None:
            return False
        state = self._workers[placed.worker_id]
        if not placed.reported:
            state.unreported.discard(request_id)
            state.reserved_pages -= placed.pages
        state.active.discard(request_id)
        state.active_pages -= placed.pages
        return True

    def is_placed(self, request_id: str) -> bool:
        return request_id in self._placements

    def reserved_pages(self, worker_id: str) -> int:
        """Pages of requests routed to the worker that no load report includes yet."""
        state = self._workers.get(worker_id)
        return state.reserved_pages if state else 0

    def active_requests(self, worker_id: str) -> int:
        state = self._workers.get(worker_id)
        return len(state.active) if state else 0

    def queue_depth(self, worker_id: str) -> int:
        """Requests waiting on the worker per its report, plus those routed since (unreported) whose
        reservation is still live at the router's clock: the depth route() checks its queue limit against
        (it expires reservations first), also before the next route() call has expired them."""
        state = self._workers[worker_id]
        now = self._clock()
        live = sum(1 for rid in state.unreported if self._reservation_live(self._placements[rid], now))
        return state.load.waiting + live

    def _placement_expired(self, placed: _Placement, now: float) -> bool:
        return now - placed.stamp > self.config.placement_ttl_s

    def _reservation_expired(self, placed: _Placement, now: float) -> bool:
        return now - placed.stamp > self.config.reservation_ttl_s

    def _reservation_live(self, placed: _Placement, now: float) -> bool:
        """False once _expire(now) would mark the placement reported or release it."""
        return not (self._placement_expired(placed, now) or self._reservation_expired(placed, now))

    def _mark_reported(self, request_id: str) -> None:
        placed = self._placements[request_id]
        state = self._workers[placed.worker_id]
        placed.reported = True
        state.unreported.discard(request_id)
        state.reserved_pages -= placed.pages

    def _expire(self, now: float) -> None:
        for rid, placed in list(self._placements.items()):
            if self._placement_expired(placed, now):
                self.release(rid)
            elif not placed.reported and self._reservation_expired(placed, now):
                self._mark_reported(rid)

    # ---- placement -------------------------------------------------------------------------

    def demand_pages(self, req: RouteRequest, page_size: int, cached_pages: int = 0) -> int:
        """Pages the request is expected to need: prompt + expected output, minus cached pages."""
        expected_out = math.ceil(req.max_tokens * self.config.output_fraction)
        return max(0, _ceil_div(req.prompt_tokens + expected_out, page_size) - cached_pages)

    def predicted_occupancy(self, worker_id: str, demand_pages: int) -> float:
        state = self._workers[worker_id]
        load = state.load
        if load.total_pages <= 0:
            return math.inf
        queued = _ceil_div(load.queued_prompt_tokens, load.page_size)
        # load.reserved_pages is what running requests may still claim up to their max_tokens;
        # they are expected to use output_fraction of it.
        growth = math.ceil(load.reserved_pages * self.config.output_fraction)
        reported = load.used_pages + growth + queued + state.reserved_pages
        committed = max(reported, state.active_pages) + demand_pages
        return committed / load.total_pages

    def cost(self, occupancy: float) -> float:
        """Lower is better: occupancy plus a penalty that grows without bound as it nears 1."""
        if occupancy >= 1.0:
            return _OVERFLOW_COST * occupancy
        return occupancy + self.config.penalty_weight * occupancy / (1.0 - occupancy)

    def cached_prefix_pages(self, worker_id: str, prefix_hashes: Sequence[int]) -> int:
        """Leading pages of the prompt the worker holds (reported, or routed there since)."""
        if not prefix_hashes:
            return 0
        state = self._workers[worker_id]
        held = state.load.cached_page_hashes
        pending: set[int] = set()
        for rid in state.active:
            pending.update(self._placements[rid].prefix_hashes)
        n = 0
        for h in prefix_hashes:  # chained hashes: a page can only hit if every earlier one does
            if h in held or h in pending:
                n += 1
            else:
                break
        return n

    def eligible(self, exclude: Iterable[str] = ()) -> list[str]:
        """Healthy, non-draining workers (id order), ignoring queue limits."""
        excluded = set(exclude)
        return [
            wid
            for wid, s in sorted(self._workers.items())
            if wid not in excluded and s.load.healthy and not s.load.draining and not s.draining
        ]

    def route(self, req: RouteRequest, exclude: Iterable[str] = ()) -> RouteDecision:
        """Pick a worker for ``req`` and reserve its pages there.

        Raises NoEligibleWorker when no healthy non-draining worker is known, AllQueuesFull when
        every one of them has ``max_queued_per_worker`` requests queued.
        """
        if req.request_id in self._placements:
            raise ValueError(f"request_id {req.request_id!r} is already routed and not released")
        now = self._clock()
        self._expire(now)
        candidates = self.eligible(exclude)
        if not candidates:
            raise NoEligibleWorker("no healthy, non-draining worker is available")
        limit = self.config.max_queued_per_worker
        if limit is not None:
            candidates = [w for w in candidates if self.queue_depth(w) < limit]
            if not candidates:
                raise AllQueuesFull(f"every worker has {limit} requests queued")

        policy = self.config.policy
        cached = 0
        if policy == "round_robin":
            wid = self._pick_round_robin(candidates)
        elif policy == "power_of_two":
            pair = candidates if len(candidates) <= 2 else self._rng.sample(candidates, 2)
            wid = self._pick_lowest_cost(req, pair)
        elif policy == "prefix":
            hit, cached = self._pick_prefix(req, candidates)
            if hit is None:
                policy = "occupancy"
                wid = self._pick_lowest_cost(req, candidates)
            else:
                wid = hit
        else:
            wid = self._pick_lowest_cost(req, candidates)

        page_size = self._workers[wid].load.page_size
        pages = self.demand_pages(req, page_size, cached)
        occ = self.predicted_occupancy(wid, pages)
        self._placements[req.request_id] = _Placement(
            req.request_id, wid, pages, now, tuple(req.prefix_hashes)
        )
        state = self._workers[wid]
        state.unreported.add(req.request_id)
        state.active.add(req.request_id)
        state.reserved_pages += pages
        state.active_pages += pages
        self.decisions[(self.config.policy, wid)] += 1
        if cached:
            self.prefix_hits += 1
        return RouteDecision(req.request_id, wid, policy, pages, occ, cached)

    def _pick_round_robin(self, candidates: list[str]) -> str:
        ids = sorted(self._workers)
        # The first candidate at or after the cursor (in id order over all known workers).
        start = self._rr_next % len(ids)
        ordered = ids[start:] + ids[:start]
        allowed = set(candidates)
        wid = next(w for w in ordered if w in allowed)
        self._rr_next = ids.index(wid) + 1
        return wid

    def _rank(self, req: RouteRequest, wid: str, cached: int = 0) -> tuple[float, int, str]:
        page_size = self._workers[wid].load.page_size
        occ = self.predicted_occupancy(wid, self.demand_pages(req, page_size, cached))
        # Round the cost so near-equal workers tie and queue depth decides; then id order.
        return (round(self.cost(occ), 9), self.queue_depth(wid), wid)

    def _pick_lowest_cost(self, req: RouteRequest, candidates: Sequence[str]) -> str:
        return min(candidates, key=lambda w: self._rank(req, w))

    def _pick_prefix(self, req: RouteRequest, candidates: list[str]) -> tuple[str | None, int]:
        best: tuple[int, tuple[float, int, str]] | None = None
        best_wid: str | None = None
        for wid in candidates:
            cached = self.cached_prefix_pages(wid, req.prefix_hashes)
            if cached == 0:
                continue
            page_size = self._workers[wid].load.page_size
            occ = self.predicted_occupancy(wid, self.demand_pages(req, page_size, cached))
            if occ >= self.config.prefix_max_occupancy:
                continue
            key = (-cached, self._rank(req, wid, cached))
            if best is None or key < best:
                best, best_wid = key, wid
        return best_wid, (-best[0] if best is not None else 0)

    # ---- invariants ------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent."""
        seen: set[str] = set()
        for wid, state in self._workers.items():
            assert state.load.worker_id == wid, f"load of {state.load.worker_id!r} filed under {wid!r}"
            assert state.unreported <= state.active, f"worker {wid}: a reservation without a placement"
            reserved = active = 0
            for rid in state.active:
                placed = self._placements.get(rid)
                assert placed is not None, f"worker {wid} lists unknown placement {rid!r}"
                assert placed.worker_id == wid, f"placement {rid!r} is on {placed.worker_id}, listed by {wid}"
                assert placed.pages >= 0, f"placement {rid!r} has negative pages"
                assert placed.reported == (rid not in state.unreported), f"{rid!r}: reported flag disagrees"
                active += placed.pages
                reserved += 0 if placed.reported else placed.pages
            assert reserved == state.reserved_pages, (
                f"worker {wid}: reserved {state.reserved_pages} != {reserved}"
            )
            assert active == state.active_pages, f"worker {wid}: active {state.active_pages} != {active}"
            seen |= state.active
        assert seen == set(self._placements), "placements not listed by exactly one worker"
        assert sum(self.decisions.values()) >= len(self._placements), "more placements than decisions"
