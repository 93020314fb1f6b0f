"""The TLS flags of the `mlaserve` commands, end to end: `generate`, `status`, `batch` and
`bench serve` against a gateway serving mutual TLS with a bearer token (the fake pool of
tests/cluster/test_grpc_fake.py, certificates made by tests/cluster/tls_certs.py), through the CLI
entry in-process and as the subprocess users run; `serve` checks its TLS files before Ray starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from mlaserve.cluster import cli
from mlaserve.cluster.server import ServerConfig
from mlaserve.cluster.tls import TLSConfig
from mlaserve.worker.types import SamplingParams

from .cluster.test_grpc_fake import expected_tokens, text_of
from .cluster.tls_certs import CertFiles, make_certs
from .test_cli_serve import BackgroundGateway, parse

TOKEN = "cli-s3cret"
ENV_VARS = (
    "MLASERVE_AUTH_TOKEN",
    "MLASERVE_TLS_CA",
    "MLASERVE_TLS_CLIENT_CERT",
    "MLASERVE_TLS_CLIENT_KEY",
    "MLASERVE_TLS_SERVER_NAME",
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertFiles:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def clean_env(monkeypatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def gateway(certs, clean_env) -> Iterator[BackgroundGateway]:
    tls = TLSConfig.from_files(certs.server_cert, certs.server_key, certs.ca)
    g = BackgroundGateway(ServerConfig(host="127.0.0.1", port=0, tls=tls, auth_token=TOKEN))
    try:
        yield g
    finally:
        g.close()


def client_flags(c: CertFiles, *, cert: bool = True, token: str | None = TOKEN) -> list[str]:
    flags = ["--tls-ca", c.ca]
    if cert:
        flags += ["--tls-cert", c.client_cert, "--tls-key", c.client_key]
    return flags + (["--auth-token", token] if token else [])


def test_generate_and_status_over_mutual_tls(gateway, certs, capsys):
    addr = gateway.server.address
    want = text_of(expected_tokens(list(b"hello"), SamplingParams(max_tokens=7))[0])
    gen = ["generate", "--server", addr, "--prompt", "hello", "--max-tokens", "7"]

    assert cli.main([*gen, *client_flags(certs)]) == 0
    assert want in capsys.readouterr().out
    assert cli.main([*gen, "--no-stream", *client_flags(certs)]) == 0
    assert capsys.readouterr().out.strip() == want
    assert cli.main(["status", "--server", addr, *client_flags(certs)]) == 0
    out = capsys.readouterr().out
    assert all(w in out for w in gateway.pool.workers) and "serving" in out

    refused = [
        (client_flags(certs, cert=False), "UNAVAILABLE", "the TLS handshake failed"),  # no client certificate
        (["--tls-ca", certs.other_ca, "--auth-token", TOKEN], "UNAVAILABLE", "the TLS handshake failed"),
        (["--auth-token", TOKEN], "UNAVAILABLE", "speaks TLS"),  # plaintext against a TLS port
        (client_flags(certs, token="wrong"), "UNAUTHENTICATED", "bearer token"),
        (client_flags(certs, token=None), "UNAUTHENTICATED", "bearer token"),
    ]
    for flags, code, hint in refused:
        assert cli.main([*gen, *flags]) == 1, flags
        err = capsys.readouterr().err
        assert f"{addr}: {code}" in err and hint in err, (flags, err)
    assert cli.main(["status", "--server", addr, "--timeout", "5", *client_flags(certs, cert=False)]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_client_tls_settings_from_the_environment(gateway, certs, capsys, monkeypatch):
    """What deploy/start-gateway.sh's readiness probe relies on: `mlaserve status --server H:P` alone."""
    monkeypatch.setenv("MLASERVE_TLS_CA", certs.ca)
    monkeypatch.setenv("MLASERVE_TLS_CLIENT_CERT", certs.client_cert)
    monkeypatch.setenv("MLASERVE_TLS_CLIENT_KEY", certs.client_key)
    monkeypatch.setenv("MLASERVE_AUTH_TOKEN", TOKEN)
    assert cli.main(["status", "--server", gateway.server.address]) == 0
    assert "total (3)" in capsys.readouterr().out
    monkeypatch.setenv("MLASERVE_TLS_SERVER_NAME", "not-the-gateway.example.com")
    assert cli.main(["status", "--server", gateway.server.address, "--timeout", "5"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_bad_tls_flags_exit_2_naming_the_flag(certs, clean_env, tmp_path, capsys):
    missing = str(tmp_path / "missing-ca.pem")
    for argv, message in (
        (["generate", "--server", "127.0.0.1:1", "--prompt", "x", "--tls-ca", missing], "--tls-ca"),
        (
            ["status", "--server", "127.0.0.1:1", "--tls-cert", certs.client_cert],
            "--tls-cert needs --tls-key",
        ),
    ):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, err
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "prompt": "x"}\n')
    argv = ["batch", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--server", "127.0.0.1:1"]
    assert cli.main([*argv, "--tls-key", certs.client_key, "--no-progress"]) == 2
    assert "--tls-key needs --tls-cert" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--tls-ca .*no such file"):
        cli.main(["bench", "serve", "--server", "127.0.0.1:1", "--tls-ca", missing])


def test_batch_and_bench_serve_over_mutual_tls(gateway, certs, tmp_path, capsys):
    addr = gateway.server.address
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompts = {"a": "first", "b": "second"}
    inp.write_text(
        "".join(json.dumps({"id": k, "prompt": p, "max_tokens": 4}) + "\n" for k, p in prompts.items())
    )
    argv = ["batch", "--input", str(inp), "--output", str(out), "--server", addr, "--no-progress"]
    assert cli.main([*argv, *client_flags(certs)]) == 0, capsys.readouterr().err
    results = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    for key, prompt in prompts.items():
        want = expected_tokens(list(prompt.encode()), SamplingParams(max_tokens=4))[0]
        assert results[key]["token_ids"] == want, results[key]

    bench = ["bench", "serve", "--server", addr, "--requests", "4", "--concurrency", "2"]
    assert cli.main([*bench, "--prompt-len", "8", "--max-tokens", "3", *client_flags(certs)]) == 0
    report = capsys.readouterr().out
    assert "| completed | 4 |" in report and "| errors | 0 |" in report, report
    assert "| fake-0 | cpu |" in report  # the status polls got through too


def test_the_console_entry_over_mutual_tls(gateway, certs):
    """The command as a user types it (a separate process, its own gRPC stack)."""
    cmd = [sys.executable, "-m", "mlaserve.cluster.cli", "generate", "--server", gateway.server.address]
    cmd += ["--prompt", "hello", "--max-tokens", "5", *client_flags(certs)]
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == text_of(expected_tokens(list(b"hello"), SamplingParams(max_tokens=5))[0]) + "\n"


def test_serve_tls_flags_reach_the_server_config_and_are_checked_before_ray(certs, capsys, monkeypatch):
    from mlaserve.cluster.commands import serve

    args = parse(
        "serve", ["--tls-cert", certs.server_cert, "--tls-key", certs.server_key, "--tls-client-ca", certs.ca]
    )
    config = serve.server_config_from_args(args)
    assert config.tls == TLSConfig(certs.server_cert, certs.server_key, certs.ca) and config.tls.mutual
    assert serve.server_config_from_args(parse("serve", [])).tls is None

    def no_ray(*a, **k):
        raise AssertionError("Ray started before the TLS flags were checked")

    monkeypatch.setattr(serve, "init_ray", no_ray)
    for argv, message in (
        (["--tls-cert", certs.server_cert], "--tls-cert needs --tls-key"),
        (["--tls-client-ca", certs.ca], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--tls-cert", certs.server_cert, "--tls-key", certs.client_key], "is not the private key"),
    ):
        assert serve.run(parse("serve", argv)) == 2
        assert message in capsys.readouterr().err
