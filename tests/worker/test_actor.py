"""WorkerActor's logic on a plain event loop (no Ray): the real tiny engine, plus a failing fake."""

from __future__ import annotations

import asyncio
import random

import pytest

from mlaserve.worker import Engine, SamplingParams
from mlaserve.worker.actor import WorkerActor, WorkerDraining, WorkerFailed
from mlaserve.worker.errors import RequestError
from mlaserve.worker.types import FinishReason

NUM_PAGES = 32


@pytest.fixture(scope="module")
def engine_alone() -> Engine:
    return Engine.from_pretrained("tiny", device="cpu", num_pages=NUM_PAGES)


def make_actor() -> WorkerActor:
    return WorkerActor("w0", "tiny", {"device": "cpu", "num_pages": NUM_PAGES})


async def collect(actor: WorkerActor, rid: str, prompt: list[int], sp: SamplingParams) -> list:
    return [d async for d in actor.generate(rid, prompt, sp)]


def random_prompts(rng: random.Random, n: int) -> list[list[int]]:
    return [[rng.randrange(256) for _ in range(rng.randint(1, 90))] for _ in range(n)]


def test_concurrent_streams_equal_engine_alone(engine_alone, seed):
    rng = random.Random(seed)
    prompts = random_prompts(rng, 6)
    params = [
        SamplingParams(max_tokens=rng.randint(1, 12), temperature=0.0, ignore_eos=True) for _ in prompts
    ]
    expected = engine_alone.generate(prompts, params)

    async def main():
        actor = make_actor()
        streams = await asyncio.gather(
            *(collect(actor, f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params)))
        )
        load = await actor.load()
        return streams, load, actor.stats()

    streams, load, stats = asyncio.run(main())
    for deltas, exp in zip(streams, expected):
        assert all(not d.finished for d in deltas[:-1]) and deltas[-1].finished
        assert tuple(t for d in deltas for t in d.token_ids) == exp.token_ids
        assert "".join(d.text for d in deltas) == exp.text
        assert deltas[-1].usage == exp.usage and deltas[-1].finish_reason == exp.finish_reason
    assert load.worker_id == "w0" and load.free_pages == load.total_pages == NUM_PAGES
    assert stats["num_requests"] == len(prompts) and stats["streams"] == 0


def test_bad_request_raises_and_leaves_others_alone(engine_alone, seed):
    rng = random.Random(seed)
    prompt = random_prompts(rng, 1)[0]
    sp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = engine_alone.generate([prompt], sp)[0]

    async def main():
        actor = make_actor()
        good = asyncio.create_task(collect(actor, "good", prompt, sp))
        await asyncio.sleep(0)
        errors = []
        for rid, p, s in [
            ("bad1", [], sp),
            ("bad2", [1, 10_000], sp),
            ("bad3", [1, 2], SamplingParams(max_tokens=5000)),
            ("good", [1], sp),  # duplicate of a running request
        ]:
            with pytest.raises(RequestError) as info:
                await collect(actor, rid, p, s)
            errors.append(info.value.field)
        deltas = await good
        assert await actor.health()
        return errors, deltas

    errors, deltas = asyncio.run(main())
    assert errors == ["prompt", "prompt", "max_tokens", "request_id"]
    assert tuple(t for d in deltas for t in d.token_ids) == expected.token_ids


def test_closing_the_stream_aborts_and_frees_pages():
    async def main():
        actor = make_actor()
        sp = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
        gen = actor.generate("long", list(range(100)), sp)
        first = await gen.__anext__()
        busy = await actor.load()
        await gen.aclose()
        for _ in range(200):
            load = await actor.load()
            if load.free_pages == load.total_pages and load.running == 0:
                break
            await asyncio.sleep(0.01)
        return first, busy, load

    first, busy, load = asyncio.run(main())
    assert first.token_ids and busy.free_pages < busy.total_pages
    assert load.free_pages == load.total_pages and load.running == 0 and load.waiting == 0


