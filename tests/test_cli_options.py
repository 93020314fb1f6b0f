"""The options several commands share (commands/options.py) parse the same way in each command."""

from __future__ import annotations

import argparse

import pytest

from mlaserve.cluster.commands import batch, bench, generate, serve, status
from mlaserve.worker.types import SamplingParams


def _parser(module) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser


def _empty(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("")
    return path


@pytest.mark.parametrize("module", [batch, generate, serve, status])
def test_auth_token_flag_and_environment_default(monkeypatch, module):
    required = {
        batch: ["--input", "in.jsonl", "--output", "out.jsonl"],
        generate: ["--prompt", "hi"],
    }.get(module, [])
    monkeypatch.setenv("MLASERVE_AUTH_TOKEN", "from-env")
    assert _parser(module).parse_args(required).auth_token == "from-env"
    assert _parser(module).parse_args([*required, "--auth-token", "s3cret"]).auth_token == "s3cret"
    monkeypatch.delenv("MLASERVE_AUTH_TOKEN")
    assert _parser(module).parse_args(required).auth_token is None


def test_bench_serve_takes_the_auth_token(monkeypatch):
    monkeypatch.delenv("MLASERVE_AUTH_TOKEN", raising=False)
    args = _parser(bench).parse_args(["serve", "--auth-token", "t0k"])
    assert args.auth_token == "t0k"


def test_batch_sampling_defaults_match_generate_flags(tmp_path):
    """Every sampling flag of `generate` is a batch default too, read back into the same SamplingParams."""
    flags = [
        "--temperature",
        "0.5",
        "--top-p",
        "0.9",
        "--top-k",
        "7",
        "--seed",
        "3",
        "--stop",
        "END",
        "--ignore-eos",
    ]
    gen = _parser(generate).parse_args(["--prompt", "x", "--max-tokens", "9", *flags])
    bat = _parser(batch).parse_args(
        ["--input", str(_empty(tmp_path)), "--output", "o", "--max-tokens", "9", *flags]
    )
    expected = SamplingParams(
        max_tokens=9, temperature=0.5, top_p=0.9, top_k=7, seed=3, stop=("END",), ignore_eos=True
    )
    assert generate.sampling_from_args(gen) == expected
    assert batch._config(bat).defaults == expected
    # with no flags: generate keeps its interactive default of 64 tokens, batch SamplingParams' own
    assert _parser(generate).parse_args(["--prompt", "x"]).max_tokens == 64
    assert (
        batch._config(_parser(batch).parse_args(["--input", str(_empty(tmp_path)), "--output", "o"])).defaults
        == SamplingParams()
    )


def test_bad_sampling_flag_is_a_value_error_naming_it(tmp_path):
    args = _parser(batch).parse_args(["--input", str(_empty(tmp_path)), "--output", "o", "--top-p", "0"])
    with pytest.raises(ValueError, match="top_p"):
        batch._config(args)
