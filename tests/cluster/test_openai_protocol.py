"""The OpenAI HTTP API's request parsing and answer shapes, without a server: every bad field is a 400
naming it, unsupported features are refused rather than ignored, and the answers validate against
the official `openai` package's own response types."""

from __future__ import annotations

import pytest

from mlaserve.cluster.errors import InvalidRequest
from mlaserve.cluster.openai_protocol import (
    AnswerHeader,
    ApiError,
    answer_json,
    chunk_json,
    http_param,
    invalid_request_error,
    models_json,
    parse_chat,
    parse_completion,
    usage_chunk_json,
)
from mlaserve.worker.types import FinishReason, Usage


def refused(parse, body) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body)
    err = info.value
    assert err.status == 400 and err.type == "invalid_request_error"
    if err.param is not None:
        assert err.message.startswith(f"{err.param}: "), err.message
    return err


def test_completion_prompt_forms():
    assert parse_completion({"prompt": "hi"}).prompt == "hi"
    req = parse_completion({"prompt": [5, 6, 7]})
    assert (req.prompt, req.prompt_token_ids) == (None, (5, 6, 7))
    assert parse_completion({"prompt": ["one"]}).prompt == "one"  # a batch of one
    assert parse_completion({"prompt": [[1, 2]]}).prompt_token_ids == (1, 2)
    for body, param in [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": 7}, "prompt"),
        ({"prompt": {"text": "x"}}, "prompt"),
        ({"prompt": [1, True, 3]}, "prompt[1]"),
        ({"prompt": [1, "x"]}, "prompt[1]"),
    ]:
        assert refused(parse_completion, body).param == param, body
    assert "batch of 2" in refused(parse_completion, {"prompt": ["a", "b"]}).message
    err = refused(parse_completion, ["not", "an", "object"])
    assert err.param is None and "JSON object" in err.message


def test_completion_sampling_fields():
    req = parse_completion(
        {
            "prompt": "x",
            "model": "tiny",
            "max_tokens": 7.0,  # JSON numbers that are integers are integers
            "temperature": 0,
            "top_p": 0.5,
            "top_k": -1,  # vLLM's "off"
            "seed": 2**63,
            "stop": "\n",
            "stop_token_ids": [3, 4],
            "ignore_eos": True,
            "n": 1,
            "best_of": 1,
            "presence_penalty": 0.0,
            "frequency_penalty": 0,
            "logprobs": None,
            "echo": False,
            "user": "someone",
            "some_future_field": {"ignored": True},
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
    )
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (7, 0.0, 0.5, 0, 2**63)
    assert (s.stop, s.stop_token_ids, s.ignore_eos) == (("\n",), (3, 4), True)
    assert (req.model, req.stream, req.include_usage, req.return_token_ids) == ("tiny", True, True, True)
    empty = parse_completion({"prompt": "x"})
    assert (
        empty.sampling.max_tokens is None and empty.sampling.temperature is None and empty.sampling.stop == ()
    )
    assert not empty.stream and not empty.include_usage
    assert parse_completion({"prompt": "x", "stop": ["a", "b"]}).sampling.stop == ("a", "b")


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("max_tokens", 0, "max_tokens"),
        ("max_tokens", 2.5, "max_tokens"),
        ("max_tokens", "8", "max_tokens"),
        ("temperature", "hot", "temperature"),
        ("temperature", True, "temperature"),
        ("top_p", [0.5], "top_p"),
        ("top_k", 1.5, "top_k"),
        ("seed", -1, "seed"),
        ("seed", 2**64, "seed"),
        ("stop", 5, "stop"),
        ("stop", ["ok", 5], "stop[1]"),
        ("stop_token_ids", "3", "stop_token_ids"),
        ("stop_token_ids", [3, "x"], "stop_token_ids[1]"),
        ("ignore_eos", "yes", "ignore_eos"),
        ("stream", 1, "stream"),
        ("n", 2, "n"),
        ("n", True, "n"),
        ("best_of", 3, "best_of"),
        ("logprobs", 5, "logprobs"),
        ("echo", True, "echo"),
        ("suffix", "tail", "suffix"),
        ("presence_penalty", 0.5, "presence_penalty"),
        ("frequency_penalty", -1, "frequency_penalty"),
        ("logit_bias", {"5": 10}, "logit_bias"),
        ("model", 3, "model"),
        ("user", 3, "user"),
    ],
)
def test_completion_bad_fields_are_named(field, value, param):
    err = refused(parse_completion, {"prompt": "x", field: value})
    assert err.param == param, err.message
    if field in (
        "n",
        "best_of",
        "logprobs",
        "echo",
        "suffix",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
    ):
        assert err.code == "unsupported_parameter" and "supports only" in err.message


