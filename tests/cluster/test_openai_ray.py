"""End to end: a real `mlaserve serve --http-port 0` (tiny model, two CPU workers, a local Ray cluster it
starts itself, a bearer token) driven by the official `openai` client and by raw SSE over httpx, with
the gateway's own gRPC GenerateUnary as the oracle for the same prompt and sampling.

One server for the module (its start is most of the cost); the answers are kept short.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from mlaserve.cluster.client import DecoderClient
from mlaserve.worker.types import SamplingParams

from ..deploy.procs import descendants, reap

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TOKEN = "http-test-token"
NUM_PAGES = 96


@dataclass
class Served:
    grpc_address: str
    base_url: str
    output: list[str]

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    def client(self, api_key: str = TOKEN) -> Any:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=120)

    def grpc(self) -> DecoderClient:
        return DecoderClient(self.grpc_address, token=TOKEN, timeout=120)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    argv = ["serve", "--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--num-workers", "2"]
    argv += ["--num-pages", str(NUM_PAGES), "--auth-token", TOKEN, "--log-level", "WARNING"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlaserve.cluster.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    output: list[str] = []
    started = threading.Event()
    found: dict[str, str] = {}

    def read() -> None:  # keeps the pipe drained for the whole module
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            m = re.search(
                r"serving tiny on (127\.0\.0\.1:\d+), OpenAI API on (http://127\.0\.0\.1:\d+/v1)", line
            )
            if m:
                found.update(grpc=m.group(1), http=m.group(2))
                started.set()
        started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(180) and found, "serve did not start:\n" + "".join(output)
        yield Served(found["grpc"], found["http"], output)
    finally:
        below = descendants(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # drains, then shuts its Ray cluster down
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        reap(below)
        reader.join(10)
    assert proc.returncode == 0, "".join(output)


def run(coro: Coroutine[Any, Any, Any], timeout: float = 240) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def idle(client: DecoderClient, timeout: float = 30.0) -> bool:
    """Polls GetClusterStatus until no worker holds pages or requests; False after `timeout`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = await client.status()
        if all(w.used_pages == 0 and w.running == 0 and w.waiting == 0 for w in status.workers):
            return True
        await asyncio.sleep(0.1)
    return False


