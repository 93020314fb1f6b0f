"""Autoscaling under a batch job, on Ray's own fake multi-node autoscaling cluster.

The head is a CPU node; the only worker node type offers {"CPU": 1, "GPU": 1} (a "GPU" that is
only a Ray resource: the engine inside still runs on the CPU, since no CUDA device exists here).
The batch job's WorkerPool starts with one worker (one fake GPU node), grows towards max_workers
while the job's queue is long (Ray's autoscaler launches a node for each pending worker), and
when the job ends the workers drain and go away, and so do the idle nodes.

The cluster is Ray's fake_multinode provider driven by the real autoscaler (what
ray.cluster_utils.AutoscalingCluster sets up), started by this test as its own process group and
torn down by process id: never `ray stop`, which would kill every Ray cluster on the machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

ray = pytest.importorskip("ray")

from tests.deploy.procs import descendants, reap, start_ray_head  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MAX_NODES = 3
IDLE_TIMEOUT_MIN = 0.05  # 3 s: idle fake GPU nodes go away quickly


def cluster_config(gcs_address: str, head_cpus: int) -> dict[str, Any]:
    """A fake_multinode launcher config: CPU head, GPU worker nodes between 0 and MAX_NODES."""
    return {
        "cluster_name": "mlaserve-autoscaling-test",
        "max_workers": MAX_NODES,
        "upscaling_speed": float(MAX_NODES),
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            "gpu.fake": {
                "resources": {"CPU": 1, "GPU": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": MAX_NODES,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class FakeGpuCluster:
    """`ray start --head --block` with the fake multi-node autoscaler, in its own session."""

    def __init__(self, head_cpus: int = 2) -> None:
        self.head_cpus = head_cpus
        self.ip = ray._private.services.get_node_ip_address()
        self.ports: dict[str, int] = {}
        self.address = ""
        self.dir = tempfile.mkdtemp(prefix="mlsa", dir="/tmp")  # short: Ray's socket paths
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.spawned: set[int] = set()

    def start(self) -> None:
        """Starts the head (retried on new ports after a port conflict) and waits until it is up."""
        start_ray_head(self._launch, self.head_log)

    def _launch(self, ports: dict[str, int]) -> subprocess.Popen[bytes]:
        if self._log is not None:  # an earlier attempt's
            self._log.close()
        self.ports = ports
        self.address = f"{self.ip}:{ports['port']}"
        config_path = os.path.join(self.dir, "cluster.json")
        with open(config_path, "w") as f:
            json.dump(cluster_config(self.address, self.head_cpus), f)
        env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        env.pop("RAY_ADDRESS", None)
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
            *(f"--{option}={port}" for option, port in ports.items()),
            f"--num-cpus={self.head_cpus}", "--num-gpus=0", f"--autoscaling-config={config_path}",
            "--include-dashboard=false", f"--temp-dir={self.dir}", "--block",
        ]  # fmt: skip
        self._log = open(os.path.join(self.dir, "head.log"), "wb")  # noqa: SIM115 - closed in shutdown()
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self.proc

    def connect(self) -> None:
        """Join the started head (one ray.init: a failed early attempt can leave the driver unable
        to connect later)."""
        ray.init(address=self.address, log_to_driver=False)

    def head_log(self) -> str:
        try:
            with open(os.path.join(self.dir, "head.log"), "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def shutdown(self) -> None:
        if self.proc is None:
            return
        self.spawned |= descendants(self.proc.pid)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the process group this test created
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        reap(self.spawned, timeout=15)  # e.g. fake nodes that left the process group
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass(frozen=True)
class Sample:
    t: float
    nodes: int  # alive Ray nodes, head included
    gpus: float  # GPUs the cluster offers (one per fake GPU node)
    workers: float  # GPUs held, i.e. live mlaserve workers (each holds one)


class Sampler:
    """Polls Ray (not the pool) for nodes and held GPUs every `period` seconds, in a thread."""

    def __init__(self, period: float = 0.5) -> None:
        self.period = period
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.period)

    def sample(self) -> Sample:
        total = ray.cluster_resources().get("GPU", 0.0)
        free = ray.available_resources().get("GPU", 0.0)
        nodes = sum(1 for n in ray.nodes() if n["Alive"])
        return Sample(time.monotonic() - self._start, nodes, total, total - free)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _reload_ray_auth_settings() -> None:
    """Ray caches RAY_AUTH_MODE when it is imported; make this process see the current value."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture
