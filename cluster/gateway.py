"""The transport-neutral half of the gateway: what the gRPC servicer and the OpenAI HTTP API share.

One `GatewayCore` per gateway process sits in front of the pool. Both transports call it with
domain types (GenerationRequest in, ClusterDelta out) and map its errors to their own status
codes, so they enforce the same guarantees on the same pool and router:

- `authorize(value)`: the bearer token (constant-time compare), `Unauthenticated` otherwise;
- `admit()`: `Draining` once the server drains (in-flight requests finish, new ones are refused);
- `generate(req)`: the pool's stream with the request metrics (TTFT, inter-token latency,
  tokens, finish reasons) and the in-flight count that `wait_idle()` waits on. Closing the stream
  early (the client went away, its deadline passed, its task was cancelled) closes the pool's
  stream, which aborts the request on its worker and frees its pages at once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Protocol

from mlaserve.cluster.errors import ClusterError, Draining
from mlaserve.cluster.metrics import GatewayMetrics, PoolCounterSnapshot
from mlaserve.cluster.types import ClusterDelta, GenerationRequest, WorkerStatus
from mlaserve.cluster.validation import ServiceLimits, Tokenizer

log = logging.getLogger(__name__)


class Pool(Protocol):
    """The part of the WorkerPool API the gateway uses."""

    def generate(self, req: GenerationRequest) -> AsyncIterator[ClusterDelta]: ...

    async def status(self) -> list[WorkerStatus]: ...


class Unauthenticated(ClusterError):
    """A request without the server's bearer token (gRPC UNAUTHENTICATED, HTTP 401)."""


def pool_counters(pool: Any) -> PoolCounterSnapshot:
    """A copy of the pool's cumulative counters (`pool.counters`) for the metrics."""
    return PoolCounterSnapshot.of(getattr(pool, "counters", None))


async def _aclose(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


class GatewayCore:
    """Auth, admission, in-flight accounting and request metrics over one pool."""

    def __init__(
        self,
        pool: Pool,
        limits: ServiceLimits | None = None,
        metrics: GatewayMetrics | None = None,
        auth_token: str | None = None,
    ) -> None:
        self.pool = pool
        self.limits = limits or ServiceLimits()
        self.metrics = metrics or GatewayMetrics()
        self._expected_auth = f"Bearer {auth_token}".encode() if auth_token else None
        self.draining = False  # set by the server: new requests are refused, running ones finish
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def auth_required(self) -> bool:
        return self._expected_auth is not None

    @property
    def active_requests(self) -> int:
        """Generation requests in progress (every transport)."""
        return self._active

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no generation request is in progress; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def authorize(self, authorization: str | bytes | None, where: str) -> None:
        """Check an `authorization` value ("Bearer <token>"); `where` tells the client how to send it."""
        if self._expected_auth is None:
            return
        sent = authorization or ""
        if isinstance(sent, bytes):
            sent = sent.decode("latin-1")
        if not hmac.compare_digest(sent.encode("utf-8", "replace"), self._expected_auth):
            raise Unauthenticated(f"missing or wrong bearer token ({where} 'authorization: Bearer <token>')")

    def admit(self) -> None:
        """Draining once the server drains (checked again when the generation starts)."""
        if self.draining:
            raise Draining("the server is draining: send new requests to another replica")

    def tokenizer(self) -> Tokenizer | None:
        """The pool's tokenizer, or None where it has none (yet)."""
        try:
            return getattr(self.pool, "tokenizer", None)
        except Exception:  # noqa: BLE001 - a pool without a loaded tokenizer: skip the exact count
            return None

    async def status(self) -> list[WorkerStatus]:
        """Every worker's status (and the metrics' cluster snapshot refreshed from it)."""
        statuses = await self.pool.status()
        self.metrics.update_cluster(statuses, pool_counters(self.pool))
        return statuses

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[ClusterDelta, None]:
        """The request's deltas; the last one is finished (finish_reason and usage set).

        Raises the pool's ClusterErrors (InvalidRequest, QueueFull, Draining) before the first
        delta, and RuntimeError if the pool's stream ends without a finished delta.
        """
        self._active += 1
        self._idle.clear()
        tracker = None
        deltas = None
        try:
            self.admit()
            tracker = self.metrics.request_tracker()
            deltas = self.pool.generate(req)
            async for cd in deltas:
                d = cd.delta
                tracker.tokens(len(d.token_ids))
                if d.finished:
                    usage = d.usage
                    tracker.finish(
                        d.finish_reason.value if d.finish_reason else None,
                        prompt_tokens=usage.prompt_tokens if usage else 0,
                        cached_tokens=usage.cached_tokens if usage else 0,
                    )
                yield cd
                if d.finished:
                    return
            raise RuntimeError(
                f"request {req.request_id}: the cluster's stream ended without a finish reason"
            )
        finally:
            try:
                # Closing the pool's stream aborts the request on its worker if it is still running
                # (client gone, deadline, an error), so its pages are freed at once.
                if deltas is not None:
                    await _aclose(deltas)
            finally:
                if tracker is not None:
                    tracker.close()
                self._active -= 1
                if self._active == 0:
                    self._idle.set()
