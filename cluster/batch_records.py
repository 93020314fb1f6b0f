"""The batch job's file formats: input lines -> requests, answers -> result lines, resume state.

Pure functions and small frozen types; no asyncio, Ray, gRPC or torch.

Input: JSONL, one object per line, e.g.
    {"id": "q1", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
    {"prompt_token_ids": [1, 2, 3], "seed": 7, "metadata": {"split": "dev"}}
`prompt` (text) or `prompt_token_ids`, optional `id` (string or integer; default `line-<n>`, n the
1-based line number), sampling overrides (the SamplingParams fields), optional `metadata` copied to
the result. Blank lines are not inputs. Any other key is an error naming it (a misspelt
`max_token` must not silently fall back to the default).

Output: JSONL, one line per input line, in completion order:
    {"id": "q1", "line": 1, "text": "...", "token_ids": [...], "finish_reason": "length",
     "usage": {"prompt_tokens": 2, "completion_tokens": 8, "cached_tokens": 0}, "worker_id": "w0"}
    {"id": "line-3", "line": 3, "error": {"type": "invalid_json", "message": "..."}}
Error types: invalid_json, invalid_request (with "field"), duplicate_id, request_failed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mlaserve.cluster.types import GenerationRequest
from mlaserve.worker.types import FinishReason, SamplingParams, Usage

SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams))
ALLOWED_KEYS = SAMPLING_FIELDS | {"id", "prompt", "prompt_token_ids", "metadata"}

# Error types of result lines.
INVALID_JSON = "invalid_json"
INVALID_REQUEST = "invalid_request"
DUPLICATE_ID = "duplicate_id"
REQUEST_FAILED = "request_failed"


@dataclass(frozen=True)
class BatchItem:
    """One valid input line, ready to send."""

    line: int  # 1-based line number in the input file
    id: str
    request: GenerationRequest
    metadata: Any = None


@dataclass(frozen=True)
class LineError:
    """One input line that becomes an error result without reaching the cluster."""

    line: int
    id: str
    type: str  # INVALID_JSON | INVALID_REQUEST | DUPLICATE_ID
    message: str
    field: str | None = None


@dataclass(frozen=True)
class Completion:
    """The whole answer to one request, however it was obtained (pool or gRPC)."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    usage: Usage
    worker_id: str = ""


def default_id(line: int) -> str:
    """The stable id of a line without one (the same on every run over the same file)."""
    return f"line-{line}"


