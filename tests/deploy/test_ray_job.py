"""`ray job submit -- mlaserve batch ... --address auto`, as deploy/README.md documents it.

A Ray head with the dashboard (and so the job server) is started by this test, in its own process
group, and torn down by process id (never `ray stop`, which would kill every Ray cluster on the
machine). The job is submitted with the `ray job submit` CLI; its entrypoint, the `mlaserve`
console script, joins the cluster the job runs in, starts a worker pool of its own (tiny model, one
CPU worker) and writes one result line per input line, error lines for the bad ones.

The oracle for the answers is the Engine alone, offline in this process (greedy decoding of the
same tiny model).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("ray.job_submission")

from tests.deploy.procs import descendants, reap, start_ray_head  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "tiny"
MAX_TOKENS = 3  # the job's default; some lines ask for their own
JOB_TIMEOUT_S = 240.0


@dataclass
class RayHead:
    """`ray start --head --block` on ports of its own (dashboard included) and a token of its own."""

    dir: str  # short: Ray's socket paths live under its temp dir
    env: dict[str, str]  # what the head and every client of it see (auth token included)
    token: str
    ports: dict[str, int] = field(default_factory=dict)  # ray start option -> port
    proc: subprocess.Popen[bytes] | None = None

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    def log(self) -> str:
        try:
            return Path(self.dir, "head.log").read_text(errors="replace")
        except OSError:
            return ""

    def start(self, timeout: float = 120.0) -> None:
        start_ray_head(self._launch, self.log, timeout)

    def _launch(self, ports: dict[str, int]) -> subprocess.Popen[bytes]:
        self.ports = ports
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
            *(f"--{option}={port}" for option, port in ports.items()),
            "--num-cpus=3", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--temp-dir={self.dir}", "--disable-usage-stats", "--block",
        ]  # fmt: skip
        with open(os.path.join(self.dir, "head.log"), "wb") as log:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self.proc

    def client(self, timeout: float = 60.0):  # -> JobSubmissionClient
        """A job client that sends this head's token itself (this process's Ray auth mode is
        left as it is); retried while the dashboard comes up."""
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + timeout
        while True:
            try:
                return JobSubmissionClient(
                    self.dashboard_url, headers={"Authorization": f"Bearer {self.token}"}
                )
            except Exception:  # noqa: BLE001 - connection refused until the dashboard listens
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def shutdown(self) -> None:
        if self.proc is None:
            return
        spawned = descendants(self.proc.pid)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the process group this test created
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        reap(spawned, timeout=15)  # e.g. workers that left the process group
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def ray_head() -> Iterator[RayHead]:
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    # Token auth with a token of this head's own (not ~/.ray/auth_token, which other clusters on
    # this machine use). The job's entrypoint inherits the head's environment, so it has the token.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    # The `mlaserve` console script sits next to this interpreter (a venv's or pyenv's bin/).
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    head = RayHead(
        dir=tempfile.mkdtemp(prefix="mlrj", dir="/tmp"),
        env=env,
        token=token,
    )
    try:
        head.start()
        yield head
    finally:
        head.shutdown()


WORDS = ["mla", "latent", "page", "cache", "decode", "hopper", "ray", "job"]


def make_input(path: Path, rng: random.Random) -> tuple[list[str], dict[str, str]]:
    """18 good lines and 4 bad ones (shuffled in); returns every line's text and, for the bad
    ones, the id each must be reported under -> the error type it must get."""
    lines = []
    for i in range(18):
        obj: dict = {"id": f"q{i}", "prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))}
        if rng.random() < 0.4:
            obj["max_tokens"] = rng.randint(1, 5)
        lines.append(json.dumps(obj))
    bad = [
        ("{not json", "invalid_json"),
        (json.dumps({"id": "bad-field", "prompt": "x", "max_token": 2}), "invalid_request"),
        (json.dumps({"id": "bad-tokens", "prompt": "x", "max_tokens": "two"}), "invalid_request"),
        (json.dumps({"id": "q0", "prompt": "again"}), "duplicate_id"),
    ]
    for text, _ in bad:
        lines.insert(rng.randint(1, len(lines)), text)  # after line 1: "q0" comes first
    errors = {}
    for number, text in enumerate(lines, start=1):
        for bad_text, kind in bad:
            if text == bad_text:
                errors[f"line-{number}" if kind == "invalid_json" else json.loads(text)["id"]] = kind
    path.write_text("".join(text + "\n" for text in lines))
    return lines, errors


def test_batch_as_a_ray_job(ray_head, tmp_path, seed):
    rng = random.Random(seed)
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    lines, bad = make_input(inp, rng)

    submission_id = f"mlaserve-batch-{secrets.token_hex(4)}"
    submit = [
        sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", ray_head.dashboard_url,
        "--submission-id", submission_id, "--",
        "mlaserve", "batch", "--input", str(inp), "--output", str(out), "--address", "auto",
        "--model", MODEL, "--num-workers", "1", "--concurrency", "8",
        "--max-tokens", str(MAX_TOKENS), "--temperature", "0", "--no-progress",
    ]  # fmt: skip
    ray_head.client()  # the job server is up
    try:
        cli = subprocess.run(submit, env=ray_head.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        logs = ray_head.client().get_job_logs(submission_id)
        pytest.fail(f"the job did not finish in {JOB_TIMEOUT_S} s:\n{exc.stdout}\n{logs[-3000:]}")
    from ray.job_submission import JobStatus

    client = ray_head.client()
    status = client.get_job_status(submission_id)
    logs = client.get_job_logs(submission_id)
    assert cli.returncode == 0 and status == JobStatus.SUCCEEDED, (
        f"{status}\n{cli.stdout[-3000:]}\n{cli.stderr[-2000:]}\n{logs[-3000:]}"
    )
    assert "mlaserve batch: 22 lines: 18 answered, 4 errors, 0 already done" in logs, logs[-2000:]

    records = [json.loads(text) for text in out.read_text().splitlines()]
    assert len(records) == len(lines), "one result line per input line"
    by_line = {r["line"]: r for r in records}
    assert sorted(by_line) == list(range(1, len(lines) + 1))
    ids = Counter(r["id"] for r in records)
    assert ids["q0"] == 2 and all(n == 1 for i, n in ids.items() if i != "q0")
    errors = {r["id"]: r["error"]["type"] for r in records if "error" in r and r["id"] in bad}
    assert errors == bad, records
    dup = [r for r in records if "error" in r and r["id"] == "q0"]
    assert len(dup) == 1 and dup[0]["error"]["type"] == "duplicate_id"
    fields = {r["id"]: r["error"].get("field") for r in records if r["id"] in ("bad-field", "bad-tokens")}
    assert fields == {"bad-field": "max_token", "bad-tokens": "max_tokens"}
    answers = {r["id"]: r for r in records if "error" not in r}
    assert set(answers) == {f"q{i}" for i in range(18)}

    # The oracle: the Engine alone, greedy, on a sample of the answered lines.
    from mlaserve.worker import Engine, SamplingParams

    engine = Engine.from_pretrained(MODEL, device="cpu")
    good = [json.loads(text) for text in lines if text.startswith('{"id": "q')]
    good = [obj for obj in good if obj["prompt"] != "again"]
    for obj in rng.sample(good, 6):
        sampling = SamplingParams(max_tokens=obj.get("max_tokens", MAX_TOKENS), temperature=0.0)
        [want] = engine.generate([obj["prompt"]], sampling)
        got = answers[obj["id"]]
        assert got["token_ids"] == list(want.token_ids), obj
        assert got["finish_reason"] == want.finish_reason.value, obj
        assert got["usage"]["completion_tokens"] == len(want.token_ids)
        assert got["worker_id"]
