"""The batch runner against a fake cluster: every input line answered exactly once, resumable.

The fake cluster answers with a pure function of the request (the oracle), fails or pushes back
on marked prompts, and finishes requests out of order; inputs are random mixes of good and bad
lines drawn fresh each run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from mlaserve.cluster.batch import BatchConfig, run_batch
from mlaserve.cluster.batch_records import (
    Completion,
    LineError,
    OutputCorrupt,
    load_resume_state,
    parse_line,
)
from mlaserve.cluster.errors import InvalidRequest, QueueFull
from mlaserve.cluster.types import GenerationRequest
from mlaserve.worker.types import FinishReason, SamplingParams, Usage

DEFAULTS = SamplingParams(max_tokens=4, temperature=0.0)


def oracle(prompt: str | None, token_ids: tuple[int, ...] | None, sampling: SamplingParams) -> Completion:
    key = json.dumps([prompt, token_ids, sampling.max_tokens, sampling.temperature, sampling.seed])
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    tokens = tuple((h + 7 * i) % 1000 for i in range(sampling.max_tokens))
    n_prompt = len(prompt.split()) if prompt is not None else len(token_ids or ())
    return Completion(
        tokens, " ".join(map(str, tokens)), FinishReason.LENGTH, Usage(n_prompt, len(tokens), 0), "fake-0"
    )


class FakeCluster:
    """`generate` for the runner: the oracle's answer after a random delay, plus marked failures."""

    def __init__(self, rng: random.Random, busy_times: int = 2) -> None:
        self.rng = rng
        self.busy_times = busy_times
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls: Counter[str] = Counter()  # prompt -> answered requests
        self.attempts: Counter[str] = Counter()
        self.request_ids: set[str] = set()

    async def generate(self, request: GenerationRequest) -> Completion:
        key = request.prompt if request.prompt is not None else json.dumps(request.prompt_token_ids)
        self.attempts[key] += 1
        assert request.request_id not in self.request_ids or "BUSY" in key, "request id reused"
        self.request_ids.add(request.request_id)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.rng.random() * 0.002)
            if "BUSY" in key and self.attempts[key] <= self.busy_times:
                raise QueueFull("admission queues are full")
            if "FAIL" in key:
                raise RuntimeError("worker died")
            if "TOOLONG" in key:
                raise InvalidRequest("prompt", "prompt + max_tokens exceeds the context")
            self.calls[key] += 1
            return oracle(request.prompt, request.prompt_token_ids, request.sampling)
        finally:
            self.in_flight -= 1


def random_input(rng: random.Random, n: int) -> list[str]:
    """n input lines (some blank) of every kind the runner must handle."""
    lines: list[str] = []
    used_ids: list[str] = []
    for i in range(n):
        kind = rng.choices(
            [
                "id",
                "noid",
                "ids",
                "blank",
                "badjson",
                "array",
                "badparam",
                "unknown",
                "dup",
                "fail",
                "busy",
                "toolong",
            ],
            weights=[30, 15, 8, 3, 3, 2, 4, 2, 3, 2, 2, 2],
        )[0]
        words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(rng.randint(1, 6)))
        prompt = f"{words} #{i}"
        obj: dict = {"prompt": prompt}
        if rng.random() < 0.5:
            obj["max_tokens"] = rng.randint(1, 6)
        if rng.random() < 0.3:
            obj["seed"] = rng.randint(0, 99)
        if kind == "id":
            obj["id"] = rng.choice([f"q{i}", i * 10])
            used_ids.append(str(obj["id"]))
        elif kind == "ids":
            obj = {
                "id": f"tok{i}",
                "prompt_token_ids": [i] + [rng.randint(0, 50) for _ in range(rng.randint(0, 4))],
            }
        elif kind == "blank":
            lines.append(rng.choice(["", "   ", "\t"]))
            continue
        elif kind == "badjson":
            lines.append(json.dumps(obj)[:-1])
            continue
        elif kind == "array":
            lines.append(json.dumps([prompt]))
            continue
        elif kind == "badparam":
            obj[rng.choice(["max_tokens", "temperature", "top_p"])] = rng.choice([-1, "hot", 0])
            obj["id"] = f"bad{i}"
        elif kind == "unknown":
            obj["max_token"] = 3
        elif kind == "dup" and used_ids:
            obj["id"] = rng.choice(used_ids)
        elif kind in ("fail", "busy", "toolong"):
            obj["prompt"] = f"{prompt} {kind.upper()}"
        if rng.random() < 0.1:
            obj["metadata"] = {"n": i}
        lines.append(json.dumps(obj))
    return lines


