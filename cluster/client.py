"""A small asyncio client of `mlaserve.v1.Decoder` (used by the CLI and the batch runner).

    async with DecoderClient("127.0.0.1:50051") as client:
        async for chunk in client.stream("Hello", sampling=SamplingParams(max_tokens=8)):
            print(chunk.delta.text, end="")
        answer = await client.generate("Hello", sampling=SamplingParams(max_tokens=8, temperature=0))
        print(format_status_table(await client.status()))

Over TLS: `DecoderClient(target, tls=ClientTLSConfig.from_files(ca="ca.crt"))` (cluster/tls.py; add a
client certificate for a gateway that requires one). The bearer token then travels as gRPC call
credentials, which gRPC attaches to secure channels only.

Failures raise `grpc.aio.AioRpcError` as gRPC clients expect: `.code()` is the status
(INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED, ...) and `.details()` the
server's message, which names the bad field ("sampling.top_p: must be in (0, 1], got 0").
Leaving a `stream()` early (break, aclose, task cancel) cancels the RPC, so the server aborts
the request and frees its pages.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlaserve.cluster.service import (
    delta_from_proto,
    finish_reason_from_proto,
    sampling_to_proto,
    usage_from_proto,
)
from mlaserve.cluster.tls import ClientTLSConfig
from mlaserve.cluster.types import ClusterDelta
from mlaserve.protos import decoder_pb2 as pb
from mlaserve.protos import decoder_pb2_grpc as pb_grpc
from mlaserve.worker.types import FinishReason, SamplingParams, Usage


@dataclass(frozen=True)
class Completion:
    """The whole answer to one request."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    usage: Usage
    worker_id: str


def build_request(
    prompt: str | Sequence[int],
    sampling: SamplingParams | None = None,
    request_id: str = "",
    resume_token_ids: Sequence[int] = (),
) -> pb.GenerateRequest:
    """A GenerateRequest for a text prompt or a sequence of token ids (the server validates);
    resume_token_ids: output tokens already received from another gateway (failover)."""
    msg = pb.GenerateRequest(request_id=request_id, resume_token_ids=[int(t) for t in resume_token_ids])
    if isinstance(prompt, str):
        msg.prompt = prompt
    else:
        msg.prompt_token_ids.extend(int(t) for t in prompt)
    if sampling is not None:
        msg.sampling.CopyFrom(sampling_to_proto(sampling))
    return msg


def completion_from_proto(msg: pb.GenerateResponse) -> Completion:
    reason = finish_reason_from_proto(msg.finish_reason)
    if reason is None:
        raise ValueError(f"request {msg.request_id}: the server's answer has no finish_reason")
    return Completion(
        request_id=msg.request_id,
        token_ids=tuple(msg.token_ids),
        text=msg.text,
        finish_reason=reason,
        usage=usage_from_proto(msg.usage),
        worker_id=msg.worker_id,
    )


