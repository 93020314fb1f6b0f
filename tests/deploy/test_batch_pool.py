"""`mlaserve batch --address local`: 1,000 lines through a real local Ray cluster and WorkerPool
(tiny model, CPU workers), killed with SIGKILL mid-way and run again.

The oracle for the answers is the Engine alone, offline in this process (greedy decoding of the
same tiny model): the pool and the batch job must give the same tokens.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.deploy.procs import descendants, reap

pytestmark = [pytest.mark.ray, pytest.mark.slow]

N_LINES = 1000
MODEL = "tiny"


def make_input(path: Path, rng: random.Random) -> list[dict]:
    words = ["mla", "latent", "page", "cache", "decode", "hopper", "ray", "token"]
    lines = []
    for i in range(N_LINES):
        obj: dict = {"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))}
        if rng.random() < 0.8:  # the rest get the stable default id line-<n>
            obj["id"] = f"q{i}"
        if rng.random() < 0.5:
            obj["max_tokens"] = rng.randint(1, 3)
        lines.append(obj)
    path.write_text("".join(json.dumps(obj) + "\n" for obj in lines))
    return lines


def batch_cmd(inp: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "mlaserve.cluster.cli", "batch", "--input", str(inp), "--output", str(out),
        "--address", "local", "--model", MODEL, "--num-workers", "2", "--concurrency", "64",
        "--max-tokens", "2", "--temperature", "0", "--no-progress",
    ]  # fmt: skip


def test_thousand_lines_killed_mid_way_then_resumed(tmp_path, seed):
    rng = random.Random(seed)
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    lines = make_input(inp, rng)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    first = subprocess.Popen(batch_cmd(inp, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    kill_at = rng.randint(50, N_LINES // 2)
    spawned: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while first.poll() is None and time.monotonic() < deadline:
            spawned |= descendants(first.pid)
            if out.exists() and out.read_bytes().count(b"\n") >= kill_at:
                break
            time.sleep(0.05)
        assert first.poll() is None, f"the job ended before the kill:\n{first.stdout.read().decode()[-3000:]}"
        spawned |= descendants(first.pid)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
        reap(spawned)  # the local Ray cluster it started dies with it; make sure
    before = out.read_bytes()
    done_before = before.count(b"\n")
    assert kill_at <= done_before < N_LINES

    second = subprocess.run(batch_cmd(inp, out), env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{N_LINES} lines" in second.stderr and f"{done_before} already done" in second.stderr, (
        second.stderr[-500:]
    )
    after = out.read_bytes()
    assert after.startswith(before), "the rerun rewrote lines the first run had written"

    records = [json.loads(line) for line in after.decode().splitlines()]
    assert len(records) == N_LINES
    ids = Counter(r["id"] for r in records)
    expected_ids = {obj.get("id", f"line-{i + 1}") for i, obj in enumerate(lines)}
    assert set(ids) == expected_ids and set(ids.values()) == {1}, "every line exactly once"
    errors = [r for r in records if "error" in r]
    assert not errors, errors[:3]

    # The oracle: the same tiny model decoded greedily by the Engine alone, on a sample of lines
    # answered before and after the kill.
    from mlaserve.worker import Engine, SamplingParams

    engine = Engine.from_pretrained(MODEL, device="cpu")
    by_line = {r["line"]: r for r in records}
    sample = rng.sample(sorted(by_line), 24)
    for number in sample:
        obj = lines[number - 1]
        sampling = SamplingParams(max_tokens=obj.get("max_tokens", 2), temperature=0.0)
        [want] = engine.generate([obj["prompt"]], sampling)
        got = by_line[number]
        assert got["token_ids"] == list(want.token_ids), (number, obj)
        assert got["finish_reason"] == want.finish_reason.value
        assert got["usage"]["completion_tokens"] == len(want.token_ids)
        assert got["worker_id"]