def expected(lines: list[str]) -> dict[int, dict]:
    """An independent reading of the input: line number -> what its result line must say."""
    out: dict[int, dict] = {}
    seen: set[str] = set()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            item_id, want = f"line-{number}", {"error": "invalid_json"}
        else:
            item_id = str(obj["id"]) if "id" in obj else f"line-{number}"
            params = {"max_tokens": DEFAULTS.max_tokens, "temperature": DEFAULTS.temperature, "top_p": 1.0}
            params |= {k: obj[k] for k in ("max_tokens", "temperature", "top_p", "seed") if k in obj}
            number_ok = all(isinstance(params[k], int | float) for k in ("temperature", "top_p"))
            bad = (
                bool(
                    set(obj)
                    - {
                        "id",
                        "prompt",
                        "prompt_token_ids",
                        "max_tokens",
                        "temperature",
                        "top_p",
                        "seed",
                        "metadata",
                    }
                )
                or not isinstance(params["max_tokens"], int)
                or params["max_tokens"] < 1
                or not number_ok
                or not (number_ok and params["temperature"] >= 0 and 0 < params["top_p"] <= 1)
            )
            prompt = obj.get("prompt", "")
            if bad:
                want = {"error": "invalid_request"}
            elif "FAIL" in prompt:
                want = {"error": "request_failed"}
            elif "TOOLONG" in prompt:
                want = {"error": "invalid_request", "field": "prompt"}
            else:
                ids = tuple(obj["prompt_token_ids"]) if "prompt_token_ids" in obj else None
                sp = SamplingParams(
                    max_tokens=params["max_tokens"],
                    temperature=float(params["temperature"]),
                    seed=params.get("seed"),
                )
                answer = oracle(obj.get("prompt"), ids, sp)
                want = {
                    "text": answer.text,
                    "token_ids": list(answer.token_ids),
                    "metadata": obj.get("metadata"),
                }
        if item_id in seen:
            want = {"error": "duplicate_id"}
        seen.add(item_id)
        out[number] = {"id": item_id, **want}
    return out


def check_output(path: Path, lines: list[str]) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    want = expected(lines)
    by_line = Counter(r["line"] for r in records)
    assert set(by_line) == set(want), "every non-blank input line, and only those, has a result line"
    assert max(by_line.values()) == 1, f"lines answered twice: {[n for n, c in by_line.items() if c > 1]}"
    for record in records:
        w = want[record["line"]]
        assert record["id"] == w["id"], record
        if "error" in w:
            assert record.get("error", {}).get("type") == w["error"], (record, w)
            if "field" in w:
                assert record["error"]["field"] == w["field"]
        else:
            assert "error" not in record, (record, lines[record["line"] - 1])
            assert record["text"] == w["text"] and record["token_ids"] == w["token_ids"]
            assert record["finish_reason"] == "length"
            assert record["usage"]["completion_tokens"] == len(w["token_ids"])
            assert record.get("metadata") == w["metadata"]
    return records


