"""End to end: a real local Ray cluster (tiny model, CPU workers), the real WorkerPool and a real gRPC
gateway on 127.0.0.1, driven by the real client and by generic gRPC clients.

One Ray session, pool and server per module; the server's event loop runs in a background thread so
that each test can drive its own client loop. The oracle for token ids is the Engine alone.
"""

from __future__ import annotations

import asyncio
import random
import threading
import urllib.request
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from mlaserve.cluster.client import DecoderClient, build_request
from mlaserve.cluster.server import GatewayServer, ServerConfig
from mlaserve.cluster.service import SERVICE_NAME
from mlaserve.worker.types import FinishReason, SamplingParams
from tests.ray_start import start_local_ray

pytestmark = pytest.mark.ray

NUM_WORKERS = 3
MODEL = "tiny"
ENGINE_KWARGS: dict[str, Any] = {"num_pages": 96}  # small caches: page accounting is visible


class LoopThread:
    """An asyncio loop in a daemon thread: the server and pool live here for the whole module."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway-loop", daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 180) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Cluster:
    server: GatewayServer
    pool: Any
    loop: LoopThread

    @property
    def address(self) -> str:
        return self.server.address


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    from mlaserve.cluster.pool import PoolConfig, WorkerPool

    start_local_ray(num_cpus=NUM_WORKERS + 1)
    loop = LoopThread()
    pool = WorkerPool(PoolConfig(model=MODEL, num_workers=NUM_WORKERS, engine_kwargs=ENGINE_KWARGS))
    server = GatewayServer(
        pool,
        ServerConfig(
            host="127.0.0.1", port=0, metrics_port=0, metrics_host="127.0.0.1", status_interval_s=0.2
        ),
    )
    try:
        loop.call(pool.start())
        loop.call(server.start())
        yield Cluster(server, pool, loop)
    finally:
        loop.call(server.stop(grace=1))
        loop.call(pool.shutdown())
        loop.close()
        ray.shutdown()


@pytest.fixture(scope="module")
def engine():
    """The oracle: the Engine alone, in this process, configured like the workers."""
    from mlaserve.worker import Engine

    return Engine.from_pretrained(MODEL, **ENGINE_KWARGS)


def run(coro: Coroutine[Any, Any, Any], timeout: float = 240) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll an async predicate until it returns something truthy."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert loop.time() < end, f"{what} not reached within {timeout} s"
        await asyncio.sleep(0.1)


async def idle(client: DecoderClient) -> bool:
    """Every worker reports no used pages and no running or waiting request."""
    status = await client.status()
    return all(w.used_pages == 0 and w.running == 0 and w.waiting == 0 for w in status.workers)


def test_streamed_and_unary_greedy_match_the_engine_alone(cluster, engine, seed):
    rng = random.Random(seed)
    prompts = ["Hello, MLA!", "The latent cache holds 576 values per token.", "x"]
    prompts.append("".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(5, 80))))
    sampling = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    want = engine.generate(prompts, sampling)

    async def body():
        async with DecoderClient(cluster.address, timeout=120) as client:
            for prompt, ref in zip(prompts, want):
                chunks = [c async for c in client.stream(prompt, sampling=sampling)]
                ids = [t for c in chunks for t in c.delta.token_ids]
                assert tuple(ids) == ref.token_ids, prompt
                assert "".join(c.delta.text for c in chunks) == ref.text
                last = chunks[-1].delta
                assert last.finish_reason is FinishReason.LENGTH and all(
                    not c.delta.finished for c in chunks[:-1]
                )
                assert last.usage.prompt_tokens == ref.usage.prompt_tokens
                assert last.usage.completion_tokens == len(ids) == 10
                assert chunks[0].delta.request_id.startswith("req-")
                assert chunks[-1].worker_id.strip()

                one = await client.generate(
                    prompt, sampling=sampling, request_id=f"unary-{rng.randrange(10**9)}"
                )
                assert one.token_ids == ref.token_ids and one.text == ref.text
                assert one.finish_reason is FinishReason.LENGTH and one.usage.completion_tokens == 10
            # Token-id prompts take the same path.
            ids = list(engine.tokenizer.encode(prompts[0]))
            one = await client.generate(ids, sampling=sampling)
            assert one.token_ids == want[0].token_ids

    run(body())


def test_hundred_concurrent_requests_spread_over_workers_all_complete(cluster, engine, seed):
    rng = random.Random(seed)
    n = 120
    prompts = ["".join(chr(rng.randrange(97, 123)) for _ in range(rng.randrange(1, 60))) for _ in range(n)]
    lengths = [rng.randrange(1, 7) for _ in range(n)]
    # The oracle, grouped by max_tokens (the engine alone, greedy).
    want: dict[int, tuple[int, ...]] = {}
    for m in sorted(set(lengths)):
        idx = [i for i in range(n) if lengths[i] == m]
        outs = engine.generate(
            [prompts[i] for i in idx], SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
        )
        want.update({i: o.token_ids for i, o in zip(idx, outs)})

    async def one(client: DecoderClient, i: int):
        sampling = SamplingParams(max_tokens=lengths[i], temperature=0.0, ignore_eos=True)
        if i % 2:
            return await client.generate(prompts[i], sampling=sampling, request_id=f"burst-{i}")
        chunks = [c async for c in client.stream(prompts[i], sampling=sampling, request_id=f"burst-{i}")]
        return chunks

    async def body():
        async with DecoderClient(cluster.address, timeout=180) as client:
            results = await asyncio.gather(*(one(client, i) for i in range(n)))
            workers = set()
            for i, r in enumerate(results):
                if i % 2:
                    ids, wid, usage = r.token_ids, r.worker_id, r.usage
                    assert r.request_id == f"burst-{i}"
                else:
                    ids = tuple(t for c in r for t in c.delta.token_ids)
                    wid, usage = r[-1].worker_id, r[-1].delta.usage
                assert ids == want[i], f"request {i}"
                assert usage.completion_tokens == lengths[i]
                workers.add(wid)
            assert len(workers) >= 2, f"the router used only {workers}"
            await wait_for(lambda: idle(client), what="all pages freed")

    run(body())


def test_client_cancel_and_deadline_free_pages(cluster):
    prompt = "p" * 300  # 5 pages of 64 tokens once prefilled

    async def body():
        async with DecoderClient(cluster.address, timeout=120) as client:
            await wait_for(lambda: idle(client), what="an idle cluster")
            sampling = SamplingParams(max_tokens=3000, temperature=0.0, ignore_eos=True)
            stream = client.stream(prompt, sampling=sampling, request_id="to-cancel")
            got = 0
            async for chunk in stream:
                got += len(chunk.delta.token_ids)
                if got >= 3:
                    break

            async def holding() -> bool:
                return (await client.status()).used_pages >= 5

            await wait_for(holding, what="the running request's pages to show")
            await stream.aclose()  # cancels the RPC
            await wait_for(lambda: idle(client), what="pages freed after the cancel")

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.generate(prompt, sampling=sampling, request_id="too-slow", timeout=1.5)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                _ = [c async for c in client.stream(prompt, sampling=sampling, timeout=1.5)]
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_for(lambda: idle(client), what="pages freed after the deadlines")
            # The workers still serve.
            ok = await client.generate("still here", sampling=SamplingParams(max_tokens=3, temperature=0.0))
            assert ok.usage.completion_tokens == 3 or ok.finish_reason is FinishReason.STOP

    run(body())


def test_bad_requests_name_the_field_and_break_nothing_else(cluster, engine):
    sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = engine.generate(["a concurrent good request"], sampling)[0].token_ids

    async def body():
        async with DecoderClient(cluster.address, timeout=60) as client:
            good = asyncio.create_task(client.generate("a concurrent good request", sampling=sampling))
            cases = []
            req = build_request("x", SamplingParams(max_tokens=4))
            req.sampling.top_p = 0.0
            cases.append((req, ("sampling.top_p",)))
            req = build_request("x", SamplingParams(max_tokens=4))
            req.sampling.temperature = -1.0
            cases.append((req, ("sampling.temperature",)))
            cases.append((build_request("", SamplingParams(max_tokens=4)), ("prompt",)))
            # Checked by the pool / engine rather than the gateway: out-of-vocabulary ids, and a
            # prompt + max_tokens beyond the model's context (4096 for the tiny preset).
            cases.append((build_request([1, 2, 10**7], SamplingParams(max_tokens=4)), ("prompt_token_ids",)))
            too_long = build_request("y" * 100, SamplingParams(max_tokens=4096))
            cases.append((too_long, ("sampling.max_tokens", "prompt")))
            for req, fields in cases:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await client._stub.GenerateUnary(req, timeout=60)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
                assert info.value.details().startswith(fields), (fields, info.value.details())
            assert (await good).token_ids == want
            await wait_for(lambda: idle(client), what="an idle cluster")

    run(body())


def test_health_reflection_status_and_metrics(cluster):
    from google.protobuf import descriptor_pool
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(cluster.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert SERVICE_NAME in set(db.get_services())
        service = descriptor_pool.DescriptorPool(db).FindServiceByName(SERVICE_NAME)
        assert {m.name for m in service.methods} == {"Generate", "GenerateUnary", "GetClusterStatus"}
        assert service.methods_by_name["Generate"].server_streaming
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING

    async def body():
        async with DecoderClient(cluster.address, timeout=60) as client:
            status = await client.status()
            assert len(status.workers) == NUM_WORKERS and status.serving
            for w in status.workers:
                assert w.alive and w.health == "healthy" and w.total_pages == ENGINE_KWARGS["num_pages"]
                assert w.device.startswith("cpu") and w.page_size == 64
            assert status.total_pages == NUM_WORKERS * ENGINE_KWARGS["num_pages"]
            return [w.worker_id for w in status.workers]

    worker_ids = run(body())
    cluster.loop.call(cluster.server.refresh_metrics())
    url = f"http://127.0.0.1:{cluster.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for wid in worker_ids:
        assert f'mlaserve_worker_occupancy{{worker="{wid}"}}' in text
    assert "mlaserve_time_to_first_token_seconds_count" in text
    assert "mlaserve_routing_decisions_total{" in text
