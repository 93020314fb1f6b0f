"""WorkerPool: the Ray side of the cluster. Starts WorkerActors, routes requests to them, streams
their tokens back, and keeps the set of workers healthy and sized to the load.

    pool = WorkerPool(PoolConfig(model="tiny", num_workers=2))
    await pool.start()
    async for d in pool.generate(GenerationRequest("r1", SamplingParams(max_tokens=8), prompt="Hi")):
        print(d.worker_id, d.delta.token_ids, d.delta.text)
    await pool.shutdown()

- Requests are tokenized once here (the workers' own tokenizer, loaded with load_tokenizer) and
  validated before routing: InvalidRequest names the field. QueueFull when every worker's queue
  is at PoolConfig.max_queued_per_worker; Draining while draining or with no live worker.
- The router (cluster/router.py) places each request from the workers' load reports, polled every
  load_poll_interval_s; each report covers the requests routed before it was asked for.
- A worker that dies, stops answering for health_timeout_s or reports an engine failure is killed
  and replaced (same worker id, restarts + 1). Its requests resume on other workers from prompt +
  tokens already sent (cluster/resume.py): the client sees every token once. However many workers
  a request loses, it is resumed, waiting up to retry_patience_s for a live worker when none is
  (all of them restarting), unless it is the suspected cause of the deaths: the rule in
  cluster/poison.py tells a poison request from a bystander and fails only the poison one
  (SuspectedPoison), after at most 1 + poison_strikes deaths (2 + if it had produced tokens first).
- A consumer that stops iterating (aclose, or its task cancelled) aborts the request on its
  worker, freeing its pages at once.
- Autoscaling (cluster/autoscaler.py) between min_workers and max_workers; a new worker counts as
  starting until its actor answers (a GPU actor may wait for the Ray autoscaler to add a node).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from mlaserve.worker.actor import WorkerActor, WorkerDraining, WorkerFailed
from mlaserve.worker.errors import QueueFullError
from mlaserve.worker.load import WorkerLoad
from mlaserve.worker.page_allocator import prefix_page_hashes
from mlaserve.worker.tokenizer import load_tokenizer
from mlaserve.worker.types import FinishReason

from .autoscaler import Autoscaler, WorkerSnapshot
from .errors import Draining, InvalidRequest, QueueFull, SuspectedPoison
from .poison import TRIAL_SETTLE_S, Suspicion
from .pool_config import PoolConfig
from .resume import ResumeState
from .router import AllQueuesFull, NoEligibleWorker, Router, RouterConfig, RouteRequest
from .types import ClusterDelta, GenerationRequest, WorkerStatus

logger = logging.getLogger(__name__)

STARTING, READY, DRAINING, DEAD = "starting", "ready", "draining", "dead"


class RequestFailed(Draining):
    """A request's stream failed on more than max_retries workers that stayed alive (errors that
    were not a worker's death) (-> UNAVAILABLE, like Draining)."""


@dataclass
class PoolCounters:
    """Monotonic counters the gateway's metrics read."""

    routed: Counter[tuple[str, str]] = field(default_factory=Counter)  # (policy, worker_id) -> requests
    retries: int = 0  # attempts moved to another worker (after a failure or a refusal)
    worker_losses: int = 0  # attempts that ended because their worker died (one per request per death)
    suspected_poison: int = 0  # requests failed as the suspected cause of worker deaths
    resumes: int = 0  # attempts that continued a stream that had already sent tokens
    worker_failures: int = 0  # workers found dead, hung or failed
    worker_restarts: int = 0  # replacement actors started
    preemptions: Counter[str] = field(default_factory=Counter)  # worker_id -> preemptions (from reports)
    rejected_queue_full: int = 0
    rejected_invalid: int = 0
    scale_ups: int = 0
    scale_downs: int = 0


@dataclass(eq=False)
class _Slot:
    """One worker id and the actor currently serving it."""

    worker_id: str
    actor: Any
    incarnation: int
    restarts: int = 0
    state: str = STARTING
    load: WorkerLoad | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    inflight: set[str] = field(default_factory=set)
    unproven: set[str] = field(default_factory=set)  # attempts here that have not produced a delta yet
    trial: str | None = None  # the suspect on trial here (cluster/poison.py), at most one
    last_ok: float = field(default_factory=time.monotonic)
    ready_task: asyncio.Task[None] | None = None
    preemptions_seen: int = 0
    retired: bool = False  # scaled down: not replaced when it goes