def test_cancelled_consumer_task_aborts():
    async def main():
        actor = make_actor()
        sp = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
        got = asyncio.Event()

        async def consume():
            async for _ in actor.generate("long", list(range(70)), sp):
                got.set()

        task = asyncio.create_task(consume())
        await got.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            load = await actor.load()
            if load.free_pages == load.total_pages:
                return load
            await asyncio.sleep(0.01)
        return load

    load = asyncio.run(main())
    assert load.free_pages == load.total_pages and load.running == 0


def test_abort_by_id_ends_stream_with_abort():
    async def main():
        actor = make_actor()
        sp = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
        deltas = []

        async def consume():
            async for d in actor.generate("x", [5, 6, 7], sp):
                deltas.append(d)
                if len(deltas) == 2:
                    assert await actor.abort("x")

        await consume()
        assert not await actor.abort("x")
        return deltas

    deltas = asyncio.run(main())
    assert deltas[-1].finish_reason is FinishReason.ABORT
    assert deltas[-1].usage.completion_tokens >= 2


def test_drain_finishes_in_flight_and_refuses_new():
    async def main():
        actor = make_actor()
        sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        running = asyncio.create_task(collect(actor, "a", [1, 2, 3], sp))
        await asyncio.sleep(0.01)
        drained = asyncio.create_task(actor.drain(timeout_s=30))
        await asyncio.sleep(0)
        with pytest.raises(WorkerDraining):
            await collect(actor, "b", [1], sp)
        deltas = await running
        ok = await drained
        load = await actor.load()
        await actor.undrain()
        after = await collect(actor, "c", [1], sp)
        return deltas, ok, load, after

    deltas, ok, load, after = asyncio.run(main())
    # (deltas that queue up while one is in transit travel merged: count tokens, not deltas)
    assert (
        ok and deltas[-1].finish_reason is FinishReason.LENGTH and sum(len(d.token_ids) for d in deltas) == 6
    )
    assert load.draining
    assert after[-1].finished


class _FailingEngine:
    """Accepts requests, then fails on its second step."""

    def __init__(self) -> None:
        self.steps = 0
        self.requests: list[str] = []
        self.tokenizer = None
        self.max_model_len = 100

    def add_request(self, rid, prompt, sampling):
        self.requests.append(rid)

    def has_unfinished(self):
        return bool(self.requests)

    def step(self):
        from mlaserve.worker.types import RequestDelta

        self.steps += 1
        if self.steps >= 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return [RequestDelta(r, (1,), "a") for r in self.requests]

    def abort(self, rid):
        return False

    def load(self, worker_id, seq):
        raise AssertionError("not reached after the failure")


def test_engine_failure_ends_every_stream_and_turns_unhealthy():
    async def main():
        actor = WorkerActor("wf", "fake", engine_factory=lambda m, kw: _FailingEngine())
        sp = SamplingParams(max_tokens=5)
        results = await asyncio.gather(
            *(collect(actor, f"r{i}", [1], sp) for i in range(3)), return_exceptions=True
        )
        return results, await actor.health(), await actor.load()

    results, healthy, load = asyncio.run(main())
    assert all(isinstance(r, WorkerFailed) for r in results)
    assert not healthy and not load.healthy and load.worker_id == "wf"


def test_load_seq_is_monotonic():
    async def main():
        actor = make_actor()
        loads = await asyncio.gather(*(actor.load() for _ in range(5)))
        return [ld.seq for ld in loads]

    seqs = asyncio.run(main())
    assert seqs == sorted(seqs) and len(set(seqs)) == 5


def test_merged_deltas_keep_every_token_and_the_end():
    from mlaserve.worker.actor import merge_deltas
    from mlaserve.worker.types import RequestDelta, Usage

    a = RequestDelta("r", (1, 2), "ab")
    end = RequestDelta("r", (3,), "c", finish_reason=FinishReason.STOP, usage=Usage(4, 3, 0))
    m = merge_deltas(a, end)
    assert m == RequestDelta("r", (1, 2, 3), "abc", finish_reason=FinishReason.STOP, usage=Usage(4, 3, 0))
    assert merge_deltas(RequestDelta("r", (), ""), a) == a
