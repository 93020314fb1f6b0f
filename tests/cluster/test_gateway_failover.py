"""Two gateways, each with its own worker pool, on one local Ray cluster (tiny model, CPU): the
layout of docs/high-availability.md. Gateway A is a real `mlaserve serve` process; it is
SIGKILLed while streams run on it. The streams, read through failover_stream, continue on gateway
B from the tokens they had and end exactly as the engine alone; A's worker goes with A (Ray ends
the actors of a driver that dies), B's is untouched.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from mlaserve.cluster.client import DecoderClient  # noqa: E402
from mlaserve.cluster.failover import failover_stream  # noqa: E402
from mlaserve.cluster.pool import WorkerPool  # noqa: E402
from mlaserve.cluster.pool_config import PoolConfig  # noqa: E402
from mlaserve.cluster.server import GatewayServer, ServerConfig  # noqa: E402
from mlaserve.worker import Engine, SamplingParams  # noqa: E402
from tests.ray_start import start_local_ray  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NUM_PAGES = 64


class LoopThread:
    """Gateway B's event loop, in a thread of this process (A has a process of its own)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway-b", daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 300) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def ray_cluster():
    start_local_ray(num_cpus=4)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@dataclass
class InProcessGateway:
    server: GatewayServer
    pool: WorkerPool
    loop: LoopThread


@pytest.fixture(scope="module")
def gateway_b(ray_cluster):
    loop = LoopThread()
    pool = WorkerPool(PoolConfig(model="tiny", num_workers=1, engine_kwargs={"num_pages": NUM_PAGES}))
    server = GatewayServer(pool, ServerConfig(host="127.0.0.1", port=0))
    try:
        loop.call(pool.start())
        loop.call(server.start())
        yield InProcessGateway(server, pool, loop)
    finally:
        loop.call(server.stop(grace=1))
        loop.call(pool.shutdown())
        loop.close()


@pytest.fixture
def gateway_a(ray_cluster):
    """`mlaserve serve` joining the same Ray cluster with one worker of its own: (process, address)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlaserve.cluster.cli",
            "serve",
            "--address",
            ray_cluster,
            "--host",
            "127.0.0.1",
        ]
        + ["--port", "0", "--num-workers", "1", "--num-pages", str(NUM_PAGES)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        address = None
        while address is None:
            assert time.monotonic() < deadline, "gateway A did not start:\n" + "".join(lines)
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "gateway A exited:\n" + "".join(lines)
            lines.append(line)
            m = re.search(r"serving tiny on (127\.0\.0\.1:\d+)", line)
            address = m.group(1) if m else None
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
        yield proc, address
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


@pytest.fixture(scope="module")
def engine_alone():
    return Engine.from_pretrained("tiny", device="cpu", num_pages=NUM_PAGES)


def run(coro: Coroutine[Any, Any, Any], timeout: float = 400) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_streams_continue_on_another_gateway_when_theirs_is_killed(gateway_a, gateway_b, engine_alone, seed):
    proc, address_a = gateway_a
    rng = random.Random(seed)
    sp = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    # Text prompts (the text must continue across the failover) and token-id prompts.
    prompts: list[Any] = [
        "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randint(3, 30)))
        if i % 2
        else [rng.randrange(1, 256) for _ in range(rng.randint(3, 30))]
        for i in range(6)
    ]
    expected = engine_alone.generate(prompts, sp)
    cpus_before = ray.available_resources().get("CPU", 0.0)

    async def main():
        a, b = DecoderClient(address_a), DecoderClient(gateway_b.server.address)
        progress = [0] * len(prompts)

        async def consume(i: int):
            out = []
            async for cd in failover_stream(
                [a, b], prompts[i], sampling=sp, request_id=f"ha{i}", backoff_s=0.1
            ):
                out.append(cd)
                progress[i] += len(cd.delta.token_ids)
            return out

        tasks = [asyncio.create_task(consume(i)) for i in range(len(prompts))]
        deadline = time.monotonic() + 240
        while min(progress) < 3:
            assert time.monotonic() < deadline, f"streams did not start on gateway A: {progress}"
            assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
            await asyncio.sleep(0.01)
        assert max(progress) < sp.max_tokens, "streams finished before the kill: make them longer"
        os.kill(proc.pid, signal.SIGKILL)
        try:
            return await asyncio.gather(*tasks)
        finally:
            await a.close()
            await b.close()

    streams = run(main())
    for deltas, exp in zip(streams, expected):
        assert tuple(t for d in deltas for t in d.delta.token_ids) == exp.token_ids
        assert "".join(d.delta.text for d in deltas) == exp.text
        last = deltas[-1].delta
        assert last.finished and last.finish_reason == exp.finish_reason
        assert last.usage.completion_tokens == sp.max_tokens and last.usage.prompt_tokens == len(
            exp.prompt_token_ids
        )
        assert {d.delta.request_id for d in deltas} == {deltas[0].delta.request_id}
    assert proc.wait(30) == -signal.SIGKILL
    # A's worker died with A: its CPU comes back to the cluster; B still serves with its own.
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0.0) < cpus_before + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0.0) >= cpus_before + 1
    assert sum(gateway_b.pool.counters.routed.values()) == len(prompts)  # each one failed over once
    statuses = gateway_b.loop.call(gateway_b.pool.status())
    assert [(s.alive, s.restarts) for s in statuses] == [(True, 0)]
