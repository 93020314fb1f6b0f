"""The OpenAI-compatible HTTP API as a Starlette app over the gateway's core (cluster/gateway.py).

Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`,
`GET /v1/models/{model}`, `GET /health`. Requests reach the same GatewayCore, pool and router as
the gRPC servicer's; the JSON side is cluster/openai_protocol.py.

- Auth: with a bearer token set, every /v1 route needs `Authorization: Bearer <token>` (the core's
  constant-time check; 401 otherwise). /health stays open, as gRPC health does.
- Errors are OpenAI's JSON bodies: 400 naming the field (`param`), 401, 404 (unknown model or
  route), 413 (body over the limit), 429 (queues full, `Retry-After`), 503 (draining or no
  live worker, `Retry-After`), 500 (code `suspected_poison` for a request that crashed workers).
- A generation answers only once its first delta (or its error) is there, so errors the pool
  finds (vocabulary, context length, full queues) still get their status code; streams then go
  out as server-sent events ending with `data: [DONE]`. An error after the first token reaches a
  stream as one `data: {"error": ...}` event before `[DONE]`.
- A client that disconnects (before or during its answer) has its request cancelled: the core's
  stream is closed, which aborts the request on its worker and frees its pages, as a gRPC
  cancellation does. Such requests count with status 499 in the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mlaserve.cluster.errors import ClusterError, Draining, InvalidRequest, QueueFull, SuspectedPoison
from mlaserve.cluster.gateway import GatewayCore, Unauthenticated
from mlaserve.cluster.openai_protocol import (
    AnswerHeader,
    ApiError,
    ChatRequest,
    CompletionRequest,
    SamplingFields,
    answer_json,
    bad_request,
    chunk_json,
    invalid_request_error,
    models_json,
    parse_chat,
    parse_completion,
    usage_chunk_json,
)
from mlaserve.cluster.types import ClusterDelta, GenerationRequest
from mlaserve.cluster.validation import check_prompt_ids, check_prompt_text, check_sampling
from mlaserve.worker.chat_template import ChatTemplate, ChatTemplateError
from mlaserve.worker.types import SamplingParams

log = logging.getLogger(__name__)

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CLIENT_CLOSED = 499  # the status the metrics count a request under whose client went away
_SAMPLING_DEFAULTS = SamplingParams()
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies (nginx) pass events on at once
]


class ChatTokenizer(Protocol):
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def api_error(err: BaseException, kind: str) -> ApiError:
    """The HTTP answer to an error the gateway, the pool or the template raised."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, Unauthenticated):
        return ApiError(
            401, str(err), code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="mlaserve"'}
        )
    if isinstance(err, InvalidRequest):
        return invalid_request_error(err, kind)
    if isinstance(err, ChatTemplateError):
        return bad_request("messages", str(err))
    if isinstance(err, QueueFull):
        return ApiError(
            429, str(err), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}
        )
    if isinstance(err, SuspectedPoison):  # it crashed workers: a 500 that says so, not to be retried
        return ApiError(500, str(err), type="server_error", code="suspected_poison")
    if isinstance(err, Draining):
        return ApiError(
            503, str(err), type="service_unavailable", code="unavailable", headers={"Retry-After": "1"}
        )
    log.error("HTTP %s request failed", kind, exc_info=err)
    return ApiError(
        500, f"internal error: {type(err).__name__}: {err}", type="server_error", code="internal_error"
    )


def error_response(err: ApiError) -> Response:
    return Response(_dumps(err.body()), err.status, headers=err.headers, media_type="application/json")


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(_dumps(obj), status, media_type="application/json")


@dataclass(frozen=True)
class Generation:
    """One admitted request: what to send the pool and how to answer."""

    kind: str  # "completion" | "chat"
    path: str
    request: GenerationRequest
    head: AnswerHeader
    stream: bool
    include_usage: bool
    return_token_ids: bool


