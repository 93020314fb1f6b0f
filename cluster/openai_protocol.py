"""The OpenAI HTTP API's messages: request JSON -> typed requests, answers -> JSON. No HTTP here.

`parse_completion(body)` and `parse_chat(body)` read a decoded JSON body of
`POST /v1/completions` / `POST /v1/chat/completions`; every problem raises `ApiError` (400) naming
the field as the client spelled it (`param`). Fields OpenAI defines and mlaserve does not
implement are refused when set to anything but their neutral value (`n` > 1, `logprobs`,
penalties, `tools`, ...), so a client never silently gets something other than what it asked
for; fields no one defines are ignored, as vLLM does. Extensions: `top_k` (0 or -1: off),
`ignore_eos`, `stop_token_ids`, `return_token_ids` (each choice and chunk carries its token ids),
and for chat `chat_template_kwargs` (extra template variables).

The answer builders produce OpenAI's shapes (`text_completion`, `chat.completion`, their
`.chunk` stream forms, `usage` with `prompt_tokens_details.cached_tokens`). Finish reasons: the
engine's STOP -> "stop", LENGTH -> "length", and ABORT -> "abort" (not one of OpenAI's values: the
server ended the answer early, e.g. the engine failed on the request; the text is incomplete).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlaserve.cluster.errors import InvalidRequest
from mlaserve.worker.types import FinishReason, Usage

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
_SEED_LIMIT = 2**64


# -- errors ---------------------------------------------------------------------------------------


class ApiError(Exception):
    """An answer with an HTTP error status and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's name for it
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(param: str | None, message: str, code: str | None = None) -> ApiError:
    """400 naming the field: the message starts with it, as the gRPC side's do."""
    return ApiError(400, f"{param}: {message}" if param else message, param=param, code=code)


def unsupported(param: str, what: str) -> ApiError:
    return bad_request(param, f"{what} is not supported by this server", code="unsupported_parameter")


def http_param(field_name: str, kind: str) -> str:
    """The HTTP request's name for a field the cluster or the engine named.

    The pool names gRPC-style fields ("sampling.max_tokens", "prompt_token_ids[3]"); the engine
    its own ("max_tokens", "prompt"). Prompt fields are `prompt` in a completion and `messages`
    in a chat (whose prompt is the rendered conversation)."""
    name = field_name.removeprefix("sampling.")
    root = name.split("[", 1)[0].split(".", 1)[0]
    if root in ("prompt", "prompt_token_ids"):
        if kind == "chat":
            return "messages"
        return "prompt" + name[len(root) :]
    return name


def invalid_request_error(err: InvalidRequest, kind: str) -> ApiError:
    param = http_param(err.field, kind)
    return bad_request(param, err.message)


# -- reading fields -------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return (
        "null"
        if value is None
        else {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
            type(value), "number" if isinstance(value, (int, float)) else type(value).__name__
        )
    )


