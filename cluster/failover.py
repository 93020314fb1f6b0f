"""Streams that outlive their gateway: on a lost gateway, ask another one to continue.

    clients = [DecoderClient("gw-a:50051"), DecoderClient("gw-b:50051")]  # or one L4 balancer address
    async for chunk in failover_stream(clients, "Hello", sampling=SamplingParams(max_tokens=64, temperature=0)):
        print(chunk.delta.text, end="")

When a stream breaks with UNAVAILABLE (the gateway process died, it is draining, or it found no
live worker for the request) or is cancelled from the server's side (a gateway stopping), the
request is sent again to the next client in the list (round robin: with a single load-balancer
address, the balancer picks a live gateway) with GenerateRequest.resume_token_ids set to the
output tokens received so far, and the stream goes on from there: the caller sees every token
once, a greedy request exactly as an uninterrupted one, and usage counts every token
(docs/high-availability.md). Other status codes (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, INTERNAL
for a request suspected of crashing workers, DEADLINE_EXCEEDED, ...) are raised as they are,
like DecoderClient's. Each attempt carries its own request id (``<id>~<n>``, so that a gateway
still tearing down the broken RPC cannot refuse it as a duplicate); the deltas handed to the
caller carry the original one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import grpc

from mlaserve.cluster.client import DecoderClient
from mlaserve.cluster.types import ClusterDelta
from mlaserve.worker.types import SamplingParams

FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


class FailoverExhausted(RuntimeError):
    """Every attempt failed with a failover code; ``errors`` holds them in order."""

    def __init__(self, message: str, errors: list[grpc.aio.AioRpcError]) -> None:
        super().__init__(message)
        self.errors = errors


async def failover_stream(
    clients: Sequence[DecoderClient],
    prompt: str | Sequence[int],
    *,
    sampling: SamplingParams | None = None,
    request_id: str = "",
    timeout: float | None = None,
    max_failovers: int = 8,
    backoff_s: float = 0.2,
    max_backoff_s: float = 5.0,
) -> AsyncIterator[ClusterDelta]:
    """Stream one request's deltas across ``clients`` (see the module docstring).

    ``timeout`` bounds the whole request, failovers included; ``max_failovers`` the attempts
    after the first; between attempts the wait doubles from ``backoff_s`` up to ``max_backoff_s``
    (a gateway that is coming back, or a balancer that has not yet seen one go).
    """
    if not clients:
        raise ValueError("failover_stream needs at least one client")
    if max_failovers < 0:
        raise ValueError(f"max_failovers must be >= 0, got {max_failovers!r}")
    rid = request_id or f"req-{uuid.uuid4().hex}"
    deadline = None if timeout is None else time.monotonic() + timeout
    received: list[int] = []
    errors: list[grpc.aio.AioRpcError] = []
    wait = backoff_s
    for attempt in range(max_failovers + 1):
        client = clients[attempt % len(clients)]
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        stream = client.stream(
            prompt,
            sampling=sampling,
            request_id=rid if attempt == 0 else f"{rid}~{attempt}",
            timeout=left,
            resume_token_ids=list(received),
        )
        try:
            async for cd in stream:
                received.extend(cd.delta.token_ids)
                yield dataclasses.replace(cd, delta=dataclasses.replace(cd.delta, request_id=rid))
                if cd.delta.finished:
                    return
            raise RuntimeError(f"request {rid}: {client.target} ended the stream without a finish reason")
        except grpc.aio.AioRpcError as err:
            if err.code() not in FAILOVER_CODES:
                raise
            errors.append(err)
        finally:
            await stream.aclose()  # cancels the RPC if it is still open (the caller left early)
        if attempt == max_failovers:
            break
        pause = wait if deadline is None else min(wait, max(0.0, deadline - time.monotonic()))
        await asyncio.sleep(pause)
        wait = min(2 * wait, max_backoff_s)
    raise FailoverExhausted(
        f"request {rid}: {len(errors)} attempts over {len(clients)} gateway(s) failed, the last with "
        f"{errors[-1].code().name}: {errors[-1].details()}",
        errors,
    )