def chat_prompt_ids(messages: list[dict[str, str]]) -> list[int]:
    """The tiny preset's built-in chat template written out by hand (BOS 256, then bytes)."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
    return [256, *text.encode()]


async def sse_events(response: Any) -> list[str]:
    events = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            events.append(line[len("data: ") :])
    return events


def test_completions_and_chat_equal_grpc_generate_unary(served, seed):
    rng = random.Random(seed)
    prompts = ["Hello, MLA!", "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(5, 60)))]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, top_k=40, seed=rng.randrange(2**31))
    extra = {"return_token_ids": True}

    def http_fields(s: SamplingParams) -> dict[str, Any]:
        fields = {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed}
        return {k: v for k, v in fields.items() if v is not None}

    def http_extra(s: SamplingParams) -> dict[str, Any]:
        return {**extra, "top_k": s.top_k, "ignore_eos": s.ignore_eos}

    async def body():
        client = served.client()
        async with served.grpc() as grpc_client:
            for prompt in prompts:
                for sampling in (greedy, sampled):
                    want = await grpc_client.generate(prompt, sampling=sampling)
                    whole = await client.completions.create(
                        model="tiny", prompt=prompt, **http_fields(sampling), extra_body=http_extra(sampling)
                    )
                    (choice,) = whole.choices
                    assert choice.model_extra["token_ids"] == list(want.token_ids), (prompt, sampling)
                    assert choice.text == want.text and choice.finish_reason == want.finish_reason.value
                    assert whole.usage.prompt_tokens == want.usage.prompt_tokens
                    assert whole.usage.completion_tokens == want.usage.completion_tokens

                stream = await client.completions.create(
                    model="tiny",
                    prompt=prompt,
                    stream=True,
                    **http_fields(greedy),
                    extra_body=http_extra(greedy),
                )
                chunks = [c async for c in stream]
                want = await grpc_client.generate(prompt, sampling=greedy)
                assert [t for c in chunks for t in c.choices[0].model_extra["token_ids"]] == list(
                    want.token_ids
                )
                assert "".join(c.choices[0].text for c in chunks) == want.text
                assert chunks[-1].choices[0].finish_reason == "length"

            ids = list(prompts[0].encode())  # the tiny preset's tokenizer is bytes
            by_ids = await client.completions.create(
                model="tiny", prompt=ids, **http_fields(greedy), extra_body=http_extra(greedy)
            )
            assert by_ids.choices[0].model_extra["token_ids"] == list(
                (await grpc_client.generate(ids, sampling=greedy)).token_ids
            )

            messages = [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": prompts[1]},
            ]
            want = await grpc_client.generate(chat_prompt_ids(messages), sampling=greedy)
            chat = await client.chat.completions.create(
                model="tiny", messages=messages, **http_fields(greedy), extra_body=http_extra(greedy)
            )
            assert chat.choices[0].message.content == want.text
            assert chat.choices[0].model_extra["token_ids"] == list(want.token_ids)
            assert chat.usage.prompt_tokens == len(chat_prompt_ids(messages))
            stream = await client.chat.completions.create(
                model="tiny", messages=messages, stream=True, stream_options={"include_usage": True},
                **http_fields(greedy), extra_body=http_extra(greedy),
            )  # fmt: skip
            chunks = [c async for c in stream]
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == greedy.max_tokens
            listed = [m.id async for m in client.models.list()]
            assert listed == ["tiny"]

    run(body())


def test_bad_fields_get_400_naming_them_and_the_token_is_enforced(served):
    async def body():
        client = served.client()

        async def bad(param: str, **kwargs: Any) -> str:
            with pytest.raises(openai.BadRequestError) as info:
                await client.completions.create(**{"model": "tiny", "prompt": "x", "max_tokens": 4, **kwargs})
            assert info.value.param == param and info.value.body["param"] == param, info.value.body
            return info.value.body["message"]

        assert "must be in (0, 1]" in await bad("top_p", top_p=0)
        await bad("n", n=2)
        assert "outside the vocabulary" in await bad("prompt", prompt=[1, 2, 10**7])  # found by the pool
        assert "context" in await bad("max_tokens", prompt="y" * 100, max_tokens=4096)  # found by the pool
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": None}])
        assert info.value.param == "messages[0].content"

        with pytest.raises(openai.AuthenticationError):
            await served.client(api_key="not-the-token").completions.create(
                model="tiny", prompt="x", max_tokens=2
            )
        async with httpx.AsyncClient(base_url=served.root, timeout=30) as http:
            anonymous = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
            assert (await http.get("/health")).json() == {"status": "serving"}
        async with served.grpc() as grpc_client:
            assert await idle(grpc_client), "pages left after refused requests"

    run(body())


def test_a_streaming_client_that_disconnects_leaves_no_pages_used(served):
    # return_token_ids: a chunk per token even where the tiny model's tokens decode to no text.
    payload = {"prompt": "p" * 300, "max_tokens": 3000, "temperature": 0, "ignore_eos": True, "stream": True}
    payload["return_token_ids"] = True

    async def body():
        async with served.grpc() as grpc_client, httpx.AsyncClient(base_url=served.root, timeout=60) as http:
            assert await idle(grpc_client), "the cluster is not idle to begin with"
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with http.stream("POST", "/v1/completions", json=payload, headers=headers) as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                got = 0
                while got < 3:
                    if (await lines.__anext__()).startswith("data: "):
                        got += 1
                end = time.monotonic() + 30
                while (await grpc_client.status()).used_pages < 5:  # 300 prompt tokens: 5 pages of 64
                    assert time.monotonic() < end, "the running request's pages never showed"
                    await asyncio.sleep(0.05)
            # The connection is closed mid-answer: the gateway aborts the request on its worker.
            assert await idle(grpc_client), "pages still used after the client went away"

    run(body())


def test_hundred_concurrent_streams_each_end_with_one_done(served, seed):
    rng = random.Random(seed)
    n = 100
    prompts = ["".join(chr(rng.randrange(97, 123)) for _ in range(rng.randrange(1, 40))) for _ in range(n)]
    lengths = [rng.randrange(1, 5) for _ in range(n)]
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def one(http: Any, i: int) -> tuple[list[str], int]:
        chat = i % 2 == 1
        payload: dict[str, Any] = {
            "max_tokens": lengths[i],
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if chat:
            payload["messages"] = [{"role": "user", "content": prompts[i]}]
        else:
            payload["prompt"] = prompts[i]
        path = "/v1/chat/completions" if chat else "/v1/completions"
        async with http.stream("POST", path, json=payload, headers=headers) as response:
            return await sse_events(response), response.status_code

    async def body():
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=served.root, timeout=180, limits=limits) as http:
            results = await asyncio.gather(*(one(http, i) for i in range(n)))
        for i, (events, status) in enumerate(results):
            assert status == 200, (i, events)
            assert events.count("[DONE]") == 1 and events[-1] == "[DONE]", (i, events)
            decoded = [json.loads(e) for e in events[:-1]]
            assert all("error" not in d for d in decoded), (i, decoded)
            assert decoded[-1]["usage"]["completion_tokens"] == lengths[i]
            assert decoded[-2]["choices"][0]["finish_reason"] == "length"
        async with served.grpc() as grpc_client:
            assert await idle(grpc_client)

    run(body())
