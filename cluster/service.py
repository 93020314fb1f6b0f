"""The gRPC edge: proto messages <-> domain types, and the `mlaserve.v1.Decoder` servicer.

Conversions validate every field of a request against `ServiceLimits` and raise
`InvalidRequest(field, message)` naming the field as the client spelled it
("sampling.top_p: must be in (0, 1], got 0"). The servicer maps the cluster's errors to status
codes (InvalidRequest -> INVALID_ARGUMENT, QueueFull -> RESOURCE_EXHAUSTED, Draining ->
UNAVAILABLE, a missing bearer token -> UNAUTHENTICATED, SuspectedPoison -> INTERNAL with its own
message, anything else -> INTERNAL) and ties the request's life to the RPC: when the client
cancels or its deadline passes, grpc.aio cancels the handler task, and the `finally` below closes
the pool's stream, which aborts the request on its worker and frees its pages.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from mlaserve.cluster.errors import ClusterError, Draining, InvalidRequest, QueueFull, SuspectedPoison
from mlaserve.cluster.metrics import GatewayMetrics, PoolCounterSnapshot, worker_health
from mlaserve.cluster.types import ClusterDelta, GenerationRequest, WorkerStatus
from mlaserve.protos import decoder_pb2 as pb
from mlaserve.protos import decoder_pb2_grpc as pb_grpc
from mlaserve.worker.types import FinishReason, RequestDelta, SamplingParams, Usage

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Decoder"].full_name  # "mlaserve.v1.Decoder"
_SAMPLING_DEFAULTS = SamplingParams()
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may ask for. Message size is limited by the server (ServerConfig)."""

    max_prompt_tokens: int = 32768  # prompt tokens (token-id prompts, and text prompts once tokenized)
    max_prompt_chars: int = 1 << 20  # characters of a text prompt, checked before tokenizing
    max_tokens: int = 4096  # sampling.max_tokens
    max_stop: int = 16  # number of stop strings, and of stop token ids
    max_stop_chars: int = 256  # characters of one stop string
    max_request_id_chars: int = 128

    def __post_init__(self) -> None:
        for name in (
            "max_prompt_tokens",
            "max_prompt_chars",
            "max_tokens",
            "max_stop",
            "max_stop_chars",
            "max_request_id_chars",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServiceLimits.{name} must be an integer >= 1, got {value!r}")


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


class Pool(Protocol):
    """The part of the WorkerPool API the service uses."""

    def generate(self, req: GenerationRequest) -> AsyncIterator[ClusterDelta]: ...

    async def status(self) -> list[WorkerStatus]: ...


# -- proto -> domain ------------------------------------------------------------------------------


def sampling_from_proto(
    msg: pb.SamplingParams, limits: ServiceLimits, field: str = "sampling"
) -> SamplingParams:
    """Validate and convert; unset optional fields take SamplingParams' defaults."""
    d = _SAMPLING_DEFAULTS
    max_tokens = msg.max_tokens if msg.HasField("max_tokens") else d.max_tokens
    if not 1 <= max_tokens <= limits.max_tokens:
        raise InvalidRequest(f"{field}.max_tokens", f"must be in [1, {limits.max_tokens}], got {max_tokens}")
    temperature = float(msg.temperature) if msg.HasField("temperature") else d.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequest(f"{field}.temperature", f"must be a finite number >= 0, got {temperature}")
    top_p = float(msg.top_p) if msg.HasField("top_p") else d.top_p
    if not (0.0 < top_p <= 1.0):  # also rejects NaN
        raise InvalidRequest(f"{field}.top_p", f"must be in (0, 1], got {top_p}")
    if msg.top_k < 0:
        raise InvalidRequest(f"{field}.top_k", f"must be >= 0 (0 disables it), got {msg.top_k}")
    seed = int(msg.seed) if msg.HasField("seed") else None
    if len(msg.stop) > limits.max_stop:
        raise InvalidRequest(f"{field}.stop", f"at most {limits.max_stop} stop strings, got {len(msg.stop)}")
    for i, s in enumerate(msg.stop):
        if not s:
            raise InvalidRequest(f"{field}.stop[{i}]", "must be a non-empty string")
        if len(s) > limits.max_stop_chars:
            raise InvalidRequest(f"{field}.stop[{i}]", f"longer than {limits.max_stop_chars} characters")
    if len(msg.stop_token_ids) > limits.max_stop:
        raise InvalidRequest(
            f"{field}.stop_token_ids",
            f"at most {limits.max_stop} stop token ids, got {len(msg.stop_token_ids)}",
        )
    for i, t in enumerate(msg.stop_token_ids):
        if t < 0:
            raise InvalidRequest(f"{field}.stop_token_ids[{i}]", f"must be a token id >= 0, got {t}")
    try:
        return SamplingParams(
            max_tokens=int(max_tokens),
            temperature=temperature,
            top_p=top_p,
            top_k=int(msg.top_k),
            seed=seed,
            stop=tuple(msg.stop),
            stop_token_ids=tuple(msg.stop_token_ids),
            ignore_eos=bool(msg.ignore_eos),
        )
    except ValueError as e:  # a rule SamplingParams has and the checks above missed
        raise InvalidRequest(field, str(e)) from e


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
    request_id = msg.request_id or new_request_id()
    if len(request_id) > limits.max_request_id_chars:
        raise InvalidRequest("request_id", f"longer than {limits.max_request_id_chars} characters")
    if not request_id.isprintable():
        raise InvalidRequest("request_id", "must contain printable characters only")
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
        if len(ids) > limits.max_prompt_tokens:
            raise InvalidRequest(
                "prompt_token_ids", f"{len(ids)} tokens exceed the limit of {limits.max_prompt_tokens}"
            )
        for i, t in enumerate(ids):
            if t < 0:
                raise InvalidRequest(f"prompt_token_ids[{i}]", f"must be a token id >= 0, got {t}")
        return GenerationRequest(
            request_id=request_id, sampling=sampling, prompt_token_ids=tuple(ids), resume_token_ids=resume
        )
    if not text:
        raise InvalidRequest("prompt", "empty: set prompt (text) or prompt_token_ids")
    if len(text) > limits.max_prompt_chars:
        raise InvalidRequest(
            "prompt", f"{len(text)} characters exceed the limit of {limits.max_prompt_chars}"
        )
    if tokenizer is not None and len(text.encode("utf-8")) + 2 > limits.max_prompt_tokens:
        n = len(tokenizer.encode(text))
        if n > limits.max_prompt_tokens:
            raise InvalidRequest("prompt", f"{n} tokens exceed the limit of {limits.max_prompt_tokens}")
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


class Unauthenticated(ClusterError):
    """A Decoder RPC without the server's bearer token (-> UNAUTHENTICATED)."""


_ERROR_CODES: tuple[tuple[type[ClusterError], grpc.StatusCode], ...] = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Draining, grpc.StatusCode.UNAVAILABLE),
    (SuspectedPoison, grpc.StatusCode.INTERNAL),  # the request crashes workers: not to be retried
)