def _int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(name, f"must be an integer, got {_type_name(value)}")
    return value


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(name, f"must be a number, got {_type_name(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise bad_request(name, f"must be a finite number, got {value}")
    return value


def _bool(body: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(name, f"must be true or false, got {_type_name(value)}")
    return value


def _token_ids(value: Any, name: str) -> tuple[int, ...] | None:
    """A list of integer token ids, or None when `value` is no list of integers at all."""
    if not isinstance(value, list) or not value:
        return None
    out = []
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int):
            if i == 0:
                return None
            raise bad_request(f"{name}[{i}]", f"must be an integer token id, got {_type_name(t)}")
        out.append(t)
    return tuple(out)


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        raise bad_request("stop", f"must be a string or an array of strings, got {_type_name(value)}")
    for i, s in enumerate(value):
        if not isinstance(s, str):
            raise bad_request(f"stop[{i}]", f"must be a string, got {_type_name(s)}")
    return tuple(value)


def _same(value: Any, neutral: Any) -> bool:
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    if isinstance(value, (int, float)) and isinstance(neutral, (int, float)):
        return value == neutral
    return type(value) is type(neutral) and value == neutral


def _neutral(body: Mapping[str, Any], name: str, *neutral: Any) -> None:
    """Refuse a field mlaserve does not implement unless it holds a value that changes nothing."""
    value = body.get(name)
    if value is not None and not any(_same(value, n) for n in neutral):
        allowed = " or ".join(json.dumps(n) for n in neutral)
        raise bad_request(
            name,
            f"this server supports only {allowed} (or null), got {json.dumps(value)}",
            code="unsupported_parameter",
        )


@dataclass(frozen=True)
class SamplingFields:
    """The sampling fields of a request, read but not yet checked against the server's limits."""

    max_tokens: int | None  # None: the endpoint's default
    temperature: float | None
    top_p: float | None
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool


def _sampling(body: Mapping[str, Any], max_tokens_names: Sequence[str]) -> SamplingFields:
    max_tokens = None
    for name in max_tokens_names:
        value = _int(body, name)
        if value is not None:
            if value < 1:
                raise bad_request(name, f"must be >= 1, got {value}")
            max_tokens = value
            break
    top_k = _int(body, "top_k")
    if top_k == -1:  # vLLM's spelling of "off"
        top_k = 0
    seed = _int(body, "seed")
    if seed is not None and not 0 <= seed < _SEED_LIMIT:
        raise bad_request("seed", f"must be in [0, 2**64), got {seed}")
    stop_token_ids: tuple[int, ...] = ()
    raw_ids = body.get("stop_token_ids")
    if raw_ids is not None:
        if not isinstance(raw_ids, list):
            raise bad_request("stop_token_ids", f"must be an array of token ids, got {_type_name(raw_ids)}")
        stop_token_ids = _token_ids(raw_ids, "stop_token_ids") or ()
        if raw_ids and not stop_token_ids:
            raise bad_request(
                "stop_token_ids[0]", f"must be an integer token id, got {_type_name(raw_ids[0])}"
            )
    for name in ("presence_penalty", "frequency_penalty"):
        _neutral(body, name, 0)
    _neutral(body, "repetition_penalty", 1)
    _neutral(body, "min_p", 0)
    _neutral(body, "logit_bias", {})
    _neutral(body, "n", 1)
    _neutral(body, "best_of", 1)
    return SamplingFields(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature"),
        top_p=_number(body, "top_p"),
        top_k=0 if top_k is None else top_k,
        seed=seed,
        stop=_stop(body),
        stop_token_ids=stop_token_ids,
        ignore_eos=_bool(body, "ignore_eos"),
    )


def _stream_options(body: Mapping[str, Any], stream: bool) -> bool:
    """include_usage of stream_options (only meaningful, as in OpenAI's API, with stream)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad_request("stream_options", "only allowed when stream is true")
    if not isinstance(options, dict):
        raise bad_request("stream_options", f"must be an object, got {_type_name(options)}")
    return _bool(options, "include_usage") if "include_usage" in options else False


def _model(body: Mapping[str, Any]) -> str | None:
    value = body.get("model")
    if value is not None and not isinstance(value, str):
        raise bad_request("model", f"must be a string, got {_type_name(value)}")
    return value


def _user(body: Mapping[str, Any]) -> None:
    value = body.get("user")
    if value is not None and not isinstance(value, str):
        raise bad_request("user", f"must be a string, got {_type_name(value)}")


# -- requests -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionRequest:
    """POST /v1/completions, read."""

    model: str | None
    prompt: str | None  # exactly one of prompt / prompt_token_ids
    prompt_token_ids: tuple[int, ...] | None
    sampling: SamplingFields
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False


@dataclass(frozen=True)
class ChatRequest:
    """POST /v1/chat/completions, read: messages as the template will see them."""

    model: str | None
    messages: tuple[Mapping[str, Any], ...]
    sampling: SamplingFields
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise bad_request(None, f"the request body must be a JSON object, got {_type_name(body)}")
    return body


def parse_completion(raw: Any) -> CompletionRequest:
    body = _object(raw)
    prompt = body.get("prompt")
    if prompt is None:
        raise bad_request("prompt", "required: a string or an array of token ids")
    # OpenAI's prompt forms: a string, token ids, or an array of either (a batch; here of one).
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request(
                "prompt", f"one prompt per request (got a batch of {len(prompt)}); send them separately"
            )
        prompt = prompt[0]
    text: str | None = None
    ids: tuple[int, ...] | None = None
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt", "must not be empty")
        text = prompt
    else:
        ids = _token_ids(prompt, "prompt")
        if ids is None:
            if isinstance(prompt, list) and not prompt:
                raise bad_request("prompt", "must not be empty")
            raise bad_request(
                "prompt", f"must be a string or an array of token ids, got {_type_name(prompt)}"
            )
    _neutral(body, "echo", False)
    _neutral(body, "suffix", "")
    _neutral(body, "logprobs", 0, False)
    _user(body)
    stream = _bool(body, "stream")
    return CompletionRequest(
        model=_model(body),
        prompt=text,
        prompt_token_ids=ids,
        sampling=_sampling(body, ("max_tokens",)),
        stream=stream,
        include_usage=_stream_options(body, stream),
        return_token_ids=_bool(body, "return_token_ids"),
    )


def _content(value: Any, where: str, role: str) -> str | None:
    """A message's content: a string, text parts (joined by newlines), or null (assistant, tool)."""
    if value is None:
        if role in ("assistant", "tool"):
            return None
        raise bad_request(where, f"required for a {role} message")
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise bad_request(where, f"must be a string or an array of content parts, got {_type_name(value)}")
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict):
            raise bad_request(f"{where}[{j}]", f"must be an object, got {_type_name(part)}")
        kind = part.get("type")
        if kind != "text":
            raise bad_request(f"{where}[{j}].type", f"only 'text' content parts are supported, got {kind!r}")
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_request(f"{where}[{j}].text", f"must be a string, got {_type_name(text)}")
        texts.append(text)
    return "\n".join(texts)


