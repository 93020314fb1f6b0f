"""Repeated worker deaths on a real local Ray cluster (tiny model, CPU): every stream of a loaded
pool whose workers are killed again and again (both at once included) ends token for token equal
to the engine alone; a planted request that kills every worker it lands on fails alone, after
1 + poison_strikes deaths, and the pool gets back to its two workers.

One Ray session and one pool of PoisonableWorkerActors (tests/cluster/faults.py: a real
WorkerActor that dies on a marked prompt) for the module; the tests run in order.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

ray = pytest.importorskip("ray")

from mlaserve.cluster.errors import SuspectedPoison  # noqa: E402
from mlaserve.cluster.pool import READY, WorkerPool  # noqa: E402
from mlaserve.cluster.pool_config import PoolConfig  # noqa: E402
from mlaserve.cluster.types import GenerationRequest  # noqa: E402
from mlaserve.worker import Engine, SamplingParams  # noqa: E402
from tests.ray_start import start_local_ray  # noqa: E402

from . import faults  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NUM_PAGES = 64
POISON_STRIKES = 2


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
    ray.cloudpickle.register_pickle_by_value(faults)  # the workers need not import tests/
    cfg = PoolConfig(
        model="tiny",
        num_workers=2,
        engine_kwargs={"num_pages": NUM_PAGES},
        load_poll_interval_s=0.1,
        health_check_interval_s=0.5,
        health_timeout_s=60.0,
        poison_strikes=POISON_STRIKES,
    )
    p = WorkerPool(cfg, actor_class=ray.remote(faults.PoisonableWorkerActor))
    loop.run_until_complete(p.start())
    yield p
    loop.run_until_complete(p.shutdown())
    if started_ray:
        ray.shutdown()


@pytest.fixture(scope="module")
def engine_alone():
    return Engine.from_pretrained("tiny", device="cpu", num_pages=NUM_PAGES)


def ready_workers(pool: WorkerPool) -> list[str]:
    return sorted(w for w, s in pool.worker_states().items() if s == READY)


async def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def kill(pool: WorkerPool, worker_id: str) -> None:
    ray.kill(pool.actor_of(worker_id), no_restart=True)  # the process goes, as with SIGKILL


def random_requests(rng: random.Random, n: int, prefix: str, max_tokens: int):
    return [
        GenerationRequest(
            f"{prefix}{i}",
            SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
            prompt_token_ids=tuple(rng.randrange(1, 256) for _ in range(rng.randint(4, 40))),
        )
        for i in range(n)
    ]


def tokens_of(deltas) -> tuple[int, ...]:
    return tuple(t for d in deltas for t in d.delta.token_ids)


def check_against(streams, requests, expected) -> None:
    for req, deltas, exp in zip(requests, streams, expected):
        assert not isinstance(deltas, BaseException), f"{req.request_id} failed: {deltas!r}"
        assert deltas[-1].delta.finished and all(not d.delta.finished for d in deltas[:-1])
        assert tokens_of(deltas) == exp.token_ids, req.request_id
        assert "".join(d.delta.text for d in deltas) == exp.text
        assert deltas[-1].delta.finish_reason == exp.finish_reason
        assert deltas[-1].delta.usage.completion_tokens == len(exp.token_ids)


def test_repeated_kills_under_load_lose_no_stream(pool, loop, engine_alone, seed):
    """Kill w0, then w1 before w0 is back (no live worker at all), then the one worker that came
    back while every stream is on it: streams that lived through it lost three workers (more
    than the old max_retries allowed) and still end exactly as the engine alone."""
    rng = random.Random(seed)
    requests = random_requests(rng, 40, "chaos", 64)
    expected = engine_alone.generate(
        [list(r.prompt_token_ids) for r in requests], [r.sampling for r in requests]
    )
    losses_before = pool.counters.worker_losses
    poison_before = pool.counters.suspected_poison

    async def main():
        progress = {r.request_id: 0 for r in requests}

        async def consume(req):
            out = []
            async for d in pool.generate(req):
                out.append(d)
                progress[req.request_id] += len(d.delta.token_ids)
            return out

        tasks = [asyncio.create_task(consume(r)) for r in requests]
        running = lambda: not all(t.done() for t in tasks)  # noqa: E731
        await wait_until(lambda: sum(v > 0 for v in progress.values()) >= 20, 120, "streams to start")
        assert running(), "the streams finished before the first kill: make them longer"
        kills, both_down = 0, False
        kill(pool, "w0")
        kills += 1
        await wait_until(lambda: pool.worker_states()["w0"] != READY, 10, "w0 to be seen dead")
        kill(pool, "w1")
        kills += 1
        await wait_until(lambda: pool.worker_states()["w1"] != READY, 10, "w1 to be seen dead")
        both_down = not ready_workers(pool)
        # Then, twice: the first worker back gets every stream; kill it once they are producing on it
        # and no suspect is on trial there. (Most streams are suspects now: their attempts on w1 had
        # not produced a token. A kill during a trial is a strike against that suspect, and
        # POISON_STRIKES = 2 such coincidences in a row would fail a bystander as poison: the
        # rule's documented false positive, which this test is not about.)
        for _ in range(2):
            if not running():
                break
            await wait_until(lambda: ready_workers(pool) or not running(), 180, "a replacement")
            if not running():
                break
            (back, *_) = ready_workers(pool)
            marks = dict(progress)

            def producing_and_no_trial(m=marks, w=back):
                progressed = sum(progress[k] > m[k] for k in m) >= 3
                return (progressed and w not in pool.trials()) or not running()

            await wait_until(producing_and_no_trial, 60, "progress with no trial running")
            if running() and pool.worker_states().get(back) == READY:
                kill(pool, back)
                kills += 1
        streams = await asyncio.gather(*tasks, return_exceptions=True)
        await wait_until(lambda: len(ready_workers(pool)) == 2, 180, "both workers back")
        return streams, kills, both_down

    streams, kills, both_down = loop.run_until_complete(main())
    assert both_down, "the kills never left the pool without a live worker"
    assert kills >= 3
    check_against(streams, requests, expected)
    assert pool.counters.suspected_poison == poison_before
    assert pool.counters.worker_losses - losses_before >= 40  # every stream lost a worker at least once


def test_poison_request_fails_alone_and_the_pool_recovers(pool, loop, engine_alone, seed):
    rng = random.Random(seed)
    requests = random_requests(rng, 10, "bystander", 48)
    expected = engine_alone.generate(
        [list(r.prompt_token_ids) for r in requests], [r.sampling for r in requests]
    )
    poison = GenerationRequest(
        "poison",
        SamplingParams(max_tokens=16, temperature=0.0),
        prompt_token_ids=(65, 66, *faults.POISON, 67),
    )
    failures_before = pool.counters.worker_failures
    poison_before = pool.counters.suspected_poison

    async def main():
        progress = {r.request_id: 0 for r in requests}

        async def consume(req):
            out = []
            async for d in pool.generate(req):
                out.append(d)
                progress[req.request_id] = progress.get(req.request_id, 0) + len(d.delta.token_ids)
            return out

        tasks = [asyncio.create_task(consume(r)) for r in requests]
        await wait_until(lambda: all(v > 0 for v in progress.values()), 120, "bystanders to start")
        poisoned = asyncio.create_task(consume(poison))
        streams = await asyncio.gather(*tasks, return_exceptions=True)
        with pytest.raises(SuspectedPoison) as failed:
            await poisoned
        deaths = pool.counters.worker_failures - failures_before
        await wait_until(lambda: len(ready_workers(pool)) == 2, 180, "the pool back at two workers")
        after = await asyncio.gather(*(consume(r) for r in random_requests(rng, 4, "after", 8)))
        return streams, failed.value, deaths, after

    streams, error, deaths, after = loop.run_until_complete(main())
    check_against(streams, requests, expected)
    assert deaths == 1 + POISON_STRIKES  # the first death, then one per trial
    message = str(error)
    assert "'poison'" in message and "suspected cause" in message and f"{deaths} worker deaths" in message
    assert pool.counters.suspected_poison - poison_before == 1
    assert all(len(tokens_of(d)) == 8 for d in after)
    statuses = loop.run_until_complete(pool.status())
    assert [s.worker_id for s in statuses if s.alive] == ["w0", "w1"]
