"""`mlaserve batch --server`: the batch job through a real gRPC gateway (in front of a fake pool).

The gateway is the project's GatewayServer on 127.0.0.1; the pool behind it follows the Pool API
and answers with a pure function of the prompt (the oracle below), so every result line can be
checked. The CLI runs as a real subprocess, which one test kills with SIGKILL mid-way and reruns.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

pytest.importorskip("grpc")

from mlaserve.cluster.batch import BatchConfig, run_batch  # noqa: E402
from mlaserve.cluster.batch_backends import collect, grpc_backend  # noqa: E402
from mlaserve.cluster.errors import InvalidRequest, QueueFull  # noqa: E402
from mlaserve.cluster.server import GatewayServer, ServerConfig  # noqa: E402
from mlaserve.cluster.types import ClusterDelta, GenerationRequest, WorkerStatus  # noqa: E402
from mlaserve.worker.load import WorkerLoad  # noqa: E402
from mlaserve.worker.types import FinishReason, RequestDelta, SamplingParams, Usage  # noqa: E402

VOCAB = 500


def encode(text: str) -> list[int]:
    return [b % VOCAB for b in text.encode()]


def answer(ids: list[int], max_tokens: int) -> list[int]:
    """The oracle: the tokens the fake pool produces for a prompt."""
    return [(sum(ids) * 13 + 3 * i) % VOCAB for i in range(max_tokens)]


class Tokenizer:
    def encode(self, text: str) -> list[int]:
        return encode(text)


class FakePool:
    """Pool API: generate(req) streams one delta per token; status(); tokenizer."""

    def __init__(self, rng: random.Random, step_s: float = 0.0005) -> None:
        self.rng = rng
        self.step_s = step_s
        self.tokenizer = Tokenizer()
        self.busy: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()  # prompt text -> finished streams

    async def generate(self, req: GenerationRequest) -> AsyncIterator[ClusterDelta]:
        text = req.prompt if req.prompt is not None else json.dumps(list(req.prompt_token_ids or ()))
        if "BUSY" in text and self.busy[text] < 1:
            self.busy[text] += 1
            raise QueueFull("every worker's queue is full")
        if "FAIL" in text:
            raise RuntimeError("worker exploded")
        ids = list(req.prompt_token_ids) if req.prompt_token_ids is not None else encode(text)
        for i, t in enumerate(ids):
            if t >= VOCAB:
                raise InvalidRequest(f"prompt_token_ids[{i}]", f"token id {t} is outside the vocabulary")
        out = answer(ids, req.sampling.max_tokens)
        for i, t in enumerate(out):
            await asyncio.sleep(self.step_s * self.rng.random())
            last = i == len(out) - 1
            if last:
                self.answered[text] += 1
            yield ClusterDelta(
                RequestDelta(
                    req.request_id,
                    (t,),
                    f"<{t}>",
                    FinishReason.LENGTH if last else None,
                    Usage(len(ids), len(out), 0) if last else None,
                ),
                "fake-w0",
            )

    async def status(self) -> list[WorkerStatus]:
        load = WorkerLoad("fake-w0", 1, 100, 100, 0, 0, 0, 0, 0.0)
        return [WorkerStatus("fake-w0", load, True)]


def make_input(path: Path, rng: random.Random, n: int) -> dict[str, dict]:
    """n lines, every prompt distinct (the resume test tells requests apart by prompt); returns id -> the
    expected result fields."""
    want: dict[str, dict] = {}
    lines = []
    used_ids: set[tuple[int, ...]] = set()
    for i in range(n):
        max_tokens = rng.randint(1, 5)
        kind = rng.choices(["text", "ids", "busy", "fail", "oov"], weights=[80, 10, 4, 3, 3])[0]
        obj: dict = {"id": f"r{i}", "max_tokens": max_tokens}
        if kind == "ids":
            ids = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 4))]
            while tuple(ids) in used_ids:  # a short draw can repeat: [364] twice made the resume check fail
                ids = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 4))]
            used_ids.add(tuple(ids))
            obj["prompt_token_ids"] = ids
            want[obj["id"]] = {"token_ids": answer(ids, max_tokens)}
        elif kind == "oov":
            obj["prompt_token_ids"] = [1, VOCAB + rng.randrange(100)]
            want[obj["id"]] = {"error": "invalid_request", "field": "prompt_token_ids[1]"}
        else:
            text = f"prompt {i} {rng.random():.6f}" + (
                " BUSY" if kind == "busy" else " FAIL" if kind == "fail" else ""
            )
            obj["prompt"] = text
            want[obj["id"]] = (
                {"error": "request_failed"}
                if kind == "fail"
                else {"token_ids": answer(encode(text), max_tokens)}
            )
        lines.append(json.dumps(obj))
    path.write_text("\n".join(lines) + "\n")
    return want


def check(path: Path, want: dict[str, dict]) -> None:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    counts = Counter(r["id"] for r in records)
    assert set(counts) == set(want) and set(counts.values()) == {1}, "every id exactly once"
    for r in records:
        w = want[r["id"]]
        if "error" in w:
            assert r["error"]["type"] == w["error"], r
            if "field" in w:
                assert r["error"]["field"] == w["field"], r
        else:
            assert "error" not in r, r
            assert r["token_ids"] == w["token_ids"] and r["text"] == "".join(f"<{t}>" for t in w["token_ids"])
            assert r["worker_id"] == "fake-w0" and r["usage"]["completion_tokens"] == len(w["token_ids"])


async def start_gateway(pool: FakePool) -> GatewayServer:
    server = GatewayServer(
        pool, ServerConfig(host="127.0.0.1", port=0, drain_timeout_s=1.0, stop_grace_s=0.5)
    )
    await server.start()
    return server


def test_batch_through_the_gateway(tmp_path, seed):
    rng = random.Random(seed)
    want = make_input(tmp_path / "in.jsonl", rng, 120)

    async def main() -> None:
        pool = FakePool(rng)
        server = await start_gateway(pool)
        try:
            cfg = BatchConfig(
                tmp_path / "in.jsonl",
                tmp_path / "out.jsonl",
                concurrency=16,
                retry_backoff_s=0.01,
                progress=False,
            )
            async with grpc_backend(f"127.0.0.1:{server.port}") as generate:
                summary = await run_batch(cfg, generate)
            assert summary.succeeded == sum("error" not in w for w in want.values())
        finally:
            await server.stop(0)

    asyncio.run(main())
    check(tmp_path / "out.jsonl", want)


def test_collect_folds_a_pool_stream(seed):
    rng = random.Random(seed)
    pool = FakePool(rng)
    req = GenerationRequest("x", SamplingParams(max_tokens=7), prompt="hello")
    got = asyncio.run(collect(pool.generate(req)))
    assert list(got.token_ids) == answer(encode("hello"), 7)
    assert (
        got.finish_reason is FinishReason.LENGTH
        and got.usage.completion_tokens == 7
        and got.worker_id == "fake-w0"
    )


async def _cli(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mlaserve.cluster.cli", "batch", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


def test_cli_killed_with_sigkill_resumes_without_duplicates(tmp_path, seed):
    rng = random.Random(seed)
    n = 400
    want = make_input(tmp_path / "in.jsonl", rng, n)
    out = tmp_path / "out.jsonl"

    async def main() -> None:
        pool = FakePool(rng, step_s=0.004)
        server = await start_gateway(pool)
        args = ["--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--server", f"127.0.0.1:{server.port}",
                "--concurrency", "8", "--no-progress"]  # fmt: skip
        try:
            proc = await _cli(*args)
            kill_at = rng.randint(20, n // 2)
            while proc.returncode is None:
                if out.exists() and len(out.read_bytes().splitlines()) >= kill_at:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                await asyncio.sleep(0.01)
            await proc.wait()
            assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
            partial = out.read_bytes().splitlines()
            assert kill_at <= len(partial) < n
            answered_before = Counter(pool.answered)

            proc = await _cli(*args)
            _, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
            assert f"{n} lines" in err.decode()
            # Nothing written before the kill was sent again.
            key_of = {}
            for line in (tmp_path / "in.jsonl").read_text().splitlines():
                obj = json.loads(line)
                key_of[obj["id"]] = obj.get("prompt") or json.dumps(obj.get("prompt_token_ids"))
            for written in partial:
                key = key_of[json.loads(written)["id"]]
                assert pool.answered[key] == answered_before[key], (
                    f"{key!r} was sent again after it was written"
                )
        finally:
            await server.stop(0)

    asyncio.run(main())
    check(out, want)
