"""The two real `generate(request) -> Completion` callables of the batch runner.

- `grpc_backend(server, tls=...)`: through a gateway (`mlaserve serve`, plaintext or TLS) with the unary Generate RPC; gRPC
  status codes map back to the cluster's errors (RESOURCE_EXHAUSTED -> QueueFull, UNAVAILABLE ->
  Draining, INVALID_ARGUMENT -> InvalidRequest with the field the server named).
- `pool_backend(pool_config)`: an in-process WorkerPool on the Ray cluster this process joined
  (`ray job submit -- mlaserve batch --address auto ...`, or a local cluster); the pool scales its
  workers with the queue, and the job drains and shuts it down when it ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from mlaserve.cluster.batch import GenerateFn
from mlaserve.cluster.batch_records import Completion
from mlaserve.cluster.errors import Draining, InvalidRequest, QueueFull
from mlaserve.cluster.tls import ClientTLSConfig
from mlaserve.cluster.types import ClusterDelta, GenerationRequest


async def collect(deltas: AsyncIterator[ClusterDelta]) -> Completion:
    """Fold one request's delta stream into its whole answer."""
    token_ids: list[int] = []
    text: list[str] = []
    worker_id = ""
    async for cd in deltas:
        token_ids.extend(cd.delta.token_ids)
        text.append(cd.delta.text)
        worker_id = cd.worker_id or worker_id
        if cd.delta.finished:
            assert cd.delta.finish_reason is not None
            if cd.delta.usage is None:
                raise RuntimeError(f"request {cd.delta.request_id}: the final delta carries no usage")
            return Completion(
                tuple(token_ids), "".join(text), cd.delta.finish_reason, cd.delta.usage, worker_id
            )
    raise RuntimeError("the cluster's stream ended without a finish reason")


@contextlib.asynccontextmanager
async def pool_backend(pool_config: Any) -> AsyncIterator[GenerateFn]:
    """A WorkerPool started for this job (Ray must be initialised), drained and shut down after."""
    from mlaserve.cluster.pool import WorkerPool

    pool = WorkerPool(pool_config)
    await pool.start()
    try:

        async def generate(request: GenerationRequest) -> Completion:
            deltas = pool.generate(request)
            try:
                return await collect(deltas)
            finally:
                aclose = getattr(deltas, "aclose", None)
                if aclose is not None:
                    await aclose()  # aborts the request on its worker if it is still running

        yield generate
        await pool.drain()
    finally:
        await pool.shutdown()


def _error_from_rpc(error: Any) -> Exception:
    import grpc

    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return QueueFull(details)
    if code == grpc.StatusCode.UNAVAILABLE:
        return Draining(details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, sep, message = details.partition(": ")
        return (
            InvalidRequest(field, message) if sep and " " not in field else InvalidRequest("request", details)
        )
    return RuntimeError(f"{code.name}: {details}")


@contextlib.asynccontextmanager
async def grpc_backend(
    server: str,
    *,
    timeout: float | None = None,
    token: str | None = None,
    tls: ClientTLSConfig | None = None,
    connect_timeout: float = 30.0,
) -> AsyncIterator[GenerateFn]:
    """Requests through the gateway at HOST:PORT; `timeout` is each request's deadline in seconds,
    `token` the gateway's bearer token if it requires one, `tls` its TLS settings (None: plaintext)."""
    import grpc

    from mlaserve.cluster.client import DecoderClient

    async with DecoderClient(server, timeout=timeout, token=token, tls=tls) as client:
        await client.wait_ready(connect_timeout)

        async def generate(request: GenerationRequest) -> Completion:
            prompt = request.prompt if request.prompt is not None else list(request.prompt_token_ids or ())
            try:
                answer = await client.generate(
                    prompt, sampling=request.sampling, request_id=request.request_id
                )
            except grpc.aio.AioRpcError as exc:
                raise _error_from_rpc(exc) from None
            return Completion(
                answer.token_ids, answer.text, answer.finish_reason, answer.usage, answer.worker_id
            )

        yield generate