def write_input(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def config(tmp_path: Path, inp: Path, **kw) -> BatchConfig:
    kw = {"concurrency": 8, "defaults": DEFAULTS, "retry_backoff_s": 0.0, "progress": False} | kw
    return BatchConfig(input_path=inp, output_path=tmp_path / "out" / "results.jsonl", **kw)


def test_every_line_is_answered_once_with_bounded_concurrency(tmp_path, seed):
    rng = random.Random(seed)
    lines = random_input(rng, 300)
    cluster = FakeCluster(rng)
    cfg = config(tmp_path, write_input(tmp_path, lines), concurrency=rng.choice([3, 8, 16]))
    summary = asyncio.run(run_batch(cfg, cluster.generate))
    records = check_output(cfg.output_path, lines)
    assert cluster.max_in_flight <= cfg.concurrency
    assert cluster.max_in_flight > 1, "requests never overlapped"
    assert max(cluster.calls.values()) == 1, "a prompt was answered twice"
    assert summary.lines == len(records) and summary.skipped == 0
    assert summary.succeeded + summary.failed == len(records)
    assert summary.succeeded == sum("error" not in r for r in records)
    assert summary.completion_tokens == sum(len(r["token_ids"]) for r in records if "error" not in r)


def test_resume_after_a_kill_tears_the_last_line(tmp_path, seed):
    rng = random.Random(seed)
    lines = random_input(rng, 200)
    inp = write_input(tmp_path, lines)
    first = FakeCluster(rng)
    full = config(tmp_path / "full", inp)
    asyncio.run(run_batch(full, first.generate))
    complete = full.output_path.read_bytes().splitlines(keepends=True)

    # What a kill leaves: some whole lines, then maybe part of the next one.
    keep = rng.randint(0, len(complete) - 1)
    torn = complete[keep][: rng.randint(0, len(complete[keep]) - 1)]
    cfg = config(tmp_path, inp)
    cfg.output_path.parent.mkdir(parents=True)
    cfg.output_path.write_bytes(b"".join(complete[:keep]) + torn)
    already = {json.loads(line)["line"] for line in complete[:keep]}

    second = FakeCluster(rng)
    summary = asyncio.run(run_batch(cfg, second.generate))
    check_output(cfg.output_path, lines)
    assert summary.skipped == keep
    # No prompt answered before the kill was sent again.
    for number in already:
        parsed = parse_line(lines[number - 1], number, DEFAULTS)
        if isinstance(parsed, LineError):
            continue  # never reaches the cluster
        obj = json.loads(lines[number - 1])
        key = obj.get("prompt") or json.dumps(obj.get("prompt_token_ids"))
        assert key not in second.attempts, f"line {number} was answered before the kill and sent again"


def test_resume_after_cancellation_mid_run(tmp_path, seed):
    """Cancel the job after some answers (Ctrl-C); the rerun completes it exactly once."""
    rng = random.Random(seed)
    lines = random_input(rng, 150)
    cfg = config(tmp_path, write_input(tmp_path, lines), concurrency=4)
    cluster = FakeCluster(rng)
    stop_after = rng.randint(5, 60)

    async def interrupted() -> None:
        job = asyncio.create_task(run_batch(cfg, cluster.generate))
        while sum(cluster.calls.values()) < stop_after and not job.done():
            await asyncio.sleep(0.001)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job

    asyncio.run(interrupted())
    partial = len(cfg.output_path.read_text().splitlines())
    assert 0 < partial < len(expected(lines))
    asyncio.run(run_batch(cfg, cluster.generate))
    check_output(cfg.output_path, lines)
    # Each prompt answered at most once, plus at most the `concurrency` that were in flight.
    assert sum(c - 1 for c in cluster.calls.values()) <= cfg.concurrency


def test_rerun_of_a_finished_job_sends_nothing(tmp_path, seed):
    rng = random.Random(seed)
    lines = random_input(rng, 60)
    cfg = config(tmp_path, write_input(tmp_path, lines))
    asyncio.run(run_batch(cfg, FakeCluster(rng).generate))
    before = cfg.output_path.read_bytes()
    idle = FakeCluster(rng)
    summary = asyncio.run(run_batch(cfg, idle.generate))
    assert not idle.attempts and cfg.output_path.read_bytes() == before
    assert summary.skipped == summary.lines and summary.succeeded == summary.failed == 0


def test_retry_failed_runs_only_the_failed_requests_again(tmp_path, seed):
    rng = random.Random(seed)
    lines = [
        json.dumps({"id": f"r{i}", "prompt": f"p{i}" + (" FAIL" if i % 3 == 0 else "")}) for i in range(30)
    ]
    lines.append("{broken")
    cfg = config(tmp_path, write_input(tmp_path, lines))
    asyncio.run(run_batch(cfg, FakeCluster(rng).generate))
    healed = FakeCluster(rng)

    async def no_failures(request: GenerationRequest) -> Completion:
        return await healed.generate(dataclasses_replace_prompt(request))

    summary = asyncio.run(run_batch(BatchConfig(**{**cfg.__dict__, "retry_failed": True}), no_failures))
    assert summary.succeeded == 10 and summary.failed == 0  # the invalid JSON line is not retried
    records = [json.loads(line) for line in cfg.output_path.read_text().splitlines()]
    assert Counter(r["line"] for r in records) == Counter(range(1, 32))
    assert sum("error" in r for r in records) == 1


def dataclasses_replace_prompt(request: GenerationRequest) -> GenerationRequest:
    import dataclasses

    return dataclasses.replace(request, prompt=(request.prompt or "").replace(" FAIL", ""))


def test_queue_full_is_retried_then_recorded(tmp_path, seed):
    rng = random.Random(seed)
    lines = [json.dumps({"id": "a", "prompt": "x BUSY"}), json.dumps({"id": "b", "prompt": "y BUSY"})]
    cfg = config(tmp_path, write_input(tmp_path, lines), max_attempts=3)
    patient = FakeCluster(rng, busy_times=2)  # succeeds on the third try
    asyncio.run(run_batch(cfg, patient.generate))
    assert all("error" not in json.loads(r) for r in cfg.output_path.read_text().splitlines())
    cfg.output_path.unlink()
    stubborn = FakeCluster(rng, busy_times=99)
    asyncio.run(run_batch(cfg, stubborn.generate))
    records = [json.loads(r) for r in cfg.output_path.read_text().splitlines()]
    assert [r["error"]["type"] for r in records] == ["request_failed"] * 2
    assert "QueueFull" in records[0]["error"]["message"]
    assert set(stubborn.attempts.values()) == {3}


def test_a_damaged_line_before_the_end_stops_the_job(tmp_path):
    out = tmp_path / "results.jsonl"
    out.write_text('{"id": "a", "line": 1, "text": ""}\nnot json\n{"id": "b", "line": 2, "text": ""}\n')
    with pytest.raises(OutputCorrupt, match=r"results.jsonl:2"):
        load_resume_state(out)
    out.write_text('{"id": "a", "line": 1, "text": ""}\n{"id": "b", "li')
    state = load_resume_state(out)
    assert state.done_ids == {"a"} and state.torn_bytes == len('{"id": "b", "li')
    assert out.read_text() == '{"id": "a", "line": 1, "text": ""}\n'


def test_retry_failed_rewrite_also_drops_a_torn_tail(tmp_path):
    out = tmp_path / "results.jsonl"
    ok = '{"id": "a", "line": 1, "text": "x"}\n'
    failed = '{"id": "b", "line": 2, "error": {"type": "request_failed", "message": "boom"}}\n'
    dup = '{"id": "a", "line": 3, "error": {"type": "duplicate_id", "message": "again"}}\n'
    out.write_text(ok + failed + dup + '{"id": "c", "li')
    state = load_resume_state(out, retry_failed=True)
    assert out.read_text() == ok + dup
    assert state.done_ids == {"a"} and state.done_duplicate_lines == {3} and state.records == 2
    assert load_resume_state(out) == state.__class__(frozenset({"a"}), frozenset({3}), 2, 0)


@pytest.mark.parametrize(
    "line, field",
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_k": -2}, "top_k"),
        ({"prompt": "x", "seed": "s"}, "seed"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "stop_token_ids": ["a"]}, "stop_token_ids"),
        ({"prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "prompt_token_ids": [1]}, "prompt"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt_token_ids": [1, -2]}, "prompt_token_ids"),
        ({"prompt_token_ids": []}, "prompt_token_ids"),
        ({"prompt": "x", "max_token": 3}, "max_token"),
        ({"prompt": "x", "id": ""}, "id"),
        ({"prompt": "x", "id": [1]}, "id"),
    ],
)
def test_bad_lines_name_the_field(line, field):
    parsed = parse_line(json.dumps(line), 7, DEFAULTS)
    assert isinstance(parsed, LineError) and parsed.type == "invalid_request"
    assert parsed.field == field, parsed
    assert parsed.id == str(line.get("id") or "line-7") or field == "id"


def test_lines_override_the_defaults():
    parsed = parse_line(
        json.dumps({"id": 5, "prompt": "hi", "temperature": 1, "stop": "\n", "top_k": 3}), 2, DEFAULTS
    )
    assert not isinstance(parsed, LineError)
    assert parsed.id == "5" and parsed.line == 2
    s = parsed.request.sampling
    assert (s.max_tokens, s.temperature, s.stop, s.top_k) == (DEFAULTS.max_tokens, 1.0, ("\n",), 3)
    assert parsed.request.prompt == "hi" and parsed.request.prompt_token_ids is None


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"concurrency": 0}, "concurrency"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"retry_backoff_s": -1}, "retry_backoff_s"),
    ],
)
def test_config_rejects_bad_values(tmp_path, kw, field):
    inp = write_input(tmp_path, ["{}"])
    with pytest.raises(ValueError, match=field):
        config(tmp_path, inp, **kw)
    with pytest.raises(ValueError, match="input"):
        config(tmp_path, tmp_path / "missing.jsonl")
