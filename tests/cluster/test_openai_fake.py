"""The OpenAI HTTP API of a real GatewayServer (uvicorn on 127.0.0.1) over the fake pool of
test_grpc_fake.py, driven by the official `openai` client and by raw HTTP (httpx): answers against
the fake's independent oracle, SSE framing, every error status, auth, draining shared with gRPC,
disconnects that close the pool's stream, and the metrics. No Ray: tests/cluster/test_openai_ray.py
runs the real cluster."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest

from mlaserve.cluster.client import DecoderClient
from mlaserve.cluster.openai_http import HttpConfig
from mlaserve.cluster.server import GatewayServer, ServerConfig
from mlaserve.cluster.service import ServiceLimits
from mlaserve.worker.tokenizer import byte_tokenizer
from mlaserve.worker.types import SamplingParams

from .test_grpc_fake import FakePool, expected_tokens, text_of

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

TOKEN = "s3cret-token"


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 90))


class Gateway:
    def __init__(self, server: GatewayServer, pool: FakePool) -> None:
        self.server, self.pool = server, pool
        assert server.http is not None
        self.base_url = server.http.base_url
        self.root = self.base_url.removesuffix("/v1")

    def client(self, api_key: str = TOKEN, **kwargs: Any) -> Any:
        return openai.AsyncOpenAI(
            base_url=self.base_url, api_key=api_key, max_retries=0, timeout=30, **kwargs
        )


@asynccontextmanager
async def gateway(
    pool: FakePool | None = None, auth: bool = False, http: HttpConfig | None = None, **cfg: Any
) -> AsyncIterator[Gateway]:
    pool = pool or FakePool(step_s=0.002)
    pool.tokenizer = byte_tokenizer()  # the real one: chat prompts are encoded without added specials
    server = GatewayServer(
        pool,
        ServerConfig(
            host="127.0.0.1",
            port=0,
            http=http or HttpConfig(port=0, model="tiny"),
            auth_token=TOKEN if auth else None,
            **cfg,
        ),
    )
    await server.start()
    try:
        yield Gateway(server, pool)
    finally:
        await server.stop(grace=1)


def chat_prompt_ids(messages: list[dict[str, str]]) -> list[int]:
    """The tiny preset's built-in template, written out by hand: BOS, then '<|role|>\\ncontent\\n' per
    message, then the assistant's header; bytes for the text."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
    return [256, *text.encode()]


async def sse_events(response: Any) -> list[str]:
    """The data fields of a server-sent event stream, in order."""
    events = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            events.append(line[len("data: ") :])
        else:
            assert line == "", line
    return events