async def _until_disconnect(receive: Receive) -> None:
    """Returns once the client has gone (the body is read by then: nothing else arrives)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class GenerationResponse(Response):
    """Runs one generation against the core and writes its answer; a disconnect cancels it."""

    def __init__(self, api: OpenAIApi, gen: Generation) -> None:
        super().__init__()
        self.api = api
        self.gen = gen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        run = asyncio.ensure_future(self._run(scope, send))
        gone = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait((run, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (run, gone):
                if not task.done():
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gone
            try:
                status = await run
            except asyncio.CancelledError:
                status = CLIENT_CLOSED
            self.api.record(self.gen.path, status)

    async def _run(self, scope: Scope, send: Send) -> int:
        stream = self.api.core.generate(self.gen.request)
        try:
            try:
                first = await stream.__anext__()
            except Exception as e:  # noqa: BLE001 - before any byte went out: a status code
                err = api_error(e, self.gen.kind)
                await error_response(err)(scope, _no_receive, send)
                return err.status
            if self.gen.stream:
                return await self._stream(send, first, stream)
            return await self._whole(scope, send, first, stream)
        finally:
            await stream.aclose()  # also when cancelled: aborts the request on its worker, frees its pages

    async def _stream(self, send: Send, first: ClusterDelta, rest: AsyncIterator[ClusterDelta]) -> int:
        gen = self.gen
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})

        async def body(chunk: bytes) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        async def deltas() -> AsyncIterator[ClusterDelta]:
            yield first
            async for cd in rest:
                yield cd

        status = 200
        sent_first = False
        usage = None
        try:
            async for cd in deltas():
                d = cd.delta
                if d.text or d.finished or not sent_first or (gen.return_token_ids and d.token_ids):
                    chunk = chunk_json(
                        gen.head,
                        d.text,
                        d.finish_reason,
                        first=not sent_first,
                        token_ids=d.token_ids if gen.return_token_ids else None,
                        include_usage=gen.include_usage,
                    )
                    await body(_sse(chunk))
                    sent_first = True
                if d.finished:
                    usage = d.usage
        except Exception as e:  # noqa: BLE001 - the status line is out: the error goes in the stream
            err = api_error(e, gen.kind)
            status = err.status
            await body(_sse(err.body()))
        else:
            if gen.include_usage and usage is not None:
                await body(_sse(usage_chunk_json(gen.head, usage)))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        return status

    async def _whole(
        self, scope: Scope, send: Send, first: ClusterDelta, rest: AsyncIterator[ClusterDelta]
    ) -> int:
        gen = self.gen
        texts, ids = [first.delta.text], list(first.delta.token_ids)
        last = first.delta
        try:
            if not last.finished:
                async for cd in rest:
                    texts.append(cd.delta.text)
                    ids.extend(cd.delta.token_ids)
                    last = cd.delta
        except Exception as e:  # noqa: BLE001 - nothing went out yet: a status code
            err = api_error(e, gen.kind)
            await error_response(err)(scope, _no_receive, send)
            return err.status
        assert last.finished and last.usage is not None  # the core guarantees a final delta
        answer = answer_json(
            gen.head, "".join(texts), last.finish_reason, last.usage, ids if gen.return_token_ids else None
        )
        await json_response(answer)(scope, _no_receive, send)
        return 200


async def _no_receive() -> Any:
    raise RuntimeError("a plain response reads nothing")


class OpenAIApi:
    """The Starlette app of one gateway (`.app`)."""

    def __init__(
        self,
        core: GatewayCore,
        model_name: str,
        chat_template: ChatTemplate | None,
        *,
        max_body_bytes: int = 4 << 20,
    ) -> None:
        self.core = core
        self.model_name = model_name
        self.chat_template = chat_template
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self.app = Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                Route(COMPLETIONS, self.completions, methods=["POST"]),
                Route(CHAT, self.chat, methods=["POST"]),
            ],
            exception_handlers={HTTPException: self._http_exception},
        )

    # -- bookkeeping ---------------------------------------------------------------------------

    def record(self, path: str, status: int) -> None:
        self.core.metrics.record_http(path, status)

    def _answer(self, path: str, response: Response) -> Response:
        self.record(path, response.status_code)
        return response

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: "no such route", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        err = ApiError(exc.status_code, f"{message}: {request.method} {request.url.path}", code="not_found")
        return error_response(err)

    # -- routes --------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if self.core.draining:
            return self._answer("/health", json_response({"status": "draining"}, 503))
        return self._answer("/health", json_response({"status": "serving"}))

    async def models(self, request: Request) -> Response:
        try:
            self.core.authorize(request.headers.get("authorization"), "header")
        except ClusterError as e:
            return self._answer("/v1/models", error_response(api_error(e, "models")))
        card = models_json(self.model_name, self.created, self._max_model_len())
        return self._answer("/v1/models", json_response(card))

    async def model(self, request: Request) -> Response:
        try:
            self.core.authorize(request.headers.get("authorization"), "header")
            self._check_model(request.path_params["model"])
        except (ClusterError, ApiError) as e:
            return self._answer("/v1/models/{model}", error_response(api_error(e, "models")))
        card = models_json(self.model_name, self.created, self._max_model_len())["data"][0]
        return self._answer("/v1/models/{model}", json_response(card))

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion", COMPLETIONS)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat", CHAT)

    # -- generation ----------------------------------------------------------------------------

    async def _generate(self, request: Request, kind: str, path: str) -> Response:
        try:
            self.core.authorize(request.headers.get("authorization"), "header")
            self.core.admit()
            body = await self._json(request)
            gen = (
                self._completion(parse_completion(body))
                if kind == "completion"
                else self._chat(parse_chat(body))
            )
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error body
            return self._answer(path, error_response(api_error(e, kind)))
        return GenerationResponse(self, gen)

    async def _json(self, request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise ApiError(413, f"the request body ({declared} bytes) exceeds {self.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ApiError(413, f"the request body exceeds {self.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request(None, f"the request body is not valid JSON: {e}") from None

    def _max_model_len(self) -> int | None:
        value = getattr(self.core.pool, "max_model_len", None)
        return value if isinstance(value, int) else None

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(
                404,
                f"model: this server serves {self.model_name!r}, not {model!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def _sampling(self, fields: SamplingFields, default_max_tokens: int) -> SamplingParams:
        d = _SAMPLING_DEFAULTS
        return check_sampling(
            self.core.limits,
            max_tokens=fields.max_tokens if fields.max_tokens is not None else default_max_tokens,
            temperature=fields.temperature if fields.temperature is not None else d.temperature,
            top_p=fields.top_p if fields.top_p is not None else d.top_p,
            top_k=fields.top_k,
            seed=fields.seed,
            stop=fields.stop,
            stop_token_ids=fields.stop_token_ids,
            ignore_eos=fields.ignore_eos,
        )

    def _head(self, prefix: str, chat: bool) -> AnswerHeader:
        return AnswerHeader(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), self.model_name, chat)

    def _completion(self, req: CompletionRequest) -> Generation:
        self._check_model(req.model)
        limits = self.core.limits
        sampling = self._sampling(req.sampling, min(COMPLETION_DEFAULT_MAX_TOKENS, limits.max_tokens))
        head = self._head("cmpl", chat=False)
        if req.prompt is not None:
            text = check_prompt_text(req.prompt, limits, self.core.tokenizer(), field="prompt")
            request = GenerationRequest(head.id, sampling, prompt=text)
        else:
            assert req.prompt_token_ids is not None
            ids = check_prompt_ids(req.prompt_token_ids, limits, field="prompt")
            request = GenerationRequest(head.id, sampling, prompt_token_ids=ids)
        return Generation(
            "completion", COMPLETIONS, request, head, req.stream, req.include_usage, req.return_token_ids
        )

    def _chat(self, req: ChatRequest) -> Generation:
        self._check_model(req.model)
        if self.chat_template is None:
            raise bad_request(
                "messages",
                f"model {self.model_name!r} has no chat template: start the server with --chat-template FILE",
            )
        limits = self.core.limits
        text = self.chat_template.render(req.messages, add_generation_prompt=True, **req.chat_template_kwargs)
        if len(text) > limits.max_prompt_chars:
            raise bad_request(
                "messages", f"{len(text)} characters exceed the limit of {limits.max_prompt_chars}"
            )
        tokenizer = self.core.tokenizer()
        if tokenizer is None:
            raise Draining("the cluster has no tokenizer loaded yet")
        # The template wrote the special tokens (BOS, role markers) itself: add none again.
        encoded = cast(ChatTokenizer, tokenizer).encode(text, add_special_tokens=False)
        ids = check_prompt_ids(encoded, limits, field="messages")
        if not ids:
            raise bad_request("messages", "the rendered conversation is empty")
        default_max = limits.max_tokens
        context = self._max_model_len()
        if context is not None:
            default_max = min(default_max, context - len(ids))
            if default_max < 1 and req.sampling.max_tokens is None:
                raise bad_request(
                    "messages",
                    f"the conversation ({len(ids)} tokens) fills the model's context of {context} tokens",
                )
        sampling = self._sampling(req.sampling, max(1, default_max))
        head = self._head("chatcmpl", chat=True)
        request = GenerationRequest(head.id, sampling, prompt_token_ids=ids)
        return Generation("chat", CHAT, request, head, req.stream, req.include_usage, req.return_token_ids)
