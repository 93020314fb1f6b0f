"""Pool pieces without Ray: stream resumption (against the engine alone), autoscaling policy, config."""

from __future__ import annotations

import random

import pytest

from mlaserve.cluster.autoscaler import Autoscaler, WorkerSnapshot
from mlaserve.cluster.pool_config import AutoscaleConfig, PoolConfig
from mlaserve.cluster.resume import ResumeState
from mlaserve.worker import Engine, SamplingParams
from mlaserve.worker.types import FinishReason, RequestDelta


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained("tiny", device="cpu", num_pages=32)


def run_attempt(engine: Engine, rid: str, prompt: list[int], sp: SamplingParams, stop_after: int | None):
    """Drive the engine for one request; stop (abort) after `stop_after` tokens, like a dying worker."""
    engine.add_request(rid, prompt, sp)
    out: list[RequestDelta] = []
    n = 0
    while engine.has_unfinished():
        for d in engine.step():
            if stop_after is not None and n >= stop_after:
                continue
            out.append(d)
            n += len(d.token_ids)
            if stop_after is not None and n >= stop_after and not d.finished:
                engine.abort(rid)
    return out


@pytest.mark.parametrize("with_stop", [False, True])
def test_resumed_stream_equals_uninterrupted_run(engine, seed, with_stop):
    rng = random.Random(seed)
    tok = engine.tokenizer
    prompt = [rng.randrange(32, 127) for _ in range(rng.randint(1, 80))]
    base = SamplingParams(max_tokens=rng.randint(4, 24), temperature=0.0)
    alone = engine.generate([prompt], base)[0]
    k = rng.randint(1, max(1, len(alone.token_ids) - 1))
    sp = base
    if with_stop:
        # A stop string straddling the point where the first worker dies, taken from the text.
        cut = len(tok.decode(list(alone.token_ids[:k])))
        if 0 < cut < len(alone.text):
            sp = SamplingParams(
                max_tokens=base.max_tokens, temperature=0.0, stop=(alone.text[max(0, cut - 2) : cut + 2],)
            )
    expected = engine.generate([prompt], sp)[0]

    state = ResumeState("r", prompt, sp, tok)
    p1, s1 = state.next_attempt()
    assert p1 == prompt and s1 == sp
    client: list[RequestDelta] = []
    for d in run_attempt(engine, "r-a1", p1, s1, stop_after=k):
        client.append(state.accept(RequestDelta("r", d.token_ids, d.text, d.finish_reason, d.usage))[0])
    if not state.finished:
        p2, s2 = state.next_attempt()
        assert p2 == prompt + state.sent and s2.max_tokens == sp.max_tokens - len(state.sent)
        assert state.resumes == 1
        for d in run_attempt(engine, "r-a2", p2, s2, stop_after=None):
            out, stop_here = state.accept(d)
            client.append(out)
            if out.finished:
                break
    tokens = tuple(t for d in client for t in d.token_ids)
    assert tokens == expected.token_ids
    assert "".join(d.text for d in client) == expected.text
    last = client[-1]
    assert last.finish_reason == expected.finish_reason
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompt), len(expected.token_ids))
    assert all(d.request_id == "r" for d in client) and all(not d.finished for d in client[:-1])


def test_final_without_worker():
    state = ResumeState("r", [1, 2, 3], SamplingParams(max_tokens=2), tokenizer=None)
    state.next_attempt()
    state.accept(RequestDelta("r", (7,), "a"))
    state.accept(RequestDelta("r", (8,), "b"))
    assert state.remaining == 0
    with pytest.raises(RuntimeError, match="no tokens left"):
        state.next_attempt()
    final = state.final_without_worker(FinishReason.LENGTH)
    assert final.finished and final.usage.completion_tokens == 2 and final.usage.prompt_tokens == 3


def snaps(*specs):
    return [WorkerSnapshot(f"w{i}", *spec) for i, spec in enumerate(specs)]


def test_autoscaler_scales_up_only_on_sustained_pressure():
    cfg = AutoscaleConfig(up_occupancy=0.8, up_queue_per_worker=3, up_sustain_s=10, cooldown_s=5)
    a = Autoscaler(cfg, 1, 3)
    hot = snaps(("ready", 0.9, 0), ("ready", 0.85, 0))
    assert a.decide(0, hot).noop
    assert a.decide(9, hot).noop
    assert a.decide(9.5, snaps(("ready", 0.1, 0), ("ready", 0.1, 0))).noop  # pressure broke: timer resets
    assert a.decide(10, hot).noop
    assert a.decide(20, hot).add == 1
    # While the new worker starts (a node may be coming up), nothing is stacked on it.
    starting = hot + [WorkerSnapshot("w2", "starting")]
    assert a.decide(40, starting).noop and a.decide(60, starting).noop
    # Queue pressure counts too; at max_workers nothing more is added.
    queued = snaps(("ready", 0.2, 5), ("ready", 0.2, 4), ("ready", 0.2, 3))
    assert a.decide(70, queued).noop and a.decide(90, queued).noop


def test_autoscaler_scales_down_an_idle_worker_after_cooldown():
    cfg = AutoscaleConfig(down_occupancy=0.3, down_idle_s=30, cooldown_s=10)
    a = Autoscaler(cfg, 1, 4)
    ws = [
        WorkerSnapshot("w0", "ready", 0.2, 0, False),
        WorkerSnapshot("w1", "ready", 0.0, 0, True),
        WorkerSnapshot("w10", "ready", 0.0, 0, True),
    ]
    assert a.decide(0, ws).noop
    assert a.decide(29, ws).noop
    d = a.decide(31, ws)
    assert d.drain == ("w10",)  # the newest idle worker
    assert a.decide(35, ws[:2]).noop  # cooldown
    d2 = a.decide(45, ws[:2])
    assert d2.drain == ("w1",)
    assert a.decide(100, ws[:1]).noop  # never below min_workers


def test_autoscaler_restores_min_workers():
    a = Autoscaler(AutoscaleConfig(), 3, 5)
    assert a.decide(0, snaps(("ready", 0.1, 0))).add == 2
    with pytest.raises(ValueError):
        Autoscaler(AutoscaleConfig(), 3, 2)


def test_pool_config_validation_and_defaults():
    assert PoolConfig().worker_counts(0) == (2, 2, 2)
    assert PoolConfig().worker_counts(8) == (8, 8, 8)
    assert PoolConfig(num_workers=2, min_workers=1, max_workers=4).worker_counts(0) == (2, 1, 4)
    assert PoolConfig(max_workers=4).worker_counts(8) == (4, 4, 4)
    assert PoolConfig(min_workers=3).worker_counts(0) == (3, 3, 3)
    kw = {"num_pages": 8}
    cfg = PoolConfig(engine_kwargs=kw)
    kw["num_pages"] = 9
    assert cfg.engine_kwargs == {"num_pages": 8}
    for bad, name in [
        ({"policy": "fastest"}, "policy"),
        ({"num_workers": 0}, "num_workers"),
        ({"min_workers": 3, "max_workers": 2}, "min_workers"),
        ({"max_retries": -1}, "max_retries"),
        ({"poison_strikes": 0}, "poison_strikes"),
        ({"retry_patience_s": 0}, "retry_patience_s"),
        ({"health_timeout_s": 0}, "health_timeout_s"),
        ({"model": ""}, "model"),
    ]:
        with pytest.raises(ValueError, match=name):
            PoolConfig(**bad)
    with pytest.raises(ValueError, match="down_occupancy"):
        AutoscaleConfig(up_occupancy=0.5, down_occupancy=0.6)