def _cause(err: BaseException) -> BaseException:
    """The worker-side exception inside a RayTaskError (Ray wraps what the actor raised)."""
    if isinstance(err, RayTaskError):
        cause = getattr(err, "cause", None)
        if isinstance(cause, BaseException):
            return cause
    return err


class WorkerPool:
    def __init__(self, config: PoolConfig, *, actor_class: Any = None) -> None:
        self.config = config
        self._actor_class = actor_class if actor_class is not None else ray.remote(WorkerActor)
        self.router = Router(
            RouterConfig(
                policy=config.policy,
                output_fraction=config.output_fraction,
                max_queued_per_worker=config.max_queued_per_worker,
                seed=config.seed,
            )
        )
        self.counters = PoolCounters()
        self._slots: dict[str, _Slot] = {}
        self._requests: dict[str, ResumeState] = {}
        self._ids = itertools.count()
        self._incarnations = itertools.count(1)
        self._tokenizer: Any = None
        self._info: dict[str, Any] | None = None
        self._num_gpus = 0.0
        self._min_workers = self._max_workers = 0
        self._autoscaler: Autoscaler | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[Any]] = set()
        # Set (and replaced by a fresh one, so that no waiter misses it) whenever a worker becomes
        # ready or dies, or a trial or an unproven attempt ends: see _notify.
        self._changed: asyncio.Event | None = None
        self._started = False
        self._draining = False
        self._closed = False
        self._creation_failures = 0
        self._start_errors: list[str] = []

    # ------------------------------------------------------------------------ lifecycle
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise RuntimeError("the pool has not been started")
        return self._tokenizer

    @property
    def max_model_len(self) -> int | None:
        return self._info["max_model_len"] if self._info else None

    async def start(self) -> None:
        """Start the workers; returns once the initial ones answer (or startup_timeout_s passes
        with at least one ready). Raises RuntimeError if none becomes ready."""
        if self._started:
            raise RuntimeError("the pool is already started")
        self._started = True
        cfg = self.config
        self._changed = asyncio.Event()
        if not ray.is_initialized():
            ray.init(address=cfg.ray_address, ignore_reinit_error=True, include_dashboard=False)
        self._tokenizer = await asyncio.to_thread(load_tokenizer, cfg.model)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        n, self._min_workers, self._max_workers = cfg.worker_counts(gpus)
        self._num_gpus = (
            cfg.num_gpus_per_worker if cfg.num_gpus_per_worker is not None else (1.0 if gpus else 0.0)
        )
        self._autoscaler = Autoscaler(cfg.autoscale, self._min_workers, self._max_workers)
        for _ in range(n):
            self._spawn(f"w{next(self._ids)}")
        deadline = time.monotonic() + cfg.startup_timeout_s
        while time.monotonic() < deadline and self._creation_failures <= 3:
            changed = self._changed
            if all(s.state != STARTING for s in self._slots.values()):
                break
            await self._wait_for(changed, min(1.0, max(0.0, deadline - time.monotonic())))
        if not any(s.state == READY for s in self._slots.values()):
            errors = list(self._start_errors)
            await self.shutdown()
            raise RuntimeError(
                f"no worker became ready within {cfg.startup_timeout_s}s"
                + (f": {errors[0]}" if errors else " (are the resources they ask for available?)")
            )
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._poll_loop(), name="pool-poll"),
            loop.create_task(self._health_loop(), name="pool-health"),
            loop.create_task(self._autoscale_loop(), name="pool-autoscale"),
        ]

    async def drain(self, timeout_s: float | None = None) -> None:
        """Refuse new requests (Draining) and wait until the in-flight ones have finished."""
        self._draining = True
        for slot in self._slots.values():
            if slot.state == READY:
                self.router.set_draining(slot.worker_id)
        live = [s for s in self._slots.values() if s.state in (READY, DRAINING)]
        results = await asyncio.gather(
            *(self._call(s.actor.drain.remote(timeout_s), timeout_s) for s in live), return_exceptions=True
        )
        for s, r in zip(live, results):
            if isinstance(r, BaseException):
                logger.warning("drain of %s failed: %r", s.worker_id, r)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._requests and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.01)

    async def shutdown(self) -> None:
        """Stop the background loops and kill every worker (in-flight streams end with errors)."""
        self._closed = True
        self._draining = True
        tasks = [*self._tasks, *self._side_tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        for slot in list(self._slots.values()):
            if slot.ready_task is not None and not slot.ready_task.done():
                slot.ready_task.cancel()
            slot.state = DEAD
            self._kill(slot)
        self._slots.clear()

    # --------------------------------------------------------------------------- status
    async def status(self, refresh_timeout_s: float = 2.0) -> list[WorkerStatus]:
        """One row per worker id: its load (a placeholder while starting), alive, restarts. The live
        workers' loads are polled first (waiting at most refresh_timeout_s; the last polled ones are
        used past it), so a status asked right after a request already counts it."""
        live = [s for s in self._slots.values() if s.state in (READY, DRAINING)]
        if live and refresh_timeout_s > 0:
            polls = asyncio.gather(*(self._poll_slot(s) for s in live), return_exceptions=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(polls, refresh_timeout_s)
        rows = []
        for wid in sorted(self._slots, key=lambda w: (len(w), w)):
            slot = self._slots[wid]
            load = slot.load or WorkerLoad(wid, 0, 0, 0, 0, 0, 0, 0, 0.0, healthy=False)
            if slot.state == DRAINING and not load.draining:
                load = dataclasses.replace(load, draining=True)
            rows.append(
                WorkerStatus(wid, load, alive=slot.state in (READY, DRAINING), restarts=slot.restarts)
            )
        return rows

    def worker_states(self) -> dict[str, str]:
        return {wid: s.state for wid, s in self._slots.items()}

    def trials(self) -> dict[str, str]:
        """Worker id -> the suspect on trial there (cluster/poison.py), for workers with one."""
        return {wid: s.trial for wid, s in self._slots.items() if s.trial is not None}

    def actor_of(self, worker_id: str) -> Any:
        """The actor handle currently serving worker_id (tests, diagnostics)."""
        return self._slots[worker_id].actor

    # ------------------------------------------------------------------------ generation
    async def generate(self, req: GenerationRequest) -> AsyncIterator[ClusterDelta]:
        """Stream the request's deltas (see the module docstring for errors and guarantees)."""
        if self._closed or self._draining or not self._started:
            raise Draining("the cluster is draining" if self._started else "the pool has not been started")
        prompt_ids = self._validate(req)
        rid = req.request_id
        state = ResumeState(rid, prompt_ids, req.sampling, self._tokenizer)
        if req.resume_token_ids:
            state.resume_from(req.resume_token_ids)
            if state.remaining < 1:  # the client has every token, only the final message was lost
                yield ClusterDelta(state.final_without_worker(FinishReason.LENGTH), "")
                return
        self._requests[rid] = state
        hashes = tuple(prefix_page_hashes(prompt_ids))
        refused: set[str] = set()  # workers that said no (draining, queue full): not failures
        errors = 0  # failed attempts whose worker stayed alive (not deaths)
        suspicion = Suspicion(self.config.poison_strikes)
        lost = False  # a worker died under this request: wait for another with retry_patience_s
        try:
            while True:
                trial = suspicion.on_trial
                slot = await self._route(state, hashes, refused, trial=trial, resumed=lost)
                prompt, sampling = state.next_attempt()
                if state.attempts > 1:
                    self.counters.retries += 1
                    if state.sent:
                        self.counters.resumes += 1
                slot.inflight.add(rid)
                slot.unproven.add(rid)
                if trial:
                    slot.trial = rid
                gen = slot.actor.generate.remote(rid, prompt, sampling)
                done = proven = False
                try:
                    async for ref in gen:
                        worker_delta = await ref
                        if not proven:
                            proven = True
                            suspicion.proven()
                            self._settle(slot, rid)
                        delta, stop_here = state.accept(worker_delta)
                        yield ClusterDelta(delta, slot.worker_id)
                        if delta.finished:
                            done = True
                            if stop_here:  # the pool ended it (stop string across a resume)
                                self._abort_on(slot, rid, gen)
                            return
                    raise RuntimeError(
                        f"worker {slot.worker_id} ended the stream of {rid!r} without a final delta"
                    )
                except (GeneratorExit, asyncio.CancelledError):
                    raise
                except Exception as err:  # noqa: BLE001 - sorted below: bad request, refusal or failure
                    cause = _cause(err)
                    if isinstance(cause, ValueError) and not isinstance(cause, RayError):
                        self.counters.rejected_invalid += 1
                        field_name = getattr(cause, "field", "prompt")
                        message = getattr(cause, "message", str(cause))
                        raise InvalidRequest(field_name, message) from None
                    if isinstance(cause, (WorkerDraining, QueueFullError)):
                        refused.add(slot.worker_id)
                        continue
                    logger.warning("request %s lost worker %s: %r", rid, slot.worker_id, cause)
                    self._worker_suspect(slot, cause)
                    if isinstance(cause, (RayActorError, WorkerFailed)) or slot.state == DEAD:
                        lost = True
                        self.counters.worker_losses += 1
                        # A worker stopped by a scale-down is nobody's fault.
                        if not slot.retired and suspicion.lost(slot.worker_id, proven=proven, trial=trial):
                            self.counters.suspected_poison += 1
                            logger.error("%s", suspicion.describe(rid))
                            raise SuspectedPoison(suspicion.describe(rid)) from None
                    else:
                        errors += 1
                        if errors > self.config.max_retries:
                            raise RequestFailed(
                                f"request {rid!r} failed on {errors} workers: {cause!r}"
                            ) from None
                    if state.remaining < 1:  # every token was sent; only the final delta was lost
                        yield ClusterDelta(state.final_without_worker(FinishReason.LENGTH), slot.worker_id)
                        return
                finally:
                    slot.inflight.discard(rid)
                    self._settle(slot, rid)
                    self.router.release(rid)
                    if not done and not state.finished:
                        self._abort_on(slot, rid, gen)
        finally:
            self._requests.pop(rid, None)

    def _validate(self, req: GenerationRequest) -> list[int]:
        def bad(field_name: str, message: str) -> InvalidRequest:
            self.counters.rejected_invalid += 1
            return InvalidRequest(field_name, message)

        if not isinstance(req.request_id, str) or not req.request_id:
            raise bad("request_id", f"must be a non-empty string, got {req.request_id!r}")
        if req.request_id in self._requests:
            raise bad("request_id", f"{req.request_id!r} is already in flight")
        if (req.prompt is None) == (req.prompt_token_ids is None):
            raise bad("prompt", "set exactly one of prompt and prompt_token_ids")
        if req.prompt is not None:
            if not isinstance(req.prompt, str) or not req.prompt:
                raise bad("prompt", "must be a non-empty string")
            ids = list(self._tokenizer.encode(req.prompt))
            if not ids:
                raise bad("prompt", "encodes to no tokens")
        else:
            try:
                ids = [int(t) for t in req.prompt_token_ids]  # type: ignore[union-attr]
            except (TypeError, ValueError):
                raise bad("prompt_token_ids", "must be a sequence of integer token ids") from None
            if not ids:
                raise bad("prompt_token_ids", "must hold at least one token id")
            vocab = self._info["vocab_size"] if self._info else None
            for i, t in enumerate(ids):
                if t < 0 or (vocab and t >= vocab):
                    raise bad(
                        "prompt_token_ids",
                        f"token id {t} at index {i} is outside the vocabulary [0, {vocab})",
                    )
        vocab = self._info["vocab_size"] if self._info else None
        resume = req.resume_token_ids
        if len(resume) > req.sampling.max_tokens:
            raise bad(
                "resume_token_ids",
                f"{len(resume)} tokens already received exceed max_tokens ({req.sampling.max_tokens})",
            )
        for i, t in enumerate(resume):
            if not isinstance(t, int) or t < 0 or (vocab and t >= vocab):
                raise bad("resume_token_ids", f"token id {t!r} at index {i} is outside the vocabulary")
        max_len = self.max_model_len
        if max_len is not None and len(ids) + req.sampling.max_tokens > max_len:
            raise bad(
                "sampling.max_tokens",
                f"prompt ({len(ids)} tokens) + max_tokens ({req.sampling.max_tokens}) exceeds the model's "
                f"context of {max_len} tokens",
            )
        return ids

    async def _route(
        self,
        state: ResumeState,
        hashes: tuple[int, ...],
        refused: set[str],
        *,
        trial: bool = False,
        resumed: bool = False,
    ) -> _Slot:
        """A ready worker for the request's next attempt, skipping those that refused it.

        With no worker to take it (all of them starting, e.g. replacements) it waits: a new
        request up to health_timeout_s, then Draining; one that has lost a worker (``resumed``) up
        to retry_patience_s, and it also waits out full queues and refusals that would fail a new
        request with QueueFull. A ``trial`` (a suspect's attempt, cluster/poison.py) only goes
        where no other suspect is on trial, and for up to TRIAL_SETTLE_S it waits for a worker on
        which no attempt is still waiting for its first delta (one that is not busy starting up
        a crowd of resumed requests), so that the trial is short and the blame is its own.
        """
        cfg = self.config
        req = RouteRequest(
            state.request_id, len(state.prompt_token_ids) + len(state.sent), max(1, state.remaining), hashes
        )
        start = time.monotonic()
        patience = cfg.retry_patience_s if resumed else cfg.health_timeout_s
        deadline = start + patience
        while True:
            if self._closed:
                raise Draining("the pool is shut down")
            changed = self._changed
            busy: set[str] = set()
            if trial:
                settle = time.monotonic() - start < TRIAL_SETTLE_S
                busy = {
                    wid for wid, s in self._slots.items() if s.trial is not None or (settle and s.unproven)
                }
            left = deadline - time.monotonic()
            try:
                decision = self.router.route(req, exclude=refused | busy)
            except NoEligibleWorker as err:
                full = isinstance(err, AllQueuesFull)
                all_refused = not full and bool(refused) and bool(self.router.eligible(exclude=busy))
                if (full or all_refused) and not resumed:
                    self.counters.rejected_queue_full += 1
                    raise QueueFull(
                        f"every worker has {cfg.max_queued_per_worker} requests queued"
                        if full
                        else "every live worker refused the request (queue full or draining)"
                    ) from None
                if left <= 0 or self._draining:
                    if resumed and not self._draining:
                        raise Draining(
                            f"no worker took request {state.request_id!r} within retry_patience_s="
                            f"{patience:g}s after it lost its worker"
                        ) from None
                    raise Draining("no live worker can take the request") from None
                if full or all_refused:  # queues drain: ask the refusing workers again shortly
                    refused.clear()
                    await asyncio.sleep(min(cfg.load_poll_interval_s, left))
                else:
                    await self._wait_for(changed, min(1.0, left))
                continue
            slot = self._slots.get(decision.worker_id)
            if slot is None or slot.state != READY:  # the router learns of it late: forget and retry
                self.router.release(state.request_id)
                self.router.remove_worker(decision.worker_id)
                continue
            self.counters.routed[(cfg.policy, slot.worker_id)] += 1
            return slot

    async def _wait_for(self, event: asyncio.Event | None, timeout_s: float) -> None:
        """Wait until `event` (a past value of self._changed) is set, at most timeout_s."""
        if event is None or timeout_s <= 0:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)

    def _notify(self) -> None:
        """Wake every waiter: set the current event and install a fresh one for the next change."""
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    def _settle(self, slot: _Slot, request_id: str) -> None:
        """The request's attempt on slot produced its first delta or ended: it no longer holds
        the slot's trial or counts as unproven there."""
        ended_trial = slot.trial == request_id
        if ended_trial:
            slot.trial = None
        settled = request_id in slot.unproven and len(slot.unproven) == 1
        slot.unproven.discard(request_id)
        if ended_trial or settled:
            self._notify()  # a waiting trial may start there now

    def _abort_on(self, slot: _Slot, request_id: str, gen: Any) -> None:
        """Free the request's pages on its worker now (fire and forget: works while cancelled)."""
        if slot.state == DEAD:
            return
        with contextlib.suppress(Exception):
            slot.actor.abort.remote(request_id)
        with contextlib.suppress(Exception):
            ray.cancel(gen)

    # ------------------------------------------------------------------------ workers
    def _spawn(self, worker_id: str, restarts: int = 0) -> _Slot:
        cfg = self.config
        engine_kwargs = dict(cfg.engine_kwargs)
        if not self._num_gpus:
            engine_kwargs.setdefault("device", "cpu")
        options: dict[str, Any] = {
            "num_cpus": cfg.num_cpus_per_worker,
            "num_gpus": self._num_gpus,
            "max_concurrency": max(1000, 4 * cfg.max_queued_per_worker),
            "max_restarts": 0,
        }
        if cfg.resources_per_worker:
            options["resources"] = dict(cfg.resources_per_worker)
        actor = self._actor_class.options(**options).remote(worker_id, cfg.model, engine_kwargs)
        slot = _Slot(worker_id, actor, next(self._incarnations), restarts=restarts)
        self._slots[worker_id] = slot
        slot.ready_task = asyncio.get_running_loop().create_task(
            self._await_ready(slot), name=f"ready-{worker_id}"
        )
        return slot

    async def _await_ready(self, slot: _Slot) -> None:
        """A new actor counts as starting until it answers info() and load()."""
        try:
            info = await slot.actor.info.remote()
            load = await slot.actor.load.remote()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - the constructor failed (bad model?) or the actor died
            self._creation_failures += 1
            self._start_errors.append(repr(_cause(err)))
            logger.error("worker %s failed to start: %r", slot.worker_id, _cause(err))
            if self._slots.get(slot.worker_id) is slot:
                self._worker_failed(slot, "failed to start", replace=self._creation_failures <= 3)
            return
        if self._slots.get(slot.worker_id) is not slot or slot.state != STARTING:
            return
        self._creation_failures = 0
        if self._info is None:
            self._info = info
        slot.load = load
        slot.last_ok = time.monotonic()
        slot.state = READY
        self.router.update_load(load)
        self._notify()
        logger.info("worker %s ready (%s)", slot.worker_id, load.device)

    def _worker_suspect(self, slot: _Slot, cause: BaseException) -> None:
        """A stream on the worker failed: dead actors are replaced now; others get health-checked."""
        if slot.state == DEAD:
            return
        if isinstance(cause, (RayActorError, WorkerFailed)):
            self._worker_failed(slot, repr(cause))
        elif self._changed is not None:
            self._background(self._check_health(slot))

    def _worker_failed(self, slot: _Slot, reason: str, replace: bool = True) -> None:
        """Kill the worker's actor, forget it in the router, start a replacement (idempotent)."""
        if slot.state == DEAD:
            return
        was_ready = slot.state in (READY, DRAINING)
        slot.state = DEAD
        self.router.remove_worker(slot.worker_id)
        self._kill(slot)
        if was_ready:
            self.counters.worker_failures += 1
            logger.warning("worker %s failed (%s); replacing it", slot.worker_id, reason)
        self._notify()
        if self._closed or slot.retired or not replace:
            if self._slots.get(slot.worker_id) is slot and (slot.retired or not replace):
                del self._slots[slot.worker_id]
            return
        self.counters.worker_restarts += 1
        self._spawn(slot.worker_id, restarts=slot.restarts + 1)

    def _background(self, coro: Any) -> None:
        """A fire-and-forget task the pool keeps a reference to (and cancels at shutdown)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    def _kill(self, slot: _Slot) -> None:
        with contextlib.suppress(Exception):
            ray.kill(slot.actor, no_restart=True)

    async def _call(self, ref: Any, timeout_s: float | None) -> Any:
        return await asyncio.wait_for(ref, timeout_s) if timeout_s is not None else await ref

    async def _check_health(self, slot: _Slot) -> None:
        cfg = self.config
        try:
            ok = await self._call(slot.actor.health.remote(cfg.health_timeout_s / 2), cfg.health_timeout_s)
        except (asyncio.TimeoutError, GetTimeoutError):
            ok = False
        except Exception:  # noqa: BLE001 - a dead actor or any Ray failure
            ok = False
        if not ok and self._slots.get(slot.worker_id) is slot:
            self._worker_failed(slot, "health check failed")

    async def _poll_slot(self, slot: _Slot) -> None:
        as_of = time.monotonic()  # the router's clock: routes before this are in the report
        try:
            load, stats = await self._call(slot.actor.report.remote(), self.config.health_timeout_s)
        except (asyncio.TimeoutError, GetTimeoutError):
            if time.monotonic() - slot.last_ok > self.config.health_timeout_s:
                self._worker_failed(slot, f"no load report for {self.config.health_timeout_s}s")
            return
        except Exception as err:  # noqa: BLE001
            if self._slots.get(slot.worker_id) is slot:
                self._worker_failed(slot, f"load report failed: {_cause(err)!r}")
            return
        if self._slots.get(slot.worker_id) is not slot or slot.state == DEAD:
            return  # replaced meanwhile
        slot.last_ok = time.monotonic()
        slot.load, slot.stats = load, stats
        seen = int(stats.get("num_preemptions", 0))
        if seen > slot.preemptions_seen:
            self.counters.preemptions[slot.worker_id] += seen - slot.preemptions_seen
        slot.preemptions_seen = seen
        self.router.update_load(load, as_of=as_of)
        if slot.state == DRAINING:
            self.router.set_draining(slot.worker_id)
        if not load.healthy:
            self._worker_failed(slot, "reported unhealthy")

    async def _poll_loop(self) -> None:
        while True:
            slots = [s for s in self._slots.values() if s.state in (READY, DRAINING)]
            await asyncio.gather(*(self._poll_slot(s) for s in slots), return_exceptions=True)
            await asyncio.sleep(self.config.load_poll_interval_s)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_check_interval_s)
            slots = [s for s in self._slots.values() if s.state in (READY, DRAINING)]
            await asyncio.gather(*(self._check_health(s) for s in slots), return_exceptions=True)

    # ------------------------------------------------------------------------ scaling
    def snapshots(self) -> list[WorkerSnapshot]:
        out = []
        for wid, s in self._slots.items():
            if s.state == DEAD:
                continue
            occ, waiting, idle = 0.0, 0, False
            if s.state == READY and wid in self.router.worker_ids:
                occ = self.router.predicted_occupancy(wid, 0)
                waiting = self.router.queue_depth(wid)
                load = s.load
                idle = not s.inflight and load is not None and load.running == 0 and load.waiting == 0
            out.append(WorkerSnapshot(wid, s.state, occ, waiting, idle))
        return out

    async def _autoscale_loop(self) -> None:
        assert self._autoscaler is not None
        while True:
            await asyncio.sleep(self.config.autoscale.interval_s)
            if self._draining or self._closed:
                continue
            decision = self._autoscaler.decide(time.monotonic(), self.snapshots())
            for _ in range(decision.add):
                logger.info("scaling up: %s", decision.reason)
                self.counters.scale_ups += 1
                self._spawn(f"w{next(self._ids)}")
            for wid in decision.drain:
                logger.info("scaling down: %s", decision.reason)
                self.counters.scale_downs += 1
                self._background(self.retire(wid))

    async def add_worker(self) -> str:
        """Start one more worker now (it counts as starting until it answers); returns its id."""
        if not self._started or self._closed:
            raise RuntimeError("the pool is not running")
        return self._spawn(f"w{next(self._ids)}").worker_id

    async def retire(self, worker_id: str, timeout_s: float | None = None) -> None:
        """Drain one worker (no new requests; in-flight ones finish), then stop it for good."""
        slot = self._slots.get(worker_id)
        if slot is None or slot.state == DEAD:
            return
        slot.retired = True
        slot.state = DRAINING
        self.router.set_draining(worker_id)
        with contextlib.suppress(Exception):
            await self._call(slot.actor.drain.remote(timeout_s), timeout_s)
        if self._slots.get(worker_id) is slot:
            slot.state = DEAD
            self.router.remove_worker(worker_id)
            self._kill(slot)
            del self._slots[worker_id]
