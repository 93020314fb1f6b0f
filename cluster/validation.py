"""What one request may ask for, and the checks both gateway transports (gRPC, HTTP) run on it.

Transport-neutral: the callers pass plain Python values and the field names as their clients spell
them (gRPC: "sampling.top_p", "prompt_token_ids"; the OpenAI HTTP API: "top_p", "prompt"), and
every check raises `InvalidRequest(field, message)` naming that field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mlaserve.cluster.errors import InvalidRequest
from mlaserve.worker.types import SamplingParams


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


def check_request_id(request_id: str, limits: ServiceLimits, field: str = "request_id") -> str:
    if len(request_id) > limits.max_request_id_chars:
        raise InvalidRequest(field, f"longer than {limits.max_request_id_chars} characters")
    if not request_id.isprintable():
        raise InvalidRequest(field, "must contain printable characters only")
    return request_id


def check_sampling(
    limits: ServiceLimits,
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    prefix: str = "",
) -> SamplingParams:
    """SamplingParams from values already of the right Python types; `prefix` goes before each
    field name in errors ("sampling." for gRPC)."""
    if not 1 <= max_tokens <= limits.max_tokens:
        raise InvalidRequest(f"{prefix}max_tokens", f"must be in [1, {limits.max_tokens}], got {max_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequest(f"{prefix}temperature", f"must be a finite number >= 0, got {temperature}")
    if not (0.0 < top_p <= 1.0):  # also rejects NaN
        raise InvalidRequest(f"{prefix}top_p", f"must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise InvalidRequest(f"{prefix}top_k", f"must be >= 0 (0 disables it), got {top_k}")
    if len(stop) > limits.max_stop:
        raise InvalidRequest(f"{prefix}stop", f"at most {limits.max_stop} stop strings, got {len(stop)}")
    for i, s in enumerate(stop):
        if not s:
            raise InvalidRequest(f"{prefix}stop[{i}]", "must be a non-empty string")
        if len(s) > limits.max_stop_chars:
            raise InvalidRequest(f"{prefix}stop[{i}]", f"longer than {limits.max_stop_chars} characters")
    if len(stop_token_ids) > limits.max_stop:
        raise InvalidRequest(
            f"{prefix}stop_token_ids",
            f"at most {limits.max_stop} stop token ids, got {len(stop_token_ids)}",
        )
    for i, t in enumerate(stop_token_ids):
        if t < 0:
            raise InvalidRequest(f"{prefix}stop_token_ids[{i}]", f"must be a token id >= 0, got {t}")
    try:
        return SamplingParams(
            max_tokens=int(max_tokens),
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            seed=seed,
            stop=tuple(stop),
            stop_token_ids=tuple(stop_token_ids),
            ignore_eos=bool(ignore_eos),
        )
    except ValueError as e:  # a rule SamplingParams has and the checks above missed
        raise InvalidRequest(prefix.rstrip(".") or "sampling", str(e)) from e


def check_prompt_ids(
    ids: Sequence[int], limits: ServiceLimits, field: str = "prompt_token_ids"
) -> tuple[int, ...]:
    """A token-id prompt: at most max_prompt_tokens ids, each >= 0 (the pool checks the vocabulary)."""
    if len(ids) > limits.max_prompt_tokens:
        raise InvalidRequest(field, f"{len(ids)} tokens exceed the limit of {limits.max_prompt_tokens}")
    for i, t in enumerate(ids):
        if t < 0:
            raise InvalidRequest(f"{field}[{i}]", f"must be a token id >= 0, got {t}")
    return tuple(ids)


def check_prompt_text(
    text: str, limits: ServiceLimits, tokenizer: Tokenizer | None = None, field: str = "prompt"
) -> str:
    """A text prompt: non-empty, at most max_prompt_chars characters and max_prompt_tokens tokens.

    Its token count can exceed max_prompt_tokens only if its UTF-8 length does (every token covers
    at least one byte; +2 for special tokens), so only such long prompts are tokenized here.
    """
    if not text:
        raise InvalidRequest(field, "empty: set a text prompt or token ids")
    if len(text) > limits.max_prompt_chars:
        raise InvalidRequest(field, f"{len(text)} characters exceed the limit of {limits.max_prompt_chars}")
    if tokenizer is not None and len(text.encode("utf-8")) + 2 > limits.max_prompt_tokens:
        n = len(tokenizer.encode(text))
        if n > limits.max_prompt_tokens:
            raise InvalidRequest(field, f"{n} tokens exceed the limit of {limits.max_prompt_tokens}")
    return text
