"""Failover without a cluster: resume_token_ids validated at the gRPC edge, a stream resumed from
received tokens equals the uninterrupted one (engine alone as the oracle), and failover_stream
against scripted clients (which codes move on, what the next gateway is asked, exhaustion)."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from mlaserve.cluster.errors import InvalidRequest
from mlaserve.cluster.failover import FailoverExhausted, failover_stream
from mlaserve.cluster.resume import ResumeState
from mlaserve.cluster.service import ServiceLimits, request_from_proto, request_to_proto
from mlaserve.cluster.types import ClusterDelta, GenerationRequest
from mlaserve.protos import decoder_pb2 as pb
from mlaserve.worker import Engine, SamplingParams
from mlaserve.worker.types import FinishReason, RequestDelta, Usage


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained("tiny", device="cpu", num_pages=32)


def test_resume_token_ids_cross_the_grpc_edge_and_are_validated():
    req = GenerationRequest("r", SamplingParams(max_tokens=4), prompt="hi", resume_token_ids=(5, 6))
    back = request_from_proto(request_to_proto(req), ServiceLimits())
    assert back == req
    for ids, field in [((1, 2, 3, 4, 5), "resume_token_ids"), ((1, -2), "resume_token_ids[1]")]:
        msg = pb.GenerateRequest(prompt="hi", resume_token_ids=list(ids))
        msg.sampling.max_tokens = 4
        with pytest.raises(InvalidRequest) as info:
            request_from_proto(msg, ServiceLimits())
        assert info.value.field == field


def stream_of(engine: Engine, prompt: list[int], sp: SamplingParams) -> list[RequestDelta]:
    engine.add_request("alone", prompt, sp)
    out = []
    while engine.has_unfinished():
        out.extend(d for d in engine.step() if d.request_id == "alone")
    return out


@pytest.mark.parametrize("with_stop", [False, True])
def test_resume_from_received_tokens_equals_the_uninterrupted_stream(engine, seed, with_stop):
    rng = random.Random(seed)
    prompt = [rng.randrange(32, 127) for _ in range(rng.randint(1, 40))]
    sp = SamplingParams(max_tokens=rng.randint(6, 24), temperature=0.0, ignore_eos=True)
    if with_stop:
        text = engine.generate([prompt], sp)[0].text
        if len(text) > 4:
            cut = rng.randrange(1, len(text) - 2)
            sp = SamplingParams(
                max_tokens=sp.max_tokens, temperature=0.0, ignore_eos=True, stop=(text[cut : cut + 3],)
            )
    deltas = stream_of(engine, prompt, sp)
    tokens = [t for d in deltas for t in d.token_ids]
    for k in sorted({1, len(tokens) // 2, len(tokens) - 1, len(tokens)} - {0}):
        # What the client holds after the first k tokens: their deltas' tokens and text.
        n, held = 0, 0
        text_so_far = ""
        for d in deltas:
            if n + len(d.token_ids) > k:
                break
            n += len(d.token_ids)
            text_so_far += d.text
            held += 1
        if n != k or (held == len(deltas) and k == len(tokens)):
            continue  # k falls inside a delta, or the final one was received: nothing to resume
        state = ResumeState("r", prompt, sp, engine.tokenizer)
        state.resume_from(tokens[:k])
        assert state.sent == tokens[:k] and state.text == text_so_far
        client_tokens, client_text = list(tokens[:k]), text_so_far
        if state.remaining < 1:  # only the final message is missing
            final = state.final_without_worker(FinishReason.LENGTH)
            client_text += final.text
        else:
            p2, s2 = state.next_attempt()
            assert p2 == prompt + tokens[:k] and s2.max_tokens == sp.max_tokens - k
            for d in stream_of(engine, p2, s2):
                final, _ = state.accept(d)
                client_tokens += final.token_ids
                client_text += final.text
                if final.finished:
                    break
        assert client_tokens == tokens and client_text == "".join(d.text for d in deltas)
        assert final.finish_reason == deltas[-1].finish_reason
        assert final.usage.completion_tokens == len(tokens) and final.usage.prompt_tokens == len(prompt)
    # Every token received, only a token-less final message missing (a final the pool sent on its
    # own after a worker died): the server answers with the held-back tail of the text and usage.
    state = ResumeState("r", prompt, sp, engine.tokenizer)
    state.resume_from(tokens)
    final = state.final_without_worker(FinishReason.LENGTH)
    assert state.text == "".join(d.text for d in deltas) and final.finished
    assert final.usage.completion_tokens == len(tokens)


def rpc_error(code: grpc.StatusCode, details: str = "x") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class ScriptedClient:
    """Stands in for DecoderClient: streams the tokens of `answer` after the resumed ones, and
    raises `fail_with` after `fail_after` tokens of its stream."""

    def __init__(self, target, answer, fail_after=None, fail_with=grpc.StatusCode.UNAVAILABLE):
        self.target, self.answer, self.fail_after, self.fail_with = target, answer, fail_after, fail_with
        self.calls = []

    async def stream(self, prompt, *, sampling=None, request_id="", timeout=None, resume_token_ids=()):
        self.calls.append((request_id, tuple(resume_token_ids)))
        assert tuple(resume_token_ids) == tuple(self.answer[: len(resume_token_ids)])
        rest = self.answer[len(resume_token_ids) :]
        for i, t in enumerate(rest):
            if self.fail_after is not None and i == self.fail_after:
                raise rpc_error(self.fail_with)
            last = i == len(rest) - 1
            yield ClusterDelta(
                RequestDelta(
                    request_id,
                    (t,),
                    chr(t),
                    FinishReason.LENGTH if last else None,
                    Usage(1, len(self.answer), 0) if last else None,
                ),
                self.target,
            )
            await asyncio.sleep(0)


async def collect(gen):
    return [d async for d in gen]


def test_failover_stream_resumes_on_the_next_gateway():
    answer = list(range(65, 75))
    a = ScriptedClient("a", answer, fail_after=4)
    b = ScriptedClient("b", answer, fail_after=3, fail_with=grpc.StatusCode.CANCELLED)
    out = asyncio.run(collect(failover_stream([a, b], "p", request_id="r1", backoff_s=0)))
    assert [t for d in out for t in d.delta.token_ids] == answer
    assert [d.worker_id for d in out] == ["a"] * 4 + ["b"] * 3 + ["a"] * 3
    assert all(d.delta.request_id == "r1" for d in out) and out[-1].delta.finished
    assert a.calls == [("r1", ()), ("r1~2", tuple(answer[:7]))] and b.calls == [("r1~1", tuple(answer[:4]))]


def test_failover_stream_raises_other_codes_and_gives_up_after_max_failovers():
    answer = list(range(65, 70))
    bad = ScriptedClient("a", answer, fail_after=1, fail_with=grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(collect(failover_stream([bad], "p", backoff_s=0)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(bad.calls) == 1
    down = ScriptedClient("a", answer, fail_after=0)
    with pytest.raises(FailoverExhausted, match="3 attempts over 1 gateway") as exhausted:
        asyncio.run(collect(failover_stream([down], "p", max_failovers=2, backoff_s=0)))
    assert len(exhausted.value.errors) == 3 and len(down.calls) == 3