def test_completions_and_chat_match_the_oracle(seed):
    rng = random.Random(seed)
    limits = ServiceLimits(max_tokens=40)

    async def body():
        async with gateway(limits=limits) as g:
            client = g.client()
            for _ in range(3):
                prompt = "".join(chr(rng.randrange(97, 123)) for _ in range(rng.randrange(1, 30)))
                n = rng.randrange(1, 12)
                want, _ = expected_tokens(list(prompt.encode()), SamplingParams(max_tokens=n))
                whole = await client.completions.create(
                    model="tiny",
                    prompt=prompt,
                    max_tokens=n,
                    temperature=0,
                    extra_body={"return_token_ids": True},
                )
                (choice,) = whole.choices
                assert choice.text == text_of(want) and choice.finish_reason == "length"
                assert choice.model_extra["token_ids"] == want
                assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt), n)
                assert whole.usage.total_tokens == len(prompt) + n and whole.model == "tiny"
                assert whole.id.startswith("cmpl-") and whole.object == "text_completion"

                stream = await client.completions.create(
                    model="tiny",
                    prompt=prompt,
                    max_tokens=n,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                chunks = [c async for c in stream]
                *texts, usage = chunks
                assert "".join(c.choices[0].text for c in texts) == text_of(want)
                assert [c.choices[0].finish_reason for c in texts] == [None] * (len(texts) - 1) + ["length"]
                assert usage.choices == [] and usage.usage.completion_tokens == n
                assert all(c.usage is None for c in texts) and len({c.id for c in chunks}) == 1

                ids = [rng.randrange(1000) for _ in range(rng.randrange(1, 20))]
                by_ids = await client.completions.create(model="tiny", prompt=ids, max_tokens=n)
                assert by_ids.choices[0].text == text_of(
                    expected_tokens(ids, SamplingParams(max_tokens=n))[0]
                )

            # A stop token id (an extension) ends the answer with "stop".
            stop_at = expected_tokens([1, 2, 3], SamplingParams(max_tokens=9))[0][4]
            stopped = await client.completions.create(
                model="tiny", prompt=[1, 2, 3], max_tokens=9, extra_body={"stop_token_ids": [stop_at]}
            )
            assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 5

            messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
            want, _ = expected_tokens(chat_prompt_ids(messages), SamplingParams(max_tokens=6))
            chat = await client.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
            assert (
                chat.choices[0].message.content == text_of(want)
                and chat.choices[0].message.role == "assistant"
            )
            assert chat.usage.prompt_tokens == len(chat_prompt_ids(messages))
            assert chat.id.startswith("chatcmpl-") and chat.object == "chat.completion"
            stream = await client.chat.completions.create(
                model="tiny", messages=messages, max_completion_tokens=6, stream=True
            )
            chunks = [c async for c in stream]
            assert chunks[0].choices[0].delta.role == "assistant"
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == text_of(want)
            assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None
            # Without max_tokens a chat may use what the context leaves (the fake has no context: the limit).
            limited = await client.chat.completions.create(model="tiny", messages=messages)
            assert limited.usage.completion_tokens == limits.max_tokens
            assert not g.pool.pages and not g.pool.closed_early

    run(body())


def test_sse_framing_models_and_health():
    async def body():
        async with gateway() as g, httpx.AsyncClient(base_url=g.root, timeout=30) as http:
            for path, payload in [
                ("/v1/completions", {"prompt": "ab", "max_tokens": 4}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ab"}], "max_tokens": 4}),
            ]:
                payload = {**payload, "stream": True, "stream_options": {"include_usage": True}}
                async with http.stream("POST", path, json=payload) as response:
                    assert response.status_code == 200
                    assert response.headers["content-type"].startswith("text/event-stream")
                    events = await sse_events(response)
                assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
                decoded = [json.loads(e) for e in events[:-1]]
                assert decoded[-1]["choices"] == [] and decoded[-1]["usage"]["completion_tokens"] == 4
                assert all(d["usage"] is None for d in decoded[:-1])
            models = (await http.get("/v1/models")).json()
            assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
            assert (await http.get("/v1/models/tiny")).json()["id"] == "tiny"
            assert (await http.get("/v1/models/other")).status_code == 404
            health = await http.get("/health")
            assert health.status_code == 200 and health.json() == {"status": "serving"}
            missing = await http.get("/v2/nothing")
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
            wrong_method = await http.get("/v1/completions")
            assert wrong_method.status_code == 405 and "error" in wrong_method.json()

    run(body())


def test_errors_are_openai_bodies_with_the_right_status():
    async def body():
        pool = FakePool(step_s=0.02, max_active=1)
        pool.fail_prompts.add("boom")
        limits = ServiceLimits(max_tokens=64, max_prompt_tokens=100)
        http_cfg = HttpConfig(port=0, model="tiny", served_model_name="mla-tiny", max_body_bytes=2048)
        async with (
            gateway(pool, http=http_cfg, limits=limits) as g,
            httpx.AsyncClient(base_url=g.root) as http,
        ):
            client = g.client()

            async def bad(param: str, **kwargs: Any) -> dict:
                with pytest.raises(openai.BadRequestError) as info:
                    await client.completions.create(**{"model": "mla-tiny", "prompt": "x", **kwargs})
                err = info.value
                assert err.status_code == 400 and err.param == param and err.body["param"] == param
                assert (
                    err.body["message"].startswith(f"{param}: ")
                    and err.body["type"] == "invalid_request_error"
                )
                return err.body

            assert "must be in (0, 1]" in (await bad("top_p", top_p=0))["message"]
            assert "[1, 64]" in (await bad("max_tokens", max_tokens=65))["message"]
            await bad("temperature", temperature=-1)
            await bad("n", n=2)
            await bad("prompt", prompt="y" * 101)  # over max_prompt_tokens (the gateway's check)
            await bad("prompt", prompt=[1] * 101)
            assert (
                "outside the vocabulary" in (await bad("prompt[1]", prompt=[5, 1000, 7]))["message"]
            )  # the pool's
            await bad("stop[0]", stop=[""])
            with pytest.raises(openai.BadRequestError) as info:
                await client.chat.completions.create(
                    model="mla-tiny", messages=[{"role": "robot", "content": "x"}]
                )
            assert info.value.param == "messages[0].role"
            with pytest.raises(openai.NotFoundError) as info:
                await client.completions.create(model="tiny", prompt="x")
            assert info.value.body["code"] == "model_not_found" and info.value.param == "model"

            too_big = await http.post("/v1/completions", content=b'{"prompt": "' + b"z" * 4096 + b'"}')
            assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "invalid_request_error"
            not_json = await http.post("/v1/completions", content=b"{nope")
            assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]["message"]

            # Queues full: 429 with Retry-After (the pool takes one request at a time).
            first = asyncio.create_task(
                client.completions.create(model="mla-tiny", prompt="long", max_tokens=25)
            )
            while not pool.pages:
                await asyncio.sleep(0.005)
            with pytest.raises(openai.RateLimitError) as info:
                await client.completions.create(model="mla-tiny", prompt="second", max_tokens=2)
            assert (
                info.value.body["code"] == "queue_full" and info.value.response.headers["retry-after"] == "1"
            )
            assert (await first).usage.completion_tokens == 25
            with pytest.raises(openai.InternalServerError) as info:
                await client.completions.create(model="mla-tiny", prompt="boom")
            assert info.value.status_code == 500 and "worker exploded" in info.value.body["message"]
            assert not pool.pages

    run(body())


def test_auth_token_guards_v1_but_not_health():
    async def body():
        async with gateway(auth=True) as g, httpx.AsyncClient(base_url=g.root) as http:
            for key in ("wrong", TOKEN + "x", TOKEN[:-1]):
                with pytest.raises(openai.AuthenticationError) as info:
                    await g.client(api_key=key).completions.create(model="tiny", prompt="x", max_tokens=2)
                assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                await g.client(api_key="wrong").models.list()
            missing = await http.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
            )
            assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
            assert (await http.get("/v1/models")).status_code == 401
            assert (await http.get("/health")).status_code == 200
            ok = await g.client().completions.create(model="tiny", prompt="x", max_tokens=2)
            assert ok.usage.completion_tokens == 2
            assert [m.id async for m in g.client().models.list()] == ["tiny"]
            # The same token opens gRPC, and only it.
            async with DecoderClient(g.server.address, token=TOKEN, timeout=10) as grpc_client:
                assert (
                    await grpc_client.generate("x", sampling=SamplingParams(max_tokens=2))
                ).usage.completion_tokens == 2

    run(body())