def status_code_for(error: BaseException) -> grpc.StatusCode:
    for cls, code in _ERROR_CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def pool_counters(pool: Any) -> PoolCounterSnapshot:
    """A copy of the pool's cumulative counters (`pool.counters`) for the metrics."""
    return PoolCounterSnapshot.of(getattr(pool, "counters", None))


async def _aclose(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


class DecoderService(pb_grpc.DecoderServicer):
    """mlaserve.v1.Decoder over a WorkerPool.

    With `auth_token` set, every Decoder RPC must carry the metadata
    `authorization: Bearer <token>` (health and reflection stay open).
    """

    def __init__(
        self,
        pool: Pool,
        limits: ServiceLimits | None = None,
        metrics: GatewayMetrics | None = None,
        auth_token: str | None = None,
    ) -> None:
        self._pool = pool
        self._expected_auth = f"Bearer {auth_token}".encode() if auth_token else None
        self.limits = limits or ServiceLimits()
        self.metrics = metrics or GatewayMetrics()
        self.draining = False  # set by the server: new requests get UNAVAILABLE, running ones finish
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def active_requests(self) -> int:
        """Generation RPCs in progress."""
        return self._active

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no generation RPC is in progress; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

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
            statuses = await self._pool.status()
        except Exception as e:  # noqa: BLE001 - reported to the client as a status code
            code = status_code_for(e)
            self.metrics.record_rpc("GetClusterStatus", code.name)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("GetClusterStatus failed")
            await context.abort(code, str(e) if isinstance(e, ClusterError) else f"cluster status: {e}")
        self.metrics.update_cluster(statuses, pool_counters(self._pool))
        self.metrics.record_rpc("GetClusterStatus", "OK")
        return cluster_status_to_proto(statuses, serving=not self.draining)

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self._expected_auth is None:
            return
        sent = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                sent = value if isinstance(value, str) else value.decode("latin-1")
        if not hmac.compare_digest(sent.encode("utf-8", "replace"), self._expected_auth):
            raise Unauthenticated("missing or wrong bearer token (metadata 'authorization: Bearer <token>')")

    def _tokenizer(self) -> Tokenizer | None:
        try:
            return getattr(self._pool, "tokenizer", None)
        except Exception:  # noqa: BLE001 - a pool without a loaded tokenizer: skip the exact count
            return None

    async def _generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, method: str, stream: bool
    ) -> pb.GenerateResponse | None:
        code = grpc.StatusCode.OK
        tracker = None
        request_id = ""
        self._active += 1
        self._idle.clear()
        try:
            self._authorize(context)
            if self.draining:
                raise Draining("the server is draining: send new requests to another replica")
            req = request_from_proto(request, self.limits, self._tokenizer())
            request_id = req.request_id
            tracker = self.metrics.request_tracker()
            acc = _Accumulator(request_id)
            finished = False
            deltas = self._pool.generate(req)
            try:
                async for cd in deltas:
                    d = cd.delta
                    tracker.tokens(len(d.token_ids))
                    if stream:
                        await context.write(delta_to_proto(cd))
                    else:
                        acc.add(cd)
                    if d.finished:
                        finished = True
                        usage = d.usage
                        tracker.finish(
                            d.finish_reason.value if d.finish_reason else None,
                            prompt_tokens=usage.prompt_tokens if usage else 0,
                            cached_tokens=usage.cached_tokens if usage else 0,
                        )
                        break
            finally:
                # Closing the pool's stream aborts the request on its worker if it is still running
                # (client cancel, deadline, an error above), so its pages are freed at once.
                await _aclose(deltas)
            if not finished:
                raise RuntimeError(
                    f"request {request_id}: the cluster's stream ended without a finish reason"
                )
            return None if stream else acc.result()
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            code = (
                grpc.StatusCode.DEADLINE_EXCEEDED
                if remaining is not None and remaining <= 0
                else grpc.StatusCode.CANCELLED
            )
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
            if tracker is not None:
                tracker.close()
            self._active -= 1
            if self._active == 0:
                self._idle.set()
            self.metrics.record_rpc(method, code.name)
        return None  # unreachable: context.abort raises