def test_stream_options_need_stream():
    assert refused(parse_completion, {"prompt": "x", "stream_options": {"include_usage": True}}).param == (
        "stream_options"
    )
    err = refused(parse_completion, {"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}})
    assert err.param == "include_usage"
    assert (
        refused(parse_completion, {"prompt": "x", "stream": True, "stream_options": []}).param
        == "stream_options"
    )


def test_chat_messages():
    req = parse_chat(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None, "name": "bot"},
                {"role": "user", "content": "go"},
            ],
            "max_completion_tokens": 5,
            "max_tokens": 99,  # the newer field wins
            "tool_choice": "none",
            "response_format": {"type": "text"},
            "chat_template_kwargs": {"thinking": True},
        }
    )
    assert [m["content"] for m in req.messages] == ["be brief", "a\nb", None, "go"]
    assert req.messages[2]["name"] == "bot"
    assert req.sampling.max_tokens == 5 and req.chat_template_kwargs == {"thinking": True}
    assert (
        parse_chat({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3}).sampling.max_tokens == 3
    )
    user = {"role": "user", "content": "x"}
    for body, param in [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [user, "hi"]}, "messages[1]"),
        ({"messages": [user, {"role": "robot", "content": "x"}]}, "messages[1].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, "messages[0].content[0]"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0].type",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
            "messages[0].content[0].text",
        ),
        ({"messages": [user], "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [user], "tool_choice": "required"}, "tool_choice"),
        ({"messages": [user], "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [user], "logprobs": True}, "logprobs"),
        ({"messages": [user], "n": 3}, "n"),
        ({"messages": [user], "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"messages": [user], "chat_template_kwargs": "x"}, "chat_template_kwargs"),
        ({"messages": [user], "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ]:
        assert refused(parse_chat, body).param == param, body


def test_cluster_field_names_become_the_http_requests_own():
    assert http_param("sampling.max_tokens", "completion") == "max_tokens"
    assert http_param("sampling.stop[2]", "chat") == "stop[2]"
    assert http_param("prompt_token_ids", "completion") == "prompt"
    assert http_param("prompt_token_ids[3]", "completion") == "prompt[3]"
    assert http_param("prompt_token_ids[3]", "chat") == "messages"
    assert http_param("prompt", "chat") == "messages"
    assert http_param("max_tokens", "chat") == "max_tokens"  # the engine's own name
    err = invalid_request_error(InvalidRequest("prompt_token_ids", "token id 999 is outside"), "completion")
    assert (err.status, err.param, err.message) == (400, "prompt", "prompt: token id 999 is outside")
    assert err.body() == {
        "error": {
            "message": "prompt: token id 999 is outside",
            "type": "invalid_request_error",
            "param": "prompt",
            "code": None,
        }
    }


def test_answers_validate_as_the_openai_package_types():
    types = pytest.importorskip("openai.types")
    chat_types = pytest.importorskip("openai.types.chat")
    usage = Usage(prompt_tokens=5, completion_tokens=3, cached_tokens=2)
    head = AnswerHeader("cmpl-1", 1700000000, "tiny", chat=False)
    full = types.Completion.model_validate(answer_json(head, "abc", FinishReason.LENGTH, usage, [1, 2, 3]))
    assert full.choices[0].text == "abc" and full.choices[0].finish_reason == "length"
    assert full.usage.total_tokens == 8 and full.usage.prompt_tokens_details.cached_tokens == 2
    assert full.choices[0].model_extra["token_ids"] == [1, 2, 3]
    # (The package's Completion type has no null finish_reason, though OpenAI streams one until the last
    # chunk; the client builds stream chunks without validating them.)
    chunk = chunk_json(head, "a", None, first=True)
    assert chunk["choices"] == [{"index": 0, "text": "a", "logprobs": None, "finish_reason": None}]
    assert chunk["object"] == "text_completion" and "usage" not in chunk
    assert chunk_json(head, "", None, include_usage=True)["usage"] is None
    last = types.Completion.model_validate(chunk_json(head, "", FinishReason.STOP, token_ids=[7]))
    assert last.choices[0].finish_reason == "stop" and last.choices[0].model_extra["token_ids"] == [7]
    assert types.Completion.model_validate(usage_chunk_json(head, usage)).choices == []

    chat = AnswerHeader("chatcmpl-1", 1700000000, "tiny", chat=True)
    answer = chat_types.ChatCompletion.model_validate(answer_json(chat, "hi", FinishReason.STOP, usage))
    assert answer.choices[0].message.content == "hi" and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "stop" and answer.object == "chat.completion"
    first = chat_types.ChatCompletionChunk.model_validate(chunk_json(chat, "", None, first=True))
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    middle = chat_types.ChatCompletionChunk.model_validate(chunk_json(chat, "x", None, include_usage=True))
    assert middle.choices[0].delta.content == "x" and middle.choices[0].delta.role is None
    last = chat_types.ChatCompletionChunk.model_validate(chunk_json(chat, "", FinishReason.LENGTH))
    assert last.choices[0].delta.content is None and last.choices[0].finish_reason == "length"
    tail = chat_types.ChatCompletionChunk.model_validate(usage_chunk_json(chat, usage))
    assert tail.choices == [] and tail.usage.completion_tokens == 3
    listing = pytest.importorskip("openai.types").Model.model_validate(
        models_json("tiny", 1, 4096)["data"][0]
    )
    assert listing.id == "tiny" and listing.model_extra["max_model_len"] == 4096