def fake_gpu_cluster() -> Iterator[FakeGpuCluster]:
    # Ray's token auth with a token of this cluster's own, not ~/.ray/auth_token (which other
    # clusters on this machine create and use): the head, its fake nodes and this driver see it.
    saved = {
        k: os.environ.get(k)
        for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")
    }
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.pop("RAY_ADDRESS", None)
    _reload_ray_auth_settings()
    cluster = FakeGpuCluster()
    try:
        cluster.start()
        cluster.connect()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reload_ray_auth_settings()


def make_input(path: Path, rng: random.Random, n: int) -> list[str]:
    ids = []
    with path.open("w") as f:
        for i in range(n):
            ids.append(f"job-{i}")
            prompt = " ".join(
                rng.choice(["scale", "up", "down", "page", "latent"]) for _ in range(rng.randint(2, 6))
            )
            f.write(json.dumps({"id": ids[-1], "prompt": prompt}) + "\n")
    return ids


def pool_config() -> Any:
    from mlaserve.cluster.pool_config import AutoscaleConfig, PoolConfig

    return PoolConfig(
        model="tiny",
        num_workers=1,
        min_workers=1,
        max_workers=MAX_NODES,
        # The cluster has no GPU yet when the pool starts: ask for one per worker explicitly, so
        # that every worker waits for (and makes the autoscaler launch) a fake GPU node.
        num_gpus_per_worker=1.0,
        num_cpus_per_worker=1.0,
        # A small cache (8 pages: 8 requests at a time): one worker cannot take the job's queue.
        engine_kwargs={"num_pages": 8},
        autoscale=AutoscaleConfig(
            up_occupancy=0.5,
            up_queue_per_worker=2.0,
            up_sustain_s=1.0,
            down_occupancy=0.2,
            down_idle_s=2.0,
            cooldown_s=1.0,
            interval_s=0.5,
        ),
        startup_timeout_s=120.0,
    )


def test_workers_and_nodes_rise_under_a_batch_job_and_fall_after(fake_gpu_cluster, tmp_path, seed):
    from mlaserve.cluster.batch import BatchConfig, run_batch
    from mlaserve.cluster.batch_backends import pool_backend
    from mlaserve.worker.types import SamplingParams

    rng = random.Random(seed)
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    ids = make_input(inp, rng, 400)
    config = BatchConfig(
        inp, out, concurrency=48, defaults=SamplingParams(max_tokens=32, temperature=0.0), progress=False
    )

    async def job() -> None:
        async with pool_backend(pool_config()) as generate:
            await run_batch(config, generate)

    with Sampler() as sampler:
        asyncio.run(job())
        job_end = time.monotonic() - sampler._start
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            s = sampler.sample()
            if s.workers == 0 and s.nodes == 1:
                break
            time.sleep(1)
    samples = sampler.samples
    during = [s for s in samples if s.t <= job_end]
    after = sampler.sample()
    peak_workers = max(s.workers for s in during)
    peak_nodes = max(s.nodes for s in during)
    trace = [(round(s.t, 1), s.nodes, s.workers) for s in samples[:: max(1, len(samples) // 40)]]
    print(f"job ended at {job_end:.1f}s; (t, nodes, workers): {trace}")
    assert peak_workers >= 2, f"the pool never grew past one worker: {trace}"
    assert peak_nodes >= 3, f"the autoscaler never added a second GPU node: {trace}"
    assert after.workers == 0 and after.nodes == 1, (
        f"workers/nodes did not go away after the job: {after} {trace}"
    )

    records = [json.loads(line) for line in out.read_text().splitlines()]
    counts = Counter(r["id"] for r in records)
    assert set(counts) == set(ids) and set(counts.values()) == {1}, "every line exactly once"
    assert not [r for r in records if "error" in r]
    workers_used = {r["worker_id"] for r in records}
    assert len(workers_used) >= 2, "answers came from one worker only"
