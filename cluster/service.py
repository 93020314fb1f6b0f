"""The gRPC edge: proto messages <-> domain types, and the `mlaserve.v1.Decoder` servicer.

Conversions validate every field of a request against `ServiceLimits` (the checks live in
cluster/validation.py, shared with the HTTP API) and raise `InvalidRequest(field, message)` naming
the field as the client spelled it ("sampling.top_p: must be in (0, 1], got 0"). The servicer runs
requests through the gateway's transport-neutral core (cluster/gateway.py: auth, draining, metrics,
in-flight accounting) and maps the cluster's errors to status codes (InvalidRequest ->
INVALID_ARGUMENT, QueueFull -> RESOURCE_EXHAUSTED, Draining -> UNAVAILABLE, a missing bearer token
-> UNAUTHENTICATED, SuspectedPoison -> INTERNAL with its own message, anything else -> INTERNAL).
It ties the request's life to the RPC: when the client cancels or its deadline passes, grpc.aio
cancels the handler task, and the `finally` below closes the stream, which aborts the request on
its worker and frees its pages.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence

import grpc

from mlaserve.cluster.errors import ClusterError, Draining, InvalidRequest, QueueFull, SuspectedPoison
from mlaserve.cluster.gateway import GatewayCore, Pool, Unauthenticated, pool_counters
from mlaserve.cluster.metrics import GatewayMetrics, worker_health
from mlaserve.cluster.types import ClusterDelta, GenerationRequest, WorkerStatus
from mlaserve.cluster.validation import (
    ServiceLimits,
    Tokenizer,
    check_prompt_ids,
    check_prompt_text,
    check_request_id,
    check_sampling,
)
from mlaserve.protos import decoder_pb2 as pb
from mlaserve.protos import decoder_pb2_grpc as pb_grpc
from mlaserve.worker.types import FinishReason, RequestDelta, SamplingParams, Usage

__all__ = [  # ServiceLimits, Tokenizer, Pool, Unauthenticated and pool_counters live on beside the servicer
    "SERVICE_NAME",
    "DecoderService",
    "Pool",
    "ServiceLimits",
    "Tokenizer",
    "Unauthenticated",
    "pool_counters",
]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Decoder"].full_name  # "mlaserve.v1.Decoder"
_SAMPLING_DEFAULTS = SamplingParams()


# -- proto -> domain ------------------------------------------------------------------------------


def sampling_from_proto(
    msg: pb.SamplingParams, limits: ServiceLimits, field: str = "sampling"
) -> SamplingParams:
    """Validate and convert; unset optional fields take SamplingParams' defaults."""
    d = _SAMPLING_DEFAULTS
    return check_sampling(
        limits,
        max_tokens=int(msg.max_tokens) if msg.HasField("max_tokens") else d.max_tokens,
        temperature=float(msg.temperature) if msg.HasField("temperature") else d.temperature,
        top_p=float(msg.top_p) if msg.HasField("top_p") else d.top_p,
        top_k=int(msg.top_k),
        seed=int(msg.seed) if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=bool(msg.ignore_eos),
        prefix=f"{field}.",
    )


def request_from_proto(
    msg: pb.GenerateRequest,
    limits: ServiceLimits,
    tokenizer: Tokenizer | None = None,
    new_request_id: Callable[[], str] = lambda: f"req-{uuid.uuid4().hex}",
) -> GenerationRequest:
    """Validate a GenerateRequest and convert it; a missing request_id gets a fresh one.

    A text prompt is passed on as text (the pool tokenizes it once). Its token count can exceed
    max_prompt_tokens only if its UTF-8 length does (every token covers at least one byte; +2
    for special tokens), so only such long prompts are tokenized here to check the limit.
    """
    request_id = check_request_id(msg.request_id or new_request_id(), limits)
    sampling = sampling_from_proto(msg.sampling, limits)
    resume = tuple(msg.resume_token_ids)
    if len(resume) > sampling.max_tokens:
        raise InvalidRequest(
            "resume_token_ids",
            f"{len(resume)} tokens already received exceed sampling.max_tokens ({sampling.max_tokens})",
        )
    for i, t in enumerate(resume):
        if t < 0:
            raise InvalidRequest(f"resume_token_ids[{i}]", f"must be a token id >= 0, got {t}")
    text, ids = msg.prompt, msg.prompt_token_ids
    if text and ids:
        raise InvalidRequest("prompt", "set exactly one of prompt / prompt_token_ids, not both")
    if ids:
        return GenerationRequest(
            request_id=request_id,
            sampling=sampling,
            prompt_token_ids=check_prompt_ids(ids, limits),
            resume_token_ids=resume,
        )
    if not text:
        raise InvalidRequest("prompt", "empty: set prompt (text) or prompt_token_ids")
    text = check_prompt_text(text, limits, tokenizer)
    return GenerationRequest(request_id=request_id, sampling=sampling, prompt=text, resume_token_ids=resume)


