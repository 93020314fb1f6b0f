"""WorkerPool on a real local Ray cluster with the tiny model on the CPU: streams equal the engine
alone, many concurrent requests, cancellation frees pages, a killed worker loses no token, bad
requests are refused cleanly. One Ray session and one pool for the module (tests run in order)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time

import pytest

ray = pytest.importorskip("ray")

from mlaserve.cluster.errors import Draining, InvalidRequest, QueueFull  # noqa: E402
from mlaserve.cluster.pool import WorkerPool  # noqa: E402
from mlaserve.cluster.pool_config import PoolConfig  # noqa: E402
from mlaserve.cluster.types import GenerationRequest  # noqa: E402
from mlaserve.worker import Engine, SamplingParams  # noqa: E402
from tests.ray_start import start_local_ray  # noqa: E402

pytestmark = pytest.mark.ray

NUM_PAGES = 32


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def pool(loop):
    started_ray = not ray.is_initialized()
    if started_ray:
        start_local_ray(num_cpus=4)
    cfg = PoolConfig(
        model="tiny",
        num_workers=2,
        engine_kwargs={"num_pages": NUM_PAGES},
        load_poll_interval_s=0.1,
        health_check_interval_s=0.5,
        health_timeout_s=20.0,
    )
    p = WorkerPool(cfg)
    loop.run_until_complete(p.start())
    yield p
    loop.run_until_complete(p.shutdown())
    if started_ray:
        ray.shutdown()


@pytest.fixture(scope="module")
def engine_alone():
    return Engine.from_pretrained("tiny", device="cpu", num_pages=NUM_PAGES)


async def consume(pool: WorkerPool, req: GenerationRequest):
    return [d async for d in pool.generate(req)]


def tokens_of(deltas) -> tuple[int, ...]:
    return tuple(t for d in deltas for t in d.delta.token_ids)


def check_stream(deltas, expected):
    assert all(not d.delta.finished for d in deltas[:-1]) and deltas[-1].delta.finished
    assert tokens_of(deltas) == expected.token_ids
    assert "".join(d.delta.text for d in deltas) == expected.text
    assert deltas[-1].delta.finish_reason == expected.finish_reason
    assert deltas[-1].delta.usage.prompt_tokens == expected.usage.prompt_tokens
    assert deltas[-1].delta.usage.completion_tokens == expected.usage.completion_tokens


def test_stream_equals_engine_alone(pool, loop, engine_alone, seed):
    rng = random.Random(seed)
    reqs = []
    for i in range(6):
        sp = SamplingParams(max_tokens=rng.randint(1, 16), temperature=0.0)
        if i % 2:
            reqs.append(
                GenerationRequest(
                    f"eq{i}", sp, prompt="".join(chr(rng.randrange(32, 127)) for _ in range(30))
                )
            )
        else:
            reqs.append(
                GenerationRequest(f"eq{i}", sp, prompt_token_ids=tuple(rng.randrange(258) for _ in range(40)))
            )
    expected = engine_alone.generate(
        [r.prompt if r.prompt is not None else list(r.prompt_token_ids) for r in reqs],
        [r.sampling for r in reqs],
    )

    async def main():
        return await asyncio.gather(*(consume(pool, r) for r in reqs))

    streams = loop.run_until_complete(main())
    for deltas, exp in zip(streams, expected):
        check_stream(deltas, exp)
        assert deltas[0].worker_id in {"w0", "w1"}


def test_many_concurrent_variable_length_requests(pool, loop, engine_alone, seed):
    rng = random.Random(seed)
    n = 120
    prompts = [[rng.randrange(258) for _ in range(rng.randint(1, 100))] for _ in range(n)]
    params = [
        SamplingParams(max_tokens=rng.randint(1, 8), temperature=0.0, ignore_eos=rng.random() < 0.5)
        for _ in range(n)
    ]
    expected = engine_alone.generate(prompts, params)
    before = dict(pool.counters.routed)

    async def main():
        return await asyncio.gather(
            *(
                consume(pool, GenerationRequest(f"many{i}", sp, prompt_token_ids=tuple(p)))
                for i, (p, sp) in enumerate(zip(prompts, params))
            )
        )

    streams = loop.run_until_complete(main())
    for deltas, exp in zip(streams, expected):
        check_stream(deltas, exp)
    used = {k[1]: v - before.get(k, 0) for k, v in pool.counters.routed.items()}
    assert sum(used.values()) == n and min(used.get("w0", 0), used.get("w1", 0)) >= n // 5  # spread out


async def wait_all_free(pool: WorkerPool, timeout_s: float = 15.0) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        loads = [await pool.actor_of(w).load.remote() for w in ("w0", "w1")]
        if all(ld.free_pages == ld.total_pages and ld.running == ld.waiting == 0 for ld in loads):
            return loads
        if time.monotonic() > deadline:
            return loads
        await asyncio.sleep(0.05)


def test_cancel_frees_pages(pool, loop):
    sp = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)

    async def main():
        gen = pool.generate(GenerationRequest("cancel-me", sp, prompt_token_ids=tuple(range(200))))
        first = [await gen.__anext__() for _ in range(3)]
        worker = first[0].worker_id
        busy = await pool.actor_of(worker).load.remote()
        await gen.aclose()
        # A consumer task cancelled mid-stream behaves the same.
        got = asyncio.Event()

        async def reader():
            async for _ in pool.generate(GenerationRequest("cancel-task", sp, prompt_token_ids=(1, 2, 3))):
                got.set()

        task = asyncio.create_task(reader())
        await got.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return busy, await wait_all_free(pool)

    busy, loads = loop.run_until_complete(main())
    assert busy.free_pages < busy.total_pages
    for ld in loads:
        assert ld.free_pages == ld.total_pages and ld.running == 0 and ld.waiting == 0


def test_bad_requests_raise_and_break_nothing(pool, loop, engine_alone):
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    good = GenerationRequest("good", sp, prompt_token_ids=tuple(range(30, 90)))
    expected = engine_alone.generate([list(good.prompt_token_ids)], sp)[0]
    bad = [
        (GenerationRequest("b1", sp, prompt=""), "prompt"),
        (GenerationRequest("b2", sp, prompt_token_ids=()), "prompt_token_ids"),
        (GenerationRequest("b3", sp, prompt_token_ids=(1, 10_000)), "prompt_token_ids"),
        (GenerationRequest("b4", sp, prompt="hi", prompt_token_ids=(1,)), "prompt"),
        (GenerationRequest("b5", sp), "prompt"),
        (
            GenerationRequest("b6", SamplingParams(max_tokens=4090), prompt_token_ids=(1,) * 10),
            "sampling.max_tokens",
        ),
        # Fits the model's context but not a worker's 32-page cache: the engine refuses it.
        (GenerationRequest("b7", SamplingParams(max_tokens=3000), prompt_token_ids=(1,) * 100), "max_tokens"),
        (GenerationRequest("good", sp, prompt="dup"), "request_id"),
        (GenerationRequest("", sp, prompt="x"), "request_id"),
    ]

    async def main():
        task = asyncio.create_task(consume(pool, good))
        await asyncio.sleep(0)
        fields = []
        for req, _ in bad:
            with pytest.raises(InvalidRequest) as info:
                await consume(pool, req)
            fields.append(info.value.field)
        return fields, await task

    fields, deltas = loop.run_until_complete(main())
    assert fields == [f for _, f in bad]
    check_stream(deltas, expected)
    assert all(s.alive and s.restarts == 0 for s in loop.run_until_complete(pool.status()))


def test_queue_full_when_every_queue_is_at_its_limit(pool, loop):
    sp = SamplingParams(max_tokens=4, temperature=0.0)
    original = pool.router.config
    pool.router.config = dataclasses.replace(original, max_queued_per_worker=1)

    async def main():
        return await asyncio.gather(
            *(consume(pool, GenerationRequest(f"q{i}", sp, prompt_token_ids=(5, 6, 7))) for i in range(12)),
            return_exceptions=True,
        )

    try:
        results = loop.run_until_complete(main())
    finally:
        pool.router.config = original
    full = [r for r in results if isinstance(r, QueueFull)]
    done = [r for r in results if isinstance(r, list)]
    assert full and done and len(full) + len(done) == 12
    assert all(r[-1].delta.finished for r in done)


def test_killed_worker_loses_no_token_and_is_replaced(pool, loop, engine_alone, seed):
    rng = random.Random(seed)
    n = 10
    prompts = [[rng.randrange(258) for _ in range(rng.randint(1, 60))] for _ in range(n)]
    params = [
        SamplingParams(max_tokens=rng.randint(150, 300), temperature=0.0, ignore_eos=True) for _ in range(n)
    ]
    expected = engine_alone.generate(prompts, params)
    restarts_before = {s.worker_id: s.restarts for s in loop.run_until_complete(pool.status())}

    async def main():
        progress: dict[str, int] = {}
        workers: dict[str, str] = {}

        async def run(i: int):
            out = []
            async for d in pool.generate(
                GenerationRequest(f"k{i}", params[i], prompt_token_ids=tuple(prompts[i]))
            ):
                out.append(d)
                progress[f"k{i}"] = len(out)
                workers.setdefault(f"k{i}", d.worker_id)
            return out

        tasks = [asyncio.create_task(run(i)) for i in range(n)]
        while sum(1 for rid, k in progress.items() if k >= 3 and workers.get(rid) == "w0") < 2:
            await asyncio.sleep(0.005)
            assert not any(t.done() for t in tasks), "requests finished before the kill: make them longer"
        ray.kill(pool.actor_of("w0"), no_restart=True)
        streams = await asyncio.gather(*tasks)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = {s.worker_id: s for s in await pool.status()}
            if status["w0"].alive:
                break
            await asyncio.sleep(0.1)
        return streams, status

    streams, status = loop.run_until_complete(main())
    for deltas, exp in zip(streams, expected):
        check_stream(deltas, exp)  # every token exactly once, in order, text and usage fixed up
    assert any(len({d.worker_id for d in deltas}) == 2 for deltas in streams)  # some moved mid-stream
    assert status["w0"].alive and status["w0"].restarts == restarts_before["w0"] + 1
    assert pool.counters.resumes >= 2 and pool.counters.worker_failures >= 1


def test_add_and_retire_a_worker(pool, loop):
    sp = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)

    async def main():
        wid = await pool.add_worker()
        assert pool.worker_states()[wid] == "starting"  # counted before its actor answers
        deadline = time.monotonic() + 60
        while pool.worker_states()[wid] != "ready" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert pool.worker_states()[wid] == "ready"
        # Route a request there, then retire the worker while it runs: it finishes first.
        pool.router.set_draining("w0")
        pool.router.set_draining("w1")
        running = asyncio.create_task(consume(pool, GenerationRequest("on-new", sp, prompt_token_ids=(9, 9))))
        await asyncio.sleep(0.05)
        pool.router.set_draining("w0", False)
        pool.router.set_draining("w1", False)
        await pool.retire(wid, timeout_s=30)
        return wid, await running, pool.worker_states()

    wid, deltas, states = loop.run_until_complete(main())
    assert deltas[0].worker_id == wid and deltas[-1].delta.finished and len(tokens_of(deltas)) == 30
    assert wid not in states and set(states) == {"w0", "w1"}


def test_drain_refuses_new_requests(pool, loop):
    sp = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)

    async def main():
        running = asyncio.create_task(consume(pool, GenerationRequest("last", sp, prompt_token_ids=(1, 2))))
        await asyncio.sleep(0.05)
        await pool.drain(timeout_s=30)
        with pytest.raises(Draining):
            await consume(pool, GenerationRequest("late", sp, prompt="x"))
        return await running

    deltas = loop.run_until_complete(main())
    assert deltas[-1].delta.finished and len(tokens_of(deltas)) == 20


def test_status_polls_the_workers_first(pool, loop):
    """status() asked right after a request counts it, even when the background poll is slow
    (60 s here: without the refresh the row would still show the load of the loop's first poll)."""
    cfg = PoolConfig(
        model="tiny", num_workers=1, engine_kwargs={"num_pages": NUM_PAGES}, load_poll_interval_s=60.0
    )
    slow = WorkerPool(cfg)
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    async def main():
        await slow.start()
        try:
            before = {s.worker_id: s.load for s in await slow.status(refresh_timeout_s=0)}
            deltas = await consume(slow, GenerationRequest("counted", sp, prompt_token_ids=(5, 6, 7)))
            stale = {s.worker_id: s.load for s in await slow.status(refresh_timeout_s=0)}
            fresh = {s.worker_id: s.load for s in await slow.status()}
            return before, deltas, stale, fresh
        finally:
            await slow.shutdown()

    before, deltas, stale, fresh = loop.run_until_complete(main())
    assert len(tokens_of(deltas)) == 12
    (wid,) = fresh
    assert fresh[wid].seq > stale[wid].seq >= before[wid].seq  # polled now, not by the sleeping loop
    assert fresh[wid].tokens_per_s > 0.0
