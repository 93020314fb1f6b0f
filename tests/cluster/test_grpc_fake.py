"""The gateway over a real grpc.aio server on 127.0.0.1, with a fake pool that follows the Pool API.

The fake pool generates a deterministic token sequence per prompt (the tests compute the expected
one independently), keeps per-request pages while a stream is open and records which requests
were closed before finishing, so cancellation and deadlines can be checked end to end without
Ray. tests/cluster/test_grpc_ray.py runs the same paths against the real WorkerPool.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from mlaserve.cluster.client import DecoderClient
from mlaserve.cluster.errors import Draining, InvalidRequest, QueueFull
from mlaserve.cluster.server import GatewayServer, ServerConfig
from mlaserve.cluster.service import DEADLINE_SLACK_S, SERVICE_NAME, ServiceLimits, cancellation_code
from mlaserve.cluster.types import ClusterDelta, GenerationRequest, WorkerStatus
from mlaserve.worker.load import WorkerLoad
from mlaserve.worker.types import FinishReason, RequestDelta, SamplingParams, Usage

VOCAB = 1000
PAGE = 4


def expected_tokens(prompt_ids: list[int], sampling: SamplingParams) -> tuple[list[int], FinishReason]:
    """The oracle: what FakePool generates for a prompt (written independently of FakePool.generate)."""
    base = sum(prompt_ids) * 31
    out: list[int] = []
    for i in range(sampling.max_tokens):
        t = (base + 7 * i) % VOCAB
        out.append(t)
        if t in sampling.stop_token_ids:
            return out, FinishReason.STOP
    return out, FinishReason.LENGTH


def text_of(ids: list[int]) -> str:
    return "".join(f"<{t}>" for t in ids)


class ByteTokenizer:
    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


@dataclass
class FakeCounters:
    """The fields of cluster/pool.py PoolCounters that the metrics read."""

    routed: dict[tuple[str, str], int] = field(default_factory=dict)
    retries: int = 2
    resumes: int = 1
    worker_failures: int = 1
    worker_losses: int = 0
    suspected_poison: int = 0
    preemptions: dict[str, int] = field(default_factory=lambda: {"fake-0": 5})
    rejected_queue_full: int = 0
    rejected_invalid: int = 0
    scale_ups: int = 1
    scale_downs: int = 0


class FakePool:
    """Follows the Pool API: generate(req) -> AsyncIterator[ClusterDelta], status(), drain()."""

    def __init__(self, workers: int = 3, step_s: float = 0.005, max_active: int = 1000, pages: int = 10_000):
        self.workers = [f"fake-{i}" for i in range(workers)]
        self.step_s = step_s
        self.max_active = max_active
        self.total_pages = pages
        self.tokenizer = ByteTokenizer()
        self.pages: dict[str, tuple[str, int]] = {}  # request_id -> (worker, pages held)
        self.closed_early: set[str] = set()  # streams closed before their final delta
        self.finished: set[str] = set()
        self.routed: dict[str, int] = {w: 0 for w in self.workers}
        self.draining = False
        self.fail_prompts: set[str] = set()  # text prompts that make the fake raise RuntimeError
        self.gate = asyncio.Event()  # cleared: every stream pauses before its next token
        self.gate.set()
        self._next = 0

    @property
    def counters(self) -> FakeCounters:
        return FakeCounters(routed={("round_robin", w): n for w, n in self.routed.items()})

    async def generate(self, req: GenerationRequest) -> AsyncIterator[ClusterDelta]:
        # An async generator: like a real pool's, its checks run on the first __anext__.
        if self.draining:
            raise Draining("draining")
        if len(self.pages) >= self.max_active:
            raise QueueFull("every worker's queue is full")
        if req.prompt is not None and req.prompt in self.fail_prompts:
            raise RuntimeError("worker exploded")
        ids = (
            list(req.prompt_token_ids)
            if req.prompt_token_ids is not None
            else self.tokenizer.encode(req.prompt)
        )
        for i, t in enumerate(ids):
            if t >= VOCAB:
                raise InvalidRequest(
                    f"prompt_token_ids[{i}]", f"token id {t} is outside the vocabulary ({VOCAB})"
                )
        worker = self.workers[self._next % len(self.workers)]
        self._next += 1
        self.routed[worker] += 1
        rid = req.request_id
        base = sum(ids) * 31
        produced: list[int] = []
        self.pages[rid] = (worker, math.ceil(len(ids) / PAGE))
        try:
            for i in range(req.sampling.max_tokens):
                await asyncio.sleep(self.step_s)
                await self.gate.wait()
                t = (base + 7 * i) % VOCAB
                produced.append(t)
                self.pages[rid] = (worker, math.ceil((len(ids) + len(produced)) / PAGE))
                stop = t in req.sampling.stop_token_ids
                last = stop or i == req.sampling.max_tokens - 1
                if last:
                    self.finished.add(rid)
                yield ClusterDelta(
                    delta=RequestDelta(
                        request_id=rid,
                        token_ids=(t,),
                        text=text_of([t]),
                        finish_reason=(FinishReason.STOP if stop else FinishReason.LENGTH) if last else None,
                        usage=Usage(len(ids), len(produced), 0) if last else None,
                    ),
                    worker_id=worker,
                )
                if last:
                    return
        finally:
            del self.pages[rid]  # pages freed whether the stream finished or was closed
            if rid not in self.finished:
                self.closed_early.add(rid)

    async def status(self) -> list[WorkerStatus]:
        out = []
        for w in self.workers:
            used = sum(p for ww, p in self.pages.values() if ww == w)
            running = sum(1 for ww, _ in self.pages.values() if ww == w)
            load = WorkerLoad(
                worker_id=w,
                seq=self._next,
                total_pages=self.total_pages,
                free_pages=self.total_pages - used,
                reserved_pages=0,
                running=running,
                waiting=0,
                queued_prompt_tokens=0,
                tokens_per_s=running / self.step_s,
                draining=self.draining,
            )
            out.append(WorkerStatus(worker_id=w, load=load, alive=True))
        return out

    async def drain(self) -> None:
        self.draining = True


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _start(pool: FakePool, **cfg: Any) -> tuple[GatewayServer, DecoderClient]:
    server = GatewayServer(pool, ServerConfig(host="127.0.0.1", port=0, status_interval_s=0.05, **cfg))
    await server.start()
    client = DecoderClient(server.address, timeout=30)
    await client.wait_ready()
    return server, client


async def _wait_until(predicate, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_streamed_and_unary_match_the_oracle(seed):
    rng = random.Random(seed)

    async def body():
        pool = FakePool()
        server, client = await _start(pool)
        try:
            for _ in range(4):
                prompt = "".join(chr(rng.randrange(97, 123)) for _ in range(rng.randrange(1, 30)))
                sampling = SamplingParams(max_tokens=rng.randrange(1, 12), temperature=0.0)
                want, reason = expected_tokens(list(prompt.encode()), sampling)
                chunks = [c async for c in client.stream(prompt, sampling=sampling)]
                got = [t for c in chunks for t in c.delta.token_ids]
                assert got == want
                assert "".join(c.delta.text for c in chunks) == text_of(want)
                assert [c.delta.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + [reason]
                assert chunks[-1].delta.usage == Usage(len(prompt), len(want), 0)
                rid = chunks[0].delta.request_id
                assert rid.startswith("req-") and all(c.delta.request_id == rid for c in chunks)
                assert len({c.worker_id for c in chunks}) == 1 and chunks[0].worker_id in pool.workers

                one = await client.generate(prompt, sampling=sampling, request_id="mine")
                assert one.request_id == "mine" and list(one.token_ids) == want and one.text == text_of(want)
                assert one.finish_reason == reason and one.usage == Usage(len(prompt), len(want), 0)

                ids = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 20))]
                want_ids, _ = expected_tokens(ids, sampling)
                assert list((await client.generate(ids, sampling=sampling)).token_ids) == want_ids
            stop_at = expected_tokens([1, 2, 3], SamplingParams(max_tokens=9))[0][4]
            stopped = await client.generate(
                [1, 2, 3], sampling=SamplingParams(max_tokens=9, stop_token_ids=(stop_at,))
            )
            assert stopped.finish_reason is FinishReason.STOP and stopped.token_ids[-1] == stop_at
            assert len(stopped.token_ids) <= 5
            assert not pool.pages and not pool.closed_early
        finally:
            await client.close()
            await server.stop()

    run(body())


def test_bad_requests_get_invalid_argument_and_break_nothing_else():
    async def body():
        pool = FakePool(step_s=0.01)
        server, client = await _start(pool, limits=ServiceLimits(max_tokens=64, max_prompt_tokens=100))
        try:
            good = asyncio.create_task(client.generate("a good one", sampling=SamplingParams(max_tokens=30)))
            bad_cases = [
                ("x", SamplingParams(max_tokens=4), "sampling.top_p: must be in (0, 1]", {"top_p": 0.0}),
                (
                    "x",
                    SamplingParams(max_tokens=4),
                    "sampling.max_tokens: must be in [1, 64]",
                    {"max_tokens": 65},
                ),
                ([5, 1000, 7], SamplingParams(max_tokens=4), "prompt_token_ids[1]: token id 1000", {}),
                ([1] * 101, SamplingParams(max_tokens=4), "prompt_token_ids: 101 tokens exceed", {}),
                ("y" * 101, SamplingParams(max_tokens=4), "prompt: 101 tokens exceed the limit of 100", {}),
            ]
            from mlaserve.cluster.client import build_request

            for prompt, sampling, message, override in bad_cases:
                req = build_request(prompt, sampling)
                for k, v in override.items():
                    setattr(req.sampling, k, v)
                for rpc in (client._stub.GenerateUnary, client._stub.Generate):
                    call = rpc(req, timeout=10)
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        if rpc is client._stub.Generate:
                            _ = [m async for m in call]
                        else:
                            await call
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert info.value.details().startswith(message), info.value.details()
            done = await good
            assert (
                list(done.token_ids) == expected_tokens(list(b"a good one"), SamplingParams(max_tokens=30))[0]
            )
        finally:
            await client.close()
            await server.stop()

    run(body())


def test_queue_full_draining_and_internal_errors_map_to_codes():
    async def body():
        pool = FakePool(step_s=0.02, max_active=1)
        pool.fail_prompts.add("boom")
        server, client = await _start(pool)
        try:
            first = asyncio.create_task(client.generate("long", sampling=SamplingParams(max_tokens=25)))
            await _wait_until(lambda: len(pool.pages) == 1)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.generate("second", sampling=SamplingParams(max_tokens=2))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full" in info.value.details()
            await first
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.generate("boom")
            assert info.value.code() == grpc.StatusCode.INTERNAL and "worker exploded" in info.value.details()

            # Draining: in-flight requests finish, new ones get UNAVAILABLE, health says NOT_SERVING.
            inflight = asyncio.create_task(
                client.generate("in flight", sampling=SamplingParams(max_tokens=15))
            )
            await _wait_until(lambda: len(pool.pages) == 1)
            assert await client.health() == "SERVING" and await client.health(SERVICE_NAME) == "SERVING"
            drained = asyncio.create_task(server.drain(timeout=10))
            await _wait_until(lambda: server.service.draining)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.generate("late")
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in info.value.details()
            assert await client.health() == "NOT_SERVING"
            result = await inflight
            assert result.finish_reason is FinishReason.LENGTH and len(result.token_ids) == 15
            assert await drained is True
            assert not (await client.status()).serving
        finally:
            await client.close()
            await server.stop()

    run(body())


def test_cancel_and_deadline_close_the_pool_stream_and_free_pages():
    async def body():
        pool = FakePool(step_s=0.02)
        server, client = await _start(pool)
        try:
            # A client that stops reading after 3 deltas cancels the RPC.
            stream = client.stream("cancel me", sampling=SamplingParams(max_tokens=200), request_id="c1")
            got = 0
            async for _ in stream:
                got += 1
                if got == 3:
                    break
            await stream.aclose()
            await _wait_until(lambda: "c1" in pool.closed_early)
            assert "c1" not in pool.pages

            # A deadline shorter than the generation: DEADLINE_EXCEEDED, and the pool stream is closed.
            for rpc in ("stream", "unary"):
                rid = f"d-{rpc}"
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    if rpc == "stream":
                        _ = [
                            c
                            async for c in client.stream(
                                "slow", sampling=SamplingParams(max_tokens=500), request_id=rid, timeout=0.3
                            )
                        ]
                    else:
                        await client.generate(
                            "slow", sampling=SamplingParams(max_tokens=500), request_id=rid, timeout=0.3
                        )
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                await _wait_until(lambda rid=rid: rid in pool.closed_early)
            assert not pool.pages
            # The service's own bookkeeping is clean too.
            await _wait_until(lambda: server.service.active_requests == 0)
            text = server.metrics.render().decode()
            assert 'mlaserve_requests_total{code="CANCELLED",method="Generate"} 1.0' in text
            assert 'mlaserve_requests_total{code="DEADLINE_EXCEEDED",method="Generate"} 1.0' in text
            assert 'mlaserve_requests_total{code="DEADLINE_EXCEEDED",method="GenerateUnary"} 1.0' in text
            assert "mlaserve_requests_in_flight 0.0" in text
        finally:
            await client.close()
            await server.stop()

    run(body())


@pytest.mark.parametrize(
    ("remaining", "code"),
    [
        (None, grpc.StatusCode.CANCELLED),  # no deadline: only the client can have cancelled
        (5.0, grpc.StatusCode.CANCELLED),
        (DEADLINE_SLACK_S * 1.01, grpc.StatusCode.CANCELLED),
        (DEADLINE_SLACK_S, grpc.StatusCode.DEADLINE_EXCEEDED),  # the client's deadline fired first
        (0.003, grpc.StatusCode.DEADLINE_EXCEEDED),
        (0.0, grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
def test_a_cancel_at_the_deadline_counts_as_the_deadline(remaining, code):
    assert cancellation_code(remaining) is code


def test_message_size_limit_and_cluster_status():
    async def body():
        pool = FakePool(step_s=0.05)
        server, client = await _start(pool, max_message_bytes=4096)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.generate("z" * 5000)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            running = [
                asyncio.create_task(
                    client.generate(f"p{i}" * (i + 1), sampling=SamplingParams(max_tokens=20))
                )
                for i in range(4)
            ]
            await _wait_until(lambda: len(pool.pages) == 4)
            pool.gate.clear()  # freeze the fake so its status cannot move between the two reads
            await asyncio.sleep(0.1)
            want = {s.worker_id: s.load for s in await pool.status()}
            status = await client.status()
            assert [w.worker_id for w in status.workers] == pool.workers
            for w in status.workers:
                load = want[w.worker_id]
                assert (w.total_pages, w.used_pages, w.free_pages) == (
                    load.total_pages,
                    load.used_pages,
                    load.free_pages,
                )
                assert (w.running, w.waiting, w.health, w.alive) == (load.running, 0, "healthy", True)
                assert w.occupancy == pytest.approx(load.occupancy, rel=1e-6)
            assert status.serving and status.running == 4
            assert status.used_pages == sum(load.used_pages for load in want.values())
            assert status.total_pages == 3 * pool.total_pages
            pool.gate.set()
            await asyncio.gather(*running)
        finally:
            await client.close()
            await server.stop()

    run(body())


def test_a_taken_port_is_an_error():
    async def body():
        pool = FakePool()
        server, client = await _start(pool)
        try:
            other = GatewayServer(pool, ServerConfig(host="127.0.0.1", port=server.port))
            with pytest.raises(OSError, match="cannot bind"):
                await other.start()
        finally:
            await client.close()
            await server.stop()

    run(body())


def test_health_and_reflection_answer_generic_clients():
    from google.protobuf import descriptor_pool
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    async def body():
        pool = FakePool()
        server, client = await _start(pool)
        try:

            def generic() -> tuple[list[str], list[str], int, int]:
                with grpc.insecure_channel(server.address) as channel:
                    db = ProtoReflectionDescriptorDatabase(channel)
                    services = sorted(db.get_services())
                    desc = descriptor_pool.DescriptorPool(db).FindServiceByName(SERVICE_NAME)
                    methods = sorted(m.name for m in desc.methods)
                    stub = health_pb2_grpc.HealthStub(channel)
                    overall = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
                    decoder = stub.Check(
                        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10
                    ).status
                    with pytest.raises(grpc.RpcError) as info:
                        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
                    assert info.value.code() == grpc.StatusCode.NOT_FOUND
                    return services, methods, overall, decoder

            services, methods, overall, decoder = await asyncio.to_thread(generic)
            assert SERVICE_NAME in services and "grpc.health.v1.Health" in services
            assert "grpc.reflection.v1alpha.ServerReflection" in services
            assert methods == ["Generate", "GenerateUnary", "GetClusterStatus"]
            assert overall == decoder == health_pb2.HealthCheckResponse.SERVING
        finally:
            await client.close()
            await server.stop()

    run(body())


def test_bearer_token_guards_the_decoder_but_not_health():
    async def body():
        pool = FakePool()
        server = GatewayServer(pool, ServerConfig(host="127.0.0.1", port=0, auth_token="s3cret"))
        assert "s3cret" not in repr(server.config)
        await server.start()
        clients = {t: DecoderClient(server.address, timeout=10, token=t) for t in (None, "wrong", "s3cret")}
        try:
            for token in (None, "wrong"):
                c = clients[token]
                for call in (
                    lambda c=c: c.generate("x", sampling=SamplingParams(max_tokens=2)),
                    lambda c=c: c.status(),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call()
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    _ = [x async for x in c.stream("x", sampling=SamplingParams(max_tokens=2))]
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert await c.health() == "SERVING"
            ok = clients["s3cret"]
            got = await ok.generate("x", sampling=SamplingParams(max_tokens=2))
            assert list(got.token_ids) == expected_tokens(list(b"x"), SamplingParams(max_tokens=2))[0]
            assert len((await ok.status()).workers) == 3
            assert not pool.pages and not pool.routed["fake-1"]  # refused requests never reached the pool
            text = server.metrics.render().decode()
            assert 'mlaserve_requests_total{code="UNAUTHENTICATED",method="GenerateUnary"} 2.0' in text
        finally:
            for c in clients.values():
                await c.close()
            await server.stop()

    run(body())