def sampling_to_proto(s: SamplingParams) -> pb.SamplingParams:
    """The inverse of sampling_from_proto (sets every field explicitly)."""
    msg = pb.SamplingParams(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        stop=list(s.stop),
        stop_token_ids=list(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
    )
    if s.seed is not None:
        msg.seed = s.seed
    return msg


def request_to_proto(req: GenerationRequest) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(request_id=req.request_id, sampling=sampling_to_proto(req.sampling))
    if req.prompt_token_ids is not None:
        msg.prompt_token_ids.extend(req.prompt_token_ids)
    else:
        msg.prompt = req.prompt or ""
    msg.resume_token_ids.extend(req.resume_token_ids)
    return msg


# -- domain -> proto ------------------------------------------------------------------------------


def usage_to_proto(u: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, cached_tokens=u.cached_tokens
    )


def usage_from_proto(u: pb.Usage) -> Usage:
    return Usage(
        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, cached_tokens=u.cached_tokens
    )


def finish_reason_from_proto(reason: str) -> FinishReason | None:
    if not reason:
        return None
    try:
        return FinishReason(reason)
    except ValueError as e:
        raise ValueError(f"finish_reason: unknown value {reason!r}") from e


def delta_to_proto(cd: ClusterDelta) -> pb.GenerateResponse:
    d = cd.delta
    msg = pb.GenerateResponse(
        token_ids=list(d.token_ids), text=d.text, worker_id=cd.worker_id, request_id=d.request_id
    )
    if d.finish_reason is not None:
        msg.finish_reason = d.finish_reason.value
    if d.usage is not None:
        msg.usage.CopyFrom(usage_to_proto(d.usage))
    return msg


def delta_from_proto(msg: pb.GenerateResponse) -> ClusterDelta:
    """A streamed GenerateResponse as the domain delta (client side)."""
    return ClusterDelta(
        delta=RequestDelta(
            request_id=msg.request_id,
            token_ids=tuple(msg.token_ids),
            text=msg.text,
            finish_reason=finish_reason_from_proto(msg.finish_reason),
            usage=usage_from_proto(msg.usage) if msg.HasField("usage") else None,
        ),
        worker_id=msg.worker_id,
    )


def worker_status_to_proto(s: WorkerStatus) -> pb.WorkerStatus:
    load = s.load
    return pb.WorkerStatus(
        worker_id=s.worker_id,
        device=load.device,
        total_pages=load.total_pages,
        used_pages=load.used_pages,
        free_pages=load.free_pages,
        reserved_pages=load.reserved_pages,
        occupancy=load.occupancy,
        running=load.running,
        waiting=load.waiting,
        queued_prompt_tokens=load.queued_prompt_tokens,
        tokens_per_s=load.tokens_per_s,
        health=worker_health(s),
        alive=s.alive,
        restarts=s.restarts,
        page_size=load.page_size,
        cached_pages=len(load.cached_page_hashes),
    )


def cluster_status_to_proto(statuses: Sequence[WorkerStatus], serving: bool) -> pb.ClusterStatus:
    live = [s for s in statuses if s.alive]
    total = sum(s.load.total_pages for s in live)
    used = sum(s.load.used_pages for s in live)
    return pb.ClusterStatus(
        workers=[worker_status_to_proto(s) for s in statuses],
        total_pages=total,
        used_pages=used,
        occupancy=used / total if total else 0.0,
        running=sum(s.load.running for s in live),
        waiting=sum(s.load.waiting for s in live),
        tokens_per_s=sum(s.load.tokens_per_s for s in live),
        serving=serving,
    )


class _Accumulator:
    """Folds a request's deltas into the one GenerateResponse of GenerateUnary."""

    def __init__(self, request_id: str) -> None:
        self.msg = pb.GenerateResponse(request_id=request_id)
        self._text: list[str] = []

    def add(self, cd: ClusterDelta) -> None:
        d = cd.delta
        self.msg.token_ids.extend(d.token_ids)
        self._text.append(d.text)
        self.msg.worker_id = cd.worker_id
        if d.finish_reason is not None:
            self.msg.finish_reason = d.finish_reason.value
        if d.usage is not None:
            self.msg.usage.CopyFrom(usage_to_proto(d.usage))

    def result(self) -> pb.GenerateResponse:
        self.msg.text = "".join(self._text)
        return self.msg


# -- the servicer ---------------------------------------------------------------------------------


_ERROR_CODES: tuple[tuple[type[ClusterError], grpc.StatusCode], ...] = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Draining, grpc.StatusCode.UNAVAILABLE),
    (SuspectedPoison, grpc.StatusCode.INTERNAL),  # the request crashes workers: not to be retried
)


