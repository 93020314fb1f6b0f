"""Proto <-> domain conversions of the gateway (no server here): validation, defaults, round trips."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlaserve.cluster.errors import InvalidRequest
from mlaserve.cluster.service import (
    ServiceLimits,
    cluster_status_to_proto,
    delta_from_proto,
    delta_to_proto,
    request_from_proto,
    request_to_proto,
    sampling_from_proto,
    sampling_to_proto,
    worker_status_to_proto,
)
from mlaserve.cluster.types import ClusterDelta, GenerationRequest, WorkerStatus
from mlaserve.protos import decoder_pb2 as pb
from mlaserve.worker.load import WorkerLoad
from mlaserve.worker.types import FinishReason, RequestDelta, SamplingParams, Usage

LIMITS = ServiceLimits(
    max_prompt_tokens=64, max_prompt_chars=200, max_tokens=32, max_stop=3, max_stop_chars=8
)


def test_unset_sampling_takes_the_engine_defaults():
    got = sampling_from_proto(pb.SamplingParams(), ServiceLimits())
    assert got == SamplingParams()
    req = request_from_proto(pb.GenerateRequest(request_id="a", prompt="hi"), ServiceLimits())
    assert req.sampling == SamplingParams() and req.prompt == "hi" and req.prompt_token_ids is None


def test_explicit_zero_temperature_is_greedy_not_default():
    got = sampling_from_proto(pb.SamplingParams(temperature=0.0), LIMITS)
    assert got.temperature == 0.0 and got.greedy


sampling_strategy = st.builds(
    SamplingParams,
    max_tokens=st.integers(1, LIMITS.max_tokens),
    temperature=st.floats(0.0, 4.0, width=32),
    top_p=st.floats(0.0, 1.0, width=32, exclude_min=True),
    top_k=st.integers(0, 1000),
    seed=st.none() | st.integers(0, 2**64 - 1),
    stop=st.lists(st.text(min_size=1, max_size=LIMITS.max_stop_chars), max_size=LIMITS.max_stop).map(tuple),
    stop_token_ids=st.lists(st.integers(0, 2**31 - 1), max_size=LIMITS.max_stop).map(tuple),
    ignore_eos=st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(sampling_strategy)
def test_sampling_round_trip(s: SamplingParams):
    wire = pb.SamplingParams.FromString(sampling_to_proto(s).SerializeToString())
    assert sampling_from_proto(wire, LIMITS) == s  # the floats were float32 already (width=32)


@settings(max_examples=60, deadline=None)
@given(
    st.text(min_size=1, max_size=50) | st.lists(st.integers(0, 10**6), min_size=1, max_size=64).map(tuple),
    sampling_strategy,
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20),
)
def test_request_round_trip(prompt, sampling, request_id):
    is_text = isinstance(prompt, str)
    req = GenerationRequest(
        request_id=request_id,
        sampling=sampling,
        prompt=prompt if is_text else None,
        prompt_token_ids=None if is_text else prompt,
    )
    wire = pb.GenerateRequest.FromString(request_to_proto(req).SerializeToString())
    assert request_from_proto(wire, LIMITS) == req


def test_missing_request_id_gets_a_fresh_unique_one():
    ids = {request_from_proto(pb.GenerateRequest(prompt="x"), LIMITS).request_id for _ in range(50)}
    assert len(ids) == 50 and all(i for i in ids)
    assert (
        request_from_proto(pb.GenerateRequest(prompt="x"), LIMITS, new_request_id=lambda: "fixed").request_id
        == "fixed"
    )


def _bad(**kw) -> pb.GenerateRequest:
    sampling = kw.pop("sampling", None)
    msg = pb.GenerateRequest(request_id="r", **kw)
    if sampling is not None:
        msg.sampling.CopyFrom(sampling)
    return msg


BAD = [
    (_bad(), "prompt", "empty"),
    (_bad(prompt="a", prompt_token_ids=[1]), "prompt", "exactly one"),
    (_bad(prompt_token_ids=[1, -2, 3]), "prompt_token_ids[1]", ">= 0"),
    (_bad(prompt_token_ids=list(range(65))), "prompt_token_ids", "65 tokens exceed the limit of 64"),
    (_bad(prompt="x" * 201), "prompt", "201 characters"),
    (_bad(prompt="x", sampling=pb.SamplingParams(max_tokens=0)), "sampling.max_tokens", "[1, 32]"),
    (_bad(prompt="x", sampling=pb.SamplingParams(max_tokens=33)), "sampling.max_tokens", "got 33"),
    (_bad(prompt="x", sampling=pb.SamplingParams(top_p=0.0)), "sampling.top_p", "must be in (0, 1]"),
    (_bad(prompt="x", sampling=pb.SamplingParams(top_p=1.5)), "sampling.top_p", "(0, 1]"),
    (_bad(prompt="x", sampling=pb.SamplingParams(top_p=math.nan)), "sampling.top_p", "(0, 1]"),
    (_bad(prompt="x", sampling=pb.SamplingParams(temperature=-0.5)), "sampling.temperature", ">= 0"),
    (_bad(prompt="x", sampling=pb.SamplingParams(temperature=math.inf)), "sampling.temperature", "finite"),
    (_bad(prompt="x", sampling=pb.SamplingParams(top_k=-1)), "sampling.top_k", ">= 0"),
    (_bad(prompt="x", sampling=pb.SamplingParams(stop=["a", ""])), "sampling.stop[1]", "non-empty"),
    (_bad(prompt="x", sampling=pb.SamplingParams(stop=["a"] * 4)), "sampling.stop", "at most 3"),
    (_bad(prompt="x", sampling=pb.SamplingParams(stop=["123456789"])), "sampling.stop[0]", "longer than 8"),
    (
        _bad(prompt="x", sampling=pb.SamplingParams(stop_token_ids=[3, -1])),
        "sampling.stop_token_ids[1]",
        ">= 0",
    ),
    (
        _bad(prompt="x", sampling=pb.SamplingParams(stop_token_ids=[1] * 4)),
        "sampling.stop_token_ids",
        "at most 3",
    ),
]


@pytest.mark.parametrize(("msg", "field", "words"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_name_the_field(msg, field, words):
    with pytest.raises(InvalidRequest) as info:
        request_from_proto(msg, LIMITS)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert words in str(info.value)


def test_request_id_limits():
    with pytest.raises(InvalidRequest, match=r"^request_id: longer than 128"):
        request_from_proto(pb.GenerateRequest(request_id="r" * 129, prompt="x"), ServiceLimits())
    with pytest.raises(InvalidRequest, match=r"^request_id: .*printable"):
        request_from_proto(pb.GenerateRequest(request_id="a\nb", prompt="x"), ServiceLimits())


class CountingTokenizer:
    """BOS + one token per character + EOS (a BPE token always covers at least one UTF-8 byte)."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return [1, *(ord(c) for c in text), 2]


