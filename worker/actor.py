"""WorkerActor: the Ray shell around one Engine (one per GPU, or one per CPU slot without GPUs).

    actor = ray.remote(WorkerActor).options(num_gpus=1).remote("w0", "deepseek-v2-lite", {})
    async for ref in actor.generate.remote("r1", [1, 2, 3], SamplingParams(max_tokens=8)):
        delta = await ref                                         # RequestDelta, last one finished

The engine is single-threaded, so every engine call (add_request, abort, step, load) runs on one
dedicated thread, in the order it was submitted; the asyncio event loop only queues work to it
and routes deltas, so load reports and new requests are answered while a step runs.

A background task steps the engine while it has work and sleeps otherwise. `generate` is a Ray
streaming generator: it queues the request, then yields each RequestDelta the steps produce for
it. If the caller goes away (the generator task is cancelled or closed before the final delta),
the request is aborted at once and its pages freed; `abort` does the same by request id.

Errors: a bad request raises BadRequest (the engine's RequestError, a ValueError naming the
field, made picklable) from `generate` and touches nothing else; WorkerDraining when the worker admits no more requests;
WorkerFailed when an engine step raised (every stream then ends with it, and `health()` turns
False so the pool replaces the actor). The class itself does not need Ray: tests drive it
directly on an event loop, with a real or a fake engine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

from .errors import RequestError
from .load import WorkerLoad
from .types import RequestDelta, SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")


class WorkerDraining(RuntimeError):
    """The worker is draining (or stopped): it admits no new request. Route it elsewhere."""


class WorkerFailed(RuntimeError):
    """The engine failed while stepping; this worker's in-flight requests cannot finish here."""