# A client whose deadline passes cancels its call, and that cancel can reach the server before the
# server's copy of the deadline passes: the server's deadline started when the grpc-timeout header
# arrived, a little after the client's did, and its clock is not the client's. A cancel this close
# to the deadline is counted as the deadline's.
DEADLINE_SLACK_S = 0.1


def cancellation_code(time_remaining: float | None) -> grpc.StatusCode:
    """The status of a cancelled RPC: DEADLINE_EXCEEDED at (or within the slack of) its deadline."""
    if time_remaining is not None and time_remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def status_code_for(error: BaseException) -> grpc.StatusCode:
    for cls, code in _ERROR_CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


class DecoderService(pb_grpc.DecoderServicer):
    """mlaserve.v1.Decoder over a WorkerPool, through the gateway's transport-neutral core.

    With `auth_token` set, every Decoder RPC must carry the metadata
    `authorization: Bearer <token>` (health and reflection stay open). `core` is shared with the
    HTTP API when the server runs one (cluster/openai_http.py).
    """

    def __init__(
        self,
        pool: Pool,
        limits: ServiceLimits | None = None,
        metrics: GatewayMetrics | None = None,
        auth_token: str | None = None,
    ) -> None:
        self.core = GatewayCore(pool, limits, metrics, auth_token)
        self.limits = self.core.limits
        self.metrics = self.core.metrics

    @property
    def draining(self) -> bool:
        """Set by the server: new requests get UNAVAILABLE, running ones finish (both transports)."""
        return self.core.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.core.draining = value

    @property
    def active_requests(self) -> int:
        """Generation requests in progress (gRPC and HTTP)."""
        return self.core.active_requests

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no generation request is in progress; False if `timeout` passed first."""
        return await self.core.wait_idle(timeout)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        await self._generate(request, context, "Generate", stream=True)

    async def GenerateUnary(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        result = await self._generate(request, context, "GenerateUnary", stream=False)
        assert result is not None
        return result

    async def GetClusterStatus(
        self, request: pb.ClusterStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClusterStatus:
        try:
            self._authorize(context)
            statuses = await self.core.status()
        except Exception as e:  # noqa: BLE001 - reported to the client as a status code
            code = status_code_for(e)
            self.metrics.record_rpc("GetClusterStatus", code.name)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("GetClusterStatus failed")
            await context.abort(code, str(e) if isinstance(e, ClusterError) else f"cluster status: {e}")
        self.metrics.record_rpc("GetClusterStatus", "OK")
        return cluster_status_to_proto(statuses, serving=not self.draining)

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        sent = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                sent = value
        self.core.authorize(sent, "metadata")

    async def _generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, method: str, stream: bool
    ) -> pb.GenerateResponse | None:
        code = grpc.StatusCode.OK
        request_id = ""
        try:
            self._authorize(context)
            self.core.admit()
            req = request_from_proto(request, self.limits, self.core.tokenizer())
            request_id = req.request_id
            acc = _Accumulator(request_id)
            finished = False
            deltas = self.core.generate(req)
            try:
                async for cd in deltas:
                    if stream:
                        await context.write(delta_to_proto(cd))
                    else:
                        acc.add(cd)
                    finished = cd.delta.finished
            finally:
                await deltas.aclose()  # at once, also when cancelled: aborts the request, frees its pages
            assert finished  # the core raises when the pool's stream ends without a final delta
            return None if stream else acc.result()
        except asyncio.CancelledError:
            code = cancellation_code(context.time_remaining())
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a status code
            code = status_code_for(e)
            if code is grpc.StatusCode.INTERNAL and not isinstance(e, ClusterError):
                log.exception("%s %s failed", method, request_id or "(no id)")
                message = f"internal error: {type(e).__name__}: {e}"
            else:
                message = str(e)
            await context.abort(code, message)
        finally:
            self.metrics.record_rpc(method, code.name)
        return None  # unreachable: context.abort raises