class DecoderClient:
    """One channel to a gateway. Use as `async with`, or call `close()`."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        token: str | None = None,
        tls: ClientTLSConfig | None = None,
        max_message_bytes: int = 4 << 20,
    ) -> None:
        """`target` is HOST:PORT; `timeout` the default deadline of each RPC in seconds; `token` the
        server's bearer token, if it requires one; `tls` the TLS settings (None: plaintext)."""
        if not target or ":" not in target:
            raise ValueError(f"server address must be HOST:PORT, got {target!r}")
        self.target = target
        self.timeout = timeout
        self.tls = tls
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls is None:
            self._metadata = (("authorization", f"Bearer {token}"),) if token else None
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:  # the token rides on the channel's call credentials
            self._metadata = None
            self._channel = grpc.aio.secure_channel(
                target, tls.channel_credentials(token), options=options + tls.channel_options()
            )
        self._stub = pb_grpc.DecoderStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> DecoderClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the channel connects; TimeoutError naming the address otherwise."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except asyncio.TimeoutError as e:
            hint = (
                " (or its TLS handshake failed: check --tls-ca, and --tls-cert/--tls-key where it "
                "requires client certificates)"
                if self.tls is not None
                else " (or it serves TLS only: see --tls-ca)"
            )
            raise TimeoutError(
                f"no mlaserve server answered at {self.target} within {timeout:.0f} s{hint}"
            ) from e

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def stream(
        self,
        prompt: str | Sequence[int],
        *,
        sampling: SamplingParams | None = None,
        request_id: str = "",
        timeout: float | None = None,
        resume_token_ids: Sequence[int] = (),
    ) -> AsyncIterator[ClusterDelta]:
        """Stream the answer's deltas; the last one carries finish_reason and usage. With
        resume_token_ids the stream continues after those output tokens (failover)."""
        call = self._stub.Generate(
            build_request(prompt, sampling, request_id, resume_token_ids),
            timeout=self._deadline(timeout),
            metadata=self._metadata,
        )
        try:
            async for msg in call:
                yield delta_from_proto(msg)
        finally:
            call.cancel()  # no-op once the RPC has finished

    async def generate(
        self,
        prompt: str | Sequence[int],
        *,
        sampling: SamplingParams | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> Completion:
        """The whole answer in one unary RPC."""
        msg = await self._stub.GenerateUnary(
            build_request(prompt, sampling, request_id),
            timeout=self._deadline(timeout),
            metadata=self._metadata,
        )
        return completion_from_proto(msg)

    async def status(self, timeout: float | None = None) -> pb.ClusterStatus:
        return await self._stub.GetClusterStatus(
            pb.ClusterStatusRequest(), timeout=self._deadline(timeout), metadata=self._metadata
        )

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        """The grpc.health.v1 status name ("SERVING", "NOT_SERVING", ...) of `service` ("" = server)."""
        resp = await self._health.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self._deadline(timeout)
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def rpc_error_hint(error: grpc.aio.AioRpcError, tls: ClientTLSConfig | None) -> str:
    """A hint for an RPC that failed before reaching the server (UNAVAILABLE), where TLS may be why."""
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return ""
    details = error.details() or ""
    if tls is not None and ("handshake" in details.lower() or "socket closed" in details.lower()):
        return (
            " (the TLS handshake failed: does --tls-ca hold the CA of the server's certificate, and "
            "does the server want a client certificate, --tls-cert/--tls-key?)"
        )
    if tls is None and "socket closed" in details.lower():
        return " (a server that speaks TLS closes plaintext connections: see --tls-ca)"
    return ""


def format_status_table(status: pb.ClusterStatus) -> str:
    """A plain-text table of the cluster's workers, with a totals line."""
    header = ("WORKER", "DEVICE", "HEALTH", "PAGES USED/TOTAL", "OCC", "RUN", "WAIT", "TOK/S", "RESTARTS")
    rows = [
        (
            w.worker_id,
            w.device,
            w.health,
            f"{w.used_pages}/{w.total_pages}",
            f"{100 * w.occupancy:.1f}%",
            str(w.running),
            str(w.waiting),
            f"{w.tokens_per_s:.1f}",
            str(w.restarts),
        )
        for w in status.workers
    ]
    rows.append(
        (
            f"total ({len(status.workers)})",
            "",
            "serving" if status.serving else "draining",
            f"{status.used_pages}/{status.total_pages}",
            f"{100 * status.occupancy:.1f}%",
            str(status.running),
            str(status.waiting),
            f"{status.tokens_per_s:.1f}",
            "",
        )
    )
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    numeric = {3, 4, 5, 6, 7, 8}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(wd) if i in numeric else c.ljust(wd) for i, (c, wd) in enumerate(zip(cells, widths))
        ).rstrip()

    sep = "  ".join("-" * wd for wd in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows[:-1]), sep, line(rows[-1])])