class _BadField(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sampling(obj: dict[str, Any], defaults: SamplingParams) -> SamplingParams:
    overrides: dict[str, Any] = {}
    for name in SAMPLING_FIELDS & obj.keys():
        value = obj[name]
        if name in ("max_tokens", "top_k") and not _is_int(value):
            raise _BadField(name, f"{name} must be an integer, got {value!r}")
        if name == "seed" and value is not None and not _is_int(value):
            raise _BadField(name, f"seed must be an integer or null, got {value!r}")
        if name in ("temperature", "top_p") and (
            isinstance(value, bool) or not isinstance(value, int | float)
        ):
            raise _BadField(name, f"{name} must be a number, got {value!r}")
        if name == "stop":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
                raise _BadField(name, "stop must be a non-empty string or a list of them")
        if name == "stop_token_ids" and (not isinstance(value, list) or not all(_is_int(t) for t in value)):
            raise _BadField(name, "stop_token_ids must be a list of integers")
        if name == "ignore_eos" and not isinstance(value, bool):
            raise _BadField(name, f"ignore_eos must be true or false, got {value!r}")
        overrides[name] = float(value) if name in ("temperature", "top_p") else value
    params = {f.name: getattr(defaults, f.name) for f in fields(SamplingParams)} | overrides
    try:
        return SamplingParams(**params)
    except ValueError as exc:  # SamplingParams names the field first in its messages
        first = str(exc).split(" ", 1)[0]
        raise _BadField(first if first in SAMPLING_FIELDS else "sampling", str(exc)) from None


def _prompt(obj: dict[str, Any]) -> tuple[str | None, tuple[int, ...] | None]:
    has_text, has_ids = "prompt" in obj, "prompt_token_ids" in obj
    if has_text == has_ids:
        raise _BadField("prompt", "give exactly one of prompt (text) and prompt_token_ids")
    if has_text:
        text = obj["prompt"]
        if not isinstance(text, str) or not text:
            raise _BadField("prompt", "prompt must be a non-empty string")
        return text, None
    ids = obj["prompt_token_ids"]
    if not isinstance(ids, list) or not ids or not all(_is_int(t) and t >= 0 for t in ids):
        raise _BadField(
            "prompt_token_ids", "prompt_token_ids must be a non-empty list of non-negative integers"
        )
    return None, tuple(ids)


def parse_line(text: str, line: int, defaults: SamplingParams) -> BatchItem | LineError:
    """One non-blank input line -> a request, or the error result it stands for."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        return LineError(line, default_id(line), INVALID_JSON, f"not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return LineError(
            line, default_id(line), INVALID_JSON, f"expected a JSON object, got {type(obj).__name__}"
        )
    raw_id = obj.get("id")
    if raw_id is None:
        item_id = default_id(line)
    elif (isinstance(raw_id, str) and raw_id) or _is_int(raw_id):
        item_id = str(raw_id)
    else:
        return LineError(
            line, default_id(line), INVALID_REQUEST, "id must be a non-empty string or an integer", "id"
        )
    try:
        unknown = sorted(obj.keys() - ALLOWED_KEYS)
        if unknown:
            raise _BadField(
                unknown[0], f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(ALLOWED_KEYS))})"
            )
        prompt, token_ids = _prompt(obj)
        sampling = _sampling(obj, defaults)
    except _BadField as exc:
        return LineError(line, item_id, INVALID_REQUEST, str(exc), exc.field)
    request = GenerationRequest(
        request_id=item_id, sampling=sampling, prompt=prompt, prompt_token_ids=token_ids
    )
    return BatchItem(line, item_id, request, obj.get("metadata"))


def iter_input(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every non-blank line."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, start=1):
            if text.strip():
                yield number, text


# --- result lines ---------------------------------------------------------------------------------


def result_record(item: BatchItem, completion: Completion) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": item.id,
        "line": item.line,
        "text": completion.text,
        "token_ids": list(completion.token_ids),
        "finish_reason": completion.finish_reason.value,
        "usage": {
            "prompt_tokens": completion.usage.prompt_tokens,
            "completion_tokens": completion.usage.completion_tokens,
            "cached_tokens": completion.usage.cached_tokens,
        },
        "worker_id": completion.worker_id,
    }
    if item.metadata is not None:
        record["metadata"] = item.metadata
    return record


def error_record(
    line: int, item_id: str, type_: str, message: str, field: str | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"type": type_, "message": message}
    if field is not None:
        error["field"] = field
    return {"id": item_id, "line": line, "error": error}


def encode(record: dict[str, Any]) -> bytes:
    """One output line; non-finite floats never appear, so any JSON reader takes it."""
    return (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


# --- resume -----------------------------------------------------------------------------------


class OutputCorrupt(RuntimeError):
    """The output file has a damaged line before its end (not something a kill produces)."""


@dataclass(frozen=True)
class ResumeState:
    """What an existing output file already answers."""

    done_ids: frozenset[str]  # ids with a result or a final error
    done_duplicate_lines: frozenset[int]  # lines already reported as duplicate ids
    records: int  # complete result lines
    torn_bytes: int  # bytes of a torn last line that were cut off


def _record(raw: bytes) -> dict[str, Any] | None:
    """The result record on one complete output line, or None if the line is damaged."""
    if not raw.endswith(b"\n"):
        return None
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    ok = isinstance(obj, dict) and isinstance(obj.get("id"), str) and _is_int(obj.get("line"))
    return obj if ok else None


def _error_type(record: dict[str, Any]) -> str | None:
    error = record.get("error")
    return error.get("type") if isinstance(error, dict) else None


def load_resume_state(path: Path, *, retry_failed: bool = False) -> ResumeState:
    """Read the output of an earlier run and make it safe to append to (streaming: any size).

    A torn last line (a kill in the middle of a write) is cut off; a damaged line anywhere else
    raises OutputCorrupt. With `retry_failed`, the lines recording request failures are dropped
    (the file is rewritten, then atomically replaced) so that those requests run again.
    """
    if not path.exists():
        return ResumeState(frozenset(), frozenset(), 0, 0)
    done: set[str] = set()
    dup_lines: set[int] = set()
    kept = dropped = 0
    good_end = 0  # offset just past the last good line
    damaged: tuple[int, bytes] | None = None  # fatal unless it turns out to be the last line
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if damaged is not None:
                raise OutputCorrupt(
                    f"{path}:{damaged[0]}: not a result line of mlaserve batch: {damaged[1][:80]!r}"
                )
            record = _record(raw)
            if record is None:
                damaged = (number, raw)
                continue
            good_end += len(raw)
            error_type = _error_type(record)
            if retry_failed and error_type == REQUEST_FAILED:
                dropped += 1
            elif error_type == DUPLICATE_ID:
                dup_lines.add(record["line"])
                kept += 1
            else:
                done.add(record["id"])
                kept += 1
        size = f.tell()
    torn = size - good_end
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        with path.open("rb") as src, tmp.open("wb") as dst:
            for raw in src:
                record = _record(raw)
                if record is None:  # the torn last line (any other damage raised above)
                    break
                if _error_type(record) != REQUEST_FAILED:
                    dst.write(raw)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, path)
    elif torn:
        with path.open("r+b") as f:
            f.truncate(good_end)
    return ResumeState(frozenset(done), frozenset(dup_lines), kept, torn)