def _messages(value: Any) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(value, list):
        raise bad_request("messages", f"required: an array of messages, got {_type_name(value)}")
    if not value:
        raise bad_request("messages", "must hold at least one message")
    out = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request(where, f"must be an object, got {_type_name(msg)}")
        role = msg.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        # Other keys (name, tool_calls, tool_call_id, reasoning_content, ...) reach the template as sent.
        out.append({**msg, "content": _content(msg.get("content"), f"{where}.content", role)})
    return tuple(out)


def parse_chat(raw: Any) -> ChatRequest:
    body = _object(raw)
    messages = _messages(body.get("messages"))
    for name in ("tools", "functions"):
        if body.get(name):
            raise unsupported(name, "tool calling")
    for name in ("tool_choice", "function_call"):
        _neutral(body, name, "none", "auto")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise unsupported("response_format", "a response format other than text")
    _neutral(body, "logprobs", False)
    _neutral(body, "top_logprobs", 0)
    _user(body)
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise bad_request("chat_template_kwargs", f"must be an object, got {_type_name(kwargs)}")
    for key in kwargs:
        if key in ("messages", "add_generation_prompt", "tools", "documents") or not key.isidentifier():
            raise bad_request("chat_template_kwargs", f"cannot set {key!r}")
    stream = _bool(body, "stream")
    return ChatRequest(
        model=_model(body),
        messages=messages,
        sampling=_sampling(body, ("max_completion_tokens", "max_tokens")),
        stream=stream,
        include_usage=_stream_options(body, stream),
        return_token_ids=_bool(body, "return_token_ids"),
        chat_template_kwargs=dict(kwargs),
    )


# -- answers --------------------------------------------------------------------------------------


def finish_reason_name(reason: FinishReason | None) -> str | None:
    """OpenAI's finish_reason for the engine's (ABORT: "abort", see the module doc)."""
    return None if reason is None else reason.value


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


@dataclass(frozen=True)
class AnswerHeader:
    """What every object of one answer repeats."""

    id: str
    created: int
    model: str
    chat: bool  # chat.completion(.chunk) rather than text_completion

    def base(self, chunk: bool) -> dict[str, Any]:
        if self.chat:
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def answer_json(
    head: AnswerHeader,
    text: str,
    finish_reason: FinishReason | None,
    usage: Usage,
    token_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The non-streaming answer."""
    choice: dict[str, Any] = {"index": 0}
    if head.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    choice["logprobs"] = None
    choice["finish_reason"] = finish_reason_name(finish_reason)
    if token_ids is not None:
        choice["token_ids"] = list(token_ids)
    return {**head.base(chunk=False), "choices": [choice], "usage": usage_json(usage)}


def chunk_json(
    head: AnswerHeader,
    text: str,
    finish_reason: FinishReason | None,
    *,
    first: bool = False,
    token_ids: Sequence[int] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    """One streamed chunk (chat: the first carries the assistant role)."""
    choice: dict[str, Any] = {"index": 0}
    if head.chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text or first:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text
    choice["logprobs"] = None
    choice["finish_reason"] = finish_reason_name(finish_reason)
    if token_ids is not None:
        choice["token_ids"] = list(token_ids)
    out = {**head.base(chunk=True), "choices": [choice]}
    if include_usage:
        out["usage"] = None  # as OpenAI streams it: null on every chunk but the usage chunk
    return out


def usage_chunk_json(head: AnswerHeader, usage: Usage) -> dict[str, Any]:
    """The last chunk of a stream with include_usage: no choices, the usage."""
    return {**head.base(chunk=True), "choices": [], "usage": usage_json(usage)}


def models_json(model: str, created: int, max_model_len: int | None) -> dict[str, Any]:
    card: dict[str, Any] = {"id": model, "object": "model", "created": created, "owned_by": "mlaserve"}
    if max_model_len is not None:
        card["max_model_len"] = max_model_len
    return {"object": "list", "data": [card]}
