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


CLIENT_TLS_ENV = {
    "tls_ca": "MLASERVE_TLS_CA",
    "tls_cert": "MLASERVE_TLS_CLIENT_CERT",
    "tls_key": "MLASERVE_TLS_CLIENT_KEY",
    "tls_server_name": "MLASERVE_TLS_SERVER_NAME",
}


@pytest.mark.parametrize("command", ["batch", "generate", "status", "bench serve"])
def test_client_tls_flags_and_environment_defaults(monkeypatch, command):
    """Every client command takes the same TLS flags, each defaulting to its own variable; the client
    certificate's variables differ from the gateway's MLASERVE_TLS_CERT / MLASERVE_TLS_KEY."""
    module = {"batch": batch, "generate": generate, "status": status, "bench serve": bench}[command]
    required = {
        "batch": ["--input", "in.jsonl", "--output", "out.jsonl"],
        "generate": ["--prompt", "hi"],
        "bench serve": ["serve"],
    }.get(command, [])
    for var in (*CLIENT_TLS_ENV.values(), "MLASERVE_TLS_CERT", "MLASERVE_TLS_KEY"):
        monkeypatch.delenv(var, raising=False)
    args = _parser(module).parse_args(required)
    assert [getattr(args, a) for a in CLIENT_TLS_ENV] == [None] * 4 and args.tls is False
    monkeypatch.setenv("MLASERVE_TLS_CERT", "gateway.crt")  # the gateway's: not a client default
    for attr, var in CLIENT_TLS_ENV.items():
        monkeypatch.setenv(var, f"env-{attr}")
    args = _parser(module).parse_args(required)
    assert [getattr(args, a) for a in CLIENT_TLS_ENV] == [f"env-{a}" for a in CLIENT_TLS_ENV]
    flags = ["--tls", "--tls-ca", "a", "--tls-cert", "b", "--tls-key", "c", "--tls-server-name", "d"]
    args = _parser(module).parse_args([*required, *flags])
    assert [getattr(args, a) for a in CLIENT_TLS_ENV] == ["a", "b", "c", "d"] and args.tls is True


def test_serve_tls_flags_have_no_environment_defaults(monkeypatch):
    """The gateway's files come from its flags only (deploy/start-gateway.sh passes them)."""
    for var in ("MLASERVE_TLS_CERT", "MLASERVE_TLS_KEY", "MLASERVE_TLS_CA", "MLASERVE_TLS_CLIENT_CERT"):
        monkeypatch.setenv(var, "x.pem")
    args = _parser(serve).parse_args([])
    assert (args.tls_cert, args.tls_key, args.tls_client_ca) == (None, None, None)
    args = _parser(serve).parse_args(
        ["--tls-cert", "s.crt", "--tls-key", "s.key", "--tls-client-ca", "ca.crt"]
    )
    assert (args.tls_cert, args.tls_key, args.tls_client_ca) == ("s.crt", "s.key", "ca.crt")