def test_drain_is_shared_with_grpc_and_waits_for_http_streams():
    async def body():
        pool = FakePool(step_s=0.02)
        async with gateway(pool) as g, httpx.AsyncClient(base_url=g.root, timeout=30) as http:
            client = g.client()
            stream = await client.completions.create(
                model="tiny", prompt="in flight", max_tokens=20, stream=True
            )
            first = await stream.__anext__()
            drained = asyncio.create_task(g.server.drain(timeout=20))
            while not g.server.service.draining:
                await asyncio.sleep(0.005)
            with pytest.raises(openai.APIStatusError) as info:
                await client.completions.create(model="tiny", prompt="late", max_tokens=2)
            assert info.value.status_code == 503 and info.value.body["type"] == "service_unavailable"
            health = await http.get("/health")
            assert health.status_code == 503 and health.json() == {"status": "draining"}
            await asyncio.sleep(0.05)
            assert not drained.done()  # the HTTP stream is still in flight: the drain waits for it
            rest = [c async for c in stream]
            text = first.choices[0].text + "".join(c.choices[0].text for c in rest)
            assert text == text_of(expected_tokens(list(b"in flight"), SamplingParams(max_tokens=20))[0])
            assert await drained is True

    run(body())


def test_a_client_that_goes_away_closes_the_pool_stream():
    async def body():
        pool = FakePool(step_s=0.02)
        async with gateway(pool) as g, httpx.AsyncClient(base_url=g.root, timeout=30) as http:
            payload = {"prompt": "cancel me", "max_tokens": 500, "stream": True}
            async with http.stream("POST", "/v1/completions", json=payload) as response:
                lines = response.aiter_lines()
                first = json.loads((await lines.__anext__()).removeprefix("data: "))
                rid = first["id"]
                assert rid in pool.pages
            # Leaving the block closed the connection mid-stream.
            for _ in range(500):
                if rid in pool.closed_early:
                    break
                await asyncio.sleep(0.01)
            assert rid in pool.closed_early and rid not in pool.pages

            # A non-streaming request whose client gives up (its read timeout) is cancelled as well.
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/v1/completions", json={"prompt": "slow", "max_tokens": 500}, timeout=0.3)
            for _ in range(500):
                if not pool.pages and g.server.service.active_requests == 0:
                    break
                await asyncio.sleep(0.01)
            assert not pool.pages and len(pool.closed_early) == 2
            assert g.server.service.active_requests == 0

            text = g.server.metrics.render().decode()
            assert 'mlaserve_http_requests_total{path="/v1/completions",status="499"} 2.0' in text
            assert "mlaserve_requests_in_flight 0.0" in text

    run(body())