def test_text_prompt_token_limit_uses_the_tokenizer_only_near_the_limit():
    tok = CountingTokenizer()
    limit = LIMITS.max_prompt_tokens
    fits = "a" * (limit - 2)  # bytes + 2 specials <= limit: cannot exceed it, not tokenized
    assert request_from_proto(pb.GenerateRequest(prompt=fits), LIMITS, tok).prompt == fits
    assert tok.calls == 0
    wide = "\u00e9" * (limit - 2)  # 2 bytes per character: may exceed, so counted exactly; fits
    assert request_from_proto(pb.GenerateRequest(prompt=wide), LIMITS, tok).prompt == wide
    assert tok.calls == 1
    with pytest.raises(InvalidRequest, match=rf"^prompt: {limit + 1} tokens exceed the limit of {limit}"):
        request_from_proto(pb.GenerateRequest(prompt="\u00e9" * (limit - 1)), LIMITS, tok)
    assert tok.calls == 2


def test_delta_round_trip(seed):
    rng = random.Random(seed)
    for _ in range(20):
        finished = rng.random() < 0.5
        d = RequestDelta(
            request_id=f"r{rng.randrange(1000)}",
            token_ids=tuple(rng.randrange(1 << 20) for _ in range(rng.randrange(4))),
            text="".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(6))),
            finish_reason=rng.choice(list(FinishReason)) if finished else None,
            usage=Usage(rng.randrange(100), rng.randrange(100), rng.randrange(50)) if finished else None,
        )
        cd = ClusterDelta(delta=d, worker_id=f"w{rng.randrange(8)}")
        wire = pb.GenerateResponse.FromString(delta_to_proto(cd).SerializeToString())
        assert wire.finish_reason == (d.finish_reason.value if finished else "")
        assert delta_from_proto(wire) == cd