class BadRequest(RequestError):
    """The engine's RequestError in a form that pickles (it crosses the Ray boundary)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.field, self.message))


def build_engine(model: str, engine_kwargs: dict[str, Any]) -> Any:
    """Engine.from_pretrained(model, **engine_kwargs); imported here so torch loads in the actor only."""
    from .engine import Engine

    return Engine.from_pretrained(model, **engine_kwargs)


def merge_deltas(first: RequestDelta, then: RequestDelta) -> RequestDelta:
    """One delta for two consecutive ones of a request (tokens and text joined; the later end)."""
    return RequestDelta(
        first.request_id,
        first.token_ids + then.token_ids,
        first.text + then.text,
        finish_reason=then.finish_reason,
        usage=then.usage,
    )


class WorkerActor:
    """See the module docstring. Ray: `ray.remote(WorkerActor)` (an async actor)."""

    def __init__(
        self,
        worker_id: str,
        model: str,
        engine_kwargs: dict[str, Any] | None = None,
        *,
        engine_factory: Callable[[str, dict[str, Any]], Any] = build_engine,
    ) -> None:
        if not isinstance(worker_id, str) or not worker_id:
            raise ValueError(f"worker_id must be a non-empty string, got {worker_id!r}")
        self.worker_id = worker_id
        self.model = model
        self._engine = engine_factory(model, dict(engine_kwargs or {}))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{worker_id}")
        self._streams: dict[str, asyncio.Queue[RequestDelta | BaseException]] = {}
        self._load_seq = itertools.count(1)
        self._draining = False
        self._failure: BaseException | None = None
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._started_at = time.monotonic()
        self._calls_submitted = 0  # engine calls queued (event loop thread) ...
        self._calls_started = 0  # ... and started (engine thread): steps yield to the difference
        self.num_requests = 0  # requests accepted over the actor's life

    # ------------------------------------------------------------------------------ plumbing
    def _ensure_started(self) -> None:
        """Start the step loop on first use (``__init__`` runs outside the actor's event loop)."""
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._idle = asyncio.Event()
            self._idle.set()
            self._loop_task = asyncio.get_running_loop().create_task(
                self._step_loop(), name=f"steps-{self.worker_id}"
            )

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run an engine call on the engine thread (calls run one at a time, in submission order)."""
        return await asyncio.wrap_future(self._submit(fn, *args))

    def _submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue an engine call; a running batch of steps stops for it after its current step."""
        self._calls_submitted += 1  # only this (the event loop's) thread writes it

        def run() -> T:
            self._calls_started += 1  # only the engine thread writes it
            return fn(*args)

        return self._executor.submit(run)

    def _run_steps(self, loop: asyncio.AbstractEventLoop) -> bool:
        """On the engine thread: steps back to back while there is work and no other engine call
        waits, handing each step's deltas to the event loop without waiting for it (the streams'
        Ray yields then never delay the next step). True if it stepped at all."""
        stepped = False
        while self._engine.has_unfinished():
            deltas = self._engine.step()
            stepped = True
            if deltas:
                loop.call_soon_threadsafe(self._dispatch, deltas)
            if self._calls_started != self._calls_submitted:  # another call waits: it goes between two steps
                break
        return stepped

    def _dispatch(self, deltas: list[RequestDelta]) -> None:
        for delta in deltas:
            queue = self._streams.get(delta.request_id)
            if queue is not None:
                queue.put_nowait(delta)

    async def _step_loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()  # before looking for work: a request queued after the look sets it again
            try:
                stepped = await loop.run_in_executor(self._executor, self._run_steps, loop)
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - any engine failure ends every stream here
                logger.exception("worker %s: engine step failed", self.worker_id)
                self._failure = e
                err = WorkerFailed(f"worker {self.worker_id}: engine step failed: {e!r}")
                # after the deltas already handed over (call_soon_threadsafe keeps their order)
                loop.call_soon(self._fail_streams, err)
                return
            if not stepped:
                await self._wake.wait()
                continue
            await asyncio.sleep(0)  # let the streams forward what the steps produced

    def _fail_streams(self, err: BaseException) -> None:
        for stream in self._streams.values():
            stream.put_nowait(err)

    # ---------------------------------------------------------------------------- requests
    async def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams
    ) -> AsyncIterator[RequestDelta]:
        """Stream the request's RequestDeltas; the last one carries finish_reason and usage."""
        self._ensure_started()
        assert self._wake is not None and self._idle is not None
        if self._failure is not None:
            raise WorkerFailed(f"worker {self.worker_id} has failed: {self._failure!r}")
        if self._draining:
            raise WorkerDraining(f"worker {self.worker_id} is draining")
        if not isinstance(request_id, str) or not request_id:
            raise BadRequest("request_id", f"must be a non-empty string, got {request_id!r}")
        if request_id in self._streams:
            raise BadRequest("request_id", f"{request_id!r} is already running on worker {self.worker_id}")
        queue: asyncio.Queue[RequestDelta | BaseException] = asyncio.Queue()
        self._streams[request_id] = queue
        self._idle.clear()
        finished = False
        try:
            try:
                await self._call(self._engine.add_request, request_id, list(prompt_token_ids), sampling)
            except RequestError as e:
                raise BadRequest(e.field, e.message) from None
            self.num_requests += 1
            self._wake.set()
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                # Deltas that queued up while the last one was in transit travel as one.
                while not item.finished and not queue.empty():
                    more = queue.get_nowait()
                    if isinstance(more, BaseException):
                        yield item
                        raise more
                    item = merge_deltas(item, more)
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished and self._failure is None:
                # The caller left early (cancelled or closed), possibly while add_request was still
                # running on the engine thread: free the pages now. Submitted, not awaited, so it
                # also runs while this task is being cancelled (unknown ids are a no-op).
                self._submit(self._engine.abort, request_id)
                self._wake.set()
            if not self._streams:
                self._idle.set()

    async def abort(self, request_id: str) -> bool:
        """Abort a request by id (frees its pages); its stream ends with finish_reason ABORT."""
        self._ensure_started()
        assert self._wake is not None
        if self._failure is not None:
            return False
        found = await self._call(self._engine.abort, request_id)
        self._wake.set()
        return bool(found)

    # ------------------------------------------------------------------------------- state
    async def load(self) -> WorkerLoad:
        """The engine's WorkerLoad with this worker's id, a monotonic seq, health and draining."""
        self._ensure_started()
        seq = next(self._load_seq)
        if self._failure is not None:
            return self._failed_load(seq)
        try:
            load = await self._call(self._engine.load, self.worker_id, seq)
        except Exception:  # noqa: BLE001 - a failing load() means an unhealthy worker, not a dead actor
            logger.exception("worker %s: load() failed", self.worker_id)
            return self._failed_load(seq)
        return replace(load, worker_id=self.worker_id, seq=seq, healthy=True, draining=self._draining)

    def _failed_load(self, seq: int) -> WorkerLoad:
        return WorkerLoad(self.worker_id, seq, 0, 0, 0, 0, 0, 0, 0.0, healthy=False, draining=self._draining)

    async def report(self) -> tuple[WorkerLoad, dict[str, Any]]:
        """load() plus counters the pool's metrics read (one round trip)."""
        load = await self.load()
        return load, self.stats()

    def stats(self) -> dict[str, Any]:
        engine = self._engine
        return {
            "num_preemptions": int(getattr(engine, "num_preemptions", 0)),
            "num_steps": int(getattr(engine, "num_steps", 0)),
            "num_generated_tokens": int(getattr(engine, "num_generated_tokens", 0)),
            "num_requests": self.num_requests,
            "streams": len(self._streams),
            "uptime_s": time.monotonic() - self._started_at,
            "failed": self._failure is not None,
        }

    async def info(self) -> dict[str, Any]:
        """Static facts the pool validates requests against."""
        engine = self._engine
        tok = engine.tokenizer
        return {
            "worker_id": self.worker_id,
            "model": self.model,
            "max_model_len": int(engine.max_model_len),
            "vocab_size": int(getattr(engine, "vocab_size", getattr(tok, "vocab_size", 0))),
            "num_pages": int(getattr(engine, "num_pages", 0)),
            "eos_token_id": getattr(tok, "eos_token_id", None),
        }

    async def health(self, timeout_s: float = 5.0) -> bool:
        """True when no step has failed and the engine thread answers within timeout_s."""
        self._ensure_started()
        if self._failure is not None or (self._loop_task is not None and self._loop_task.done()):
            return False
        try:
            await asyncio.wait_for(self._call(lambda: None), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Stop admitting; wait until every in-flight request has finished. False on timeout."""
        self._ensure_started()
        assert self._idle is not None
        self._draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def undrain(self) -> None:
        """Admit requests again (a drain the pool called off)."""
        self._draining = False

    def __repr__(self) -> str:
        return f"WorkerActor({self.worker_id!r}, {self.model!r})"