def test_http_and_grpc_requests_share_the_registry():
    async def body():
        async with gateway() as g:
            client = g.client()
            await client.completions.create(model="tiny", prompt="a", max_tokens=3)
            stream = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "b"}], max_tokens=3, stream=True
            )
            _ = [c async for c in stream]
            with pytest.raises(openai.BadRequestError):
                await client.completions.create(model="tiny", prompt="a", top_p=2)
            async with DecoderClient(g.server.address, timeout=10) as grpc_client:
                await grpc_client.generate("c", sampling=SamplingParams(max_tokens=3))
            text = g.server.metrics.render().decode()
            assert 'mlaserve_http_requests_total{path="/v1/completions",status="200"} 1.0' in text
            assert 'mlaserve_http_requests_total{path="/v1/chat/completions",status="200"} 1.0' in text
            assert 'mlaserve_http_requests_total{path="/v1/completions",status="400"} 1.0' in text
            assert 'mlaserve_requests_total{code="OK",method="GenerateUnary"} 1.0' in text
            # Token and latency metrics count both transports' generations: 3 requests x 3 tokens.
            assert "mlaserve_time_to_first_token_seconds_count 3.0" in text
            assert "mlaserve_generated_tokens_total 9.0" in text
            assert 'mlaserve_requests_finished_total{reason="length"} 3.0' in text

    run(body())


def test_a_taken_http_port_fails_the_start_and_leaves_nothing_running():
    async def body():
        async with gateway() as g:
            taken = int(g.base_url.rsplit(":", 1)[1].split("/")[0])
            other = GatewayServer(
                g.pool, ServerConfig(host="127.0.0.1", port=0, http=HttpConfig(port=taken, model="tiny"))
            )
            with pytest.raises(OSError, match="cannot bind the HTTP server"):
                await other.start()
            assert other.port is not None and other._server is None  # its gRPC server was stopped again

    run(body())


def test_the_plaintext_http_api_never_opens_a_mutual_tls_gateway(tmp_path, caplog):
    from mlaserve.cluster.openai_http import http_exposure_warnings
    from mlaserve.cluster.tls import TLSConfig

    from .tls_certs import make_certs

    certs = make_certs(tmp_path)
    mutual = TLSConfig.from_files(cert=certs.server_cert, key=certs.server_key, client_ca=certs.ca)
    http = HttpConfig(port=0, model="tiny")
    # It cannot check client certificates: beyond loopback it needs the bearer token, or no start.
    with pytest.raises(ValueError, match="cannot check client certificates"):
        ServerConfig(host="0.0.0.0", tls=mutual, http=http)
    with pytest.raises(ValueError, match="set --auth-token"):
        ServerConfig(host="127.0.0.1", tls=mutual, http=HttpConfig(port=0, host="0.0.0.0"))
    ServerConfig(host="0.0.0.0", tls=mutual, http=http, auth_token="t")
    ServerConfig(host="127.0.0.1", tls=mutual, http=http)
    ServerConfig(host="0.0.0.0", tls=mutual)  # no HTTP API: nothing to refuse

    assert http_exposure_warnings("127.0.0.1", 8000, None) == []
    warnings = http_exposure_warnings("0.0.0.0", 8000, None)
    assert len(warnings) == 2 and "without TLS" in warnings[0] and "--auth-token" in warnings[1]
    (only,) = http_exposure_warnings("0.0.0.0", 8000, "t")
    assert "bearer token travel in clear text" in only


class PoisonPool(FakePool):
    async def generate(self, req):  # type: ignore[override]
        if req.prompt == "poison":
            from mlaserve.cluster.errors import SuspectedPoison

            raise SuspectedPoison("request crashed workers w0, w1")
        async for cd in super().generate(req):
            yield cd


def test_a_suspected_poison_request_is_a_500_that_names_it():
    async def body():
        async with gateway(PoisonPool(step_s=0.002)) as g:
            with pytest.raises(openai.InternalServerError) as info:
                await g.client().completions.create(model="tiny", prompt="poison", max_tokens=2)
            body = info.value.body
            assert body["code"] == "suspected_poison" and body["message"] == "request crashed workers w0, w1"
            assert (await g.client().completions.create(model="tiny", prompt="fine", max_tokens=2)).usage

    run(body())