def _status(rng: random.Random, i: int) -> WorkerStatus:
    total = rng.randrange(1, 500)
    free = rng.randrange(0, total + 1)
    load = WorkerLoad(
        worker_id=f"w{i}",
        seq=rng.randrange(100),
        total_pages=total,
        free_pages=free,
        reserved_pages=rng.randrange(0, free + 1),
        running=rng.randrange(10),
        waiting=rng.randrange(10),
        queued_prompt_tokens=rng.randrange(10_000),
        tokens_per_s=rng.uniform(0, 500),
        healthy=rng.random() < 0.8,
        draining=rng.random() < 0.2,
        device=rng.choice(["cpu", "cuda:0 NVIDIA H200"]),
        cached_page_hashes=frozenset(rng.randrange(1 << 60) for _ in range(rng.randrange(5))),
    )
    return WorkerStatus(worker_id=f"w{i}", load=load, alive=rng.random() < 0.85, restarts=rng.randrange(3))


def test_cluster_status_sums_live_workers(seed):
    rng = random.Random(seed)
    statuses = [_status(rng, i) for i in range(rng.randrange(1, 7))]
    msg = cluster_status_to_proto(statuses, serving=True)
    assert [w.worker_id for w in msg.workers] == [s.worker_id for s in statuses]
    total = used = running = waiting = 0
    tps = 0.0
    for s in statuses:
        w = worker_status_to_proto(s)
        assert w.used_pages == s.load.total_pages - s.load.free_pages
        assert w.cached_pages == len(s.load.cached_page_hashes)
        assert w.health == (
            "dead"
            if not s.alive
            else "draining"
            if s.load.draining
            else "healthy"
            if s.load.healthy
            else "unhealthy"
        )
        assert w.occupancy == pytest.approx(w.used_pages / w.total_pages, rel=1e-6)
        if s.alive:
            total += s.load.total_pages
            used += w.used_pages
            running += s.load.running
            waiting += s.load.waiting
            tps += s.load.tokens_per_s
    assert (msg.total_pages, msg.used_pages, msg.running, msg.waiting) == (total, used, running, waiting)
    assert msg.tokens_per_s == pytest.approx(tps, rel=1e-5)
    assert msg.occupancy == pytest.approx(used / total if total else 0.0, rel=1e-6)
    assert msg.serving


def test_limits_reject_nonsense():
    with pytest.raises(ValueError, match="max_tokens"):
        ServiceLimits(max_tokens=0)


def test_float32_top_p_of_one_is_accepted():
    # 0.9 and 1.0 travel as float32; the (0, 1] check must accept what the client meant.
    for p in (0.9, 1.0, 1e-6):
        wire = pb.SamplingParams.FromString(pb.SamplingParams(top_p=p).SerializeToString())
        assert sampling_from_proto(wire, LIMITS).top_p == pytest.approx(p, rel=1e-6)
