"""`mlaserve serve / status / demo / generate --server`: parsers, the client commands against a gateway
over a fake pool, and (marked ray) the real commands as subprocesses on a local Ray cluster."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mlaserve.cluster import cli
from mlaserve.cluster.server import GatewayServer, ServerConfig

from .cluster.test_grpc_fake import FakePool


def parse(command: str, argv: list[str]) -> Any:
    import argparse
    import importlib

    module = importlib.import_module(cli.COMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"mlaserve {command}")
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_serve_defaults_and_flags(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = parse("serve", [])
    assert (args.model, args.port, args.host, args.address, args.metrics_port) == (
        "tiny",
        50051,
        "0.0.0.0",
        None,
        None,
    )
    assert args.policy == "occupancy" and args.num_workers is None
    args = parse(
        "serve",
        [
            "--model",
            "/ckpt",
            "--num-workers",
            "4",
            "--min-workers",
            "2",
            "--max-workers",
            "8",
            "--port",
            "6000",
            "--metrics-port",
            "9090",
            "--policy",
            "prefix",
            "--address",
            "auto",
        ],
    )
    assert (args.model, args.num_workers, args.min_workers, args.max_workers) == ("/ckpt", 4, 2, 8)
    assert (args.port, args.metrics_port, args.policy, args.address) == (6000, 9090, "prefix", "auto")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert parse("serve", []).address == "10.0.0.1:6379"


def test_serve_engine_flags_reach_the_pool_config():
    from mlaserve.cluster.commands.serve import pool_config_from_args
    from mlaserve.worker.config import EngineConfig

    assert pool_config_from_args(parse("serve", [])).engine_kwargs == {}
    config = pool_config_from_args(
        parse("serve", ["--eager-decode", "--num-pages", "96", "--dtype", "float32"])
    )
    assert config.engine_kwargs == {
        "config": EngineConfig(decode_graphs=False),
        "num_pages": 96,
        "dtype": "float32",
    }
    with pytest.raises(SystemExit):
        parse("serve", ["--policy", "random"])


def test_serve_http_flags_reach_the_server_config():
    from mlaserve.cluster.commands.serve import server_config_from_args
    from mlaserve.cluster.openai_http import HttpConfig

    assert server_config_from_args(parse("serve", [])).http is None  # off by default
    argv = [
        "--http-port",
        "0",
        "--served-model-name",
        "mla",
        "--chat-template",
        "t.jinja",
        "--auth-token",
        "k",
    ]
    config = server_config_from_args(parse("serve", argv))
    assert config.http == HttpConfig(
        port=0, model="tiny", served_model_name="mla", chat_template_file="t.jinja"
    )
    assert config.auth_token == "k" and config.http.model_name == "mla"
    assert server_config_from_args(parse("serve", ["--http-port", "8000"])).http.model_name == "tiny"


def test_serve_refuses_bad_http_settings_before_starting_ray(monkeypatch, capsys):
    from mlaserve.cluster.commands import serve

    monkeypatch.setattr(serve, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    assert cli.main(["serve", "--http-port", "0", "--chat-template", "/no/such/template.jinja"]) == 2
    assert "chat template file /no/such/template.jinja does not exist" in capsys.readouterr().err
    assert cli.main(["serve", "--http-port", "70000"]) == 2
    assert "HttpConfig.port must be in [0, 65535]" in capsys.readouterr().err


class BackgroundGateway:
    """A GatewayServer over a FakePool, its loop in a thread (the CLI runs its own loop)."""

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pool = FakePool(step_s=0.002)
        self.server = GatewayServer(self.pool, config or ServerConfig(host="127.0.0.1", port=0))
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def gateway() -> Iterator[BackgroundGateway]:
    g = BackgroundGateway()
    try:
        yield g
    finally:
        g.close()


def test_status_prints_the_workers_table(gateway, capsys):
    assert cli.main(["status", "--server", gateway.server.address]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["WORKER", "DEVICE", "HEALTH"]
    for w in gateway.pool.workers:
        row = next(line for line in lines if line.startswith(w))
        assert row.split()[1:4] == ["cpu", "healthy", f"0/{gateway.pool.total_pages}"]
    assert "total (3)" in out and "serving" in out

    assert cli.main(["status", "--server", gateway.server.address, "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert [w["worker_id"] for w in data["workers"]] == gateway.pool.workers and data["serving"] is True


def test_status_reports_an_unreachable_server(capsys):
    assert cli.main(["status", "--server", "127.0.0.1:1", "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert "127.0.0.1:1" in err and "UNAVAILABLE" in err


def _generate_has_server_mode() -> bool:
    try:
        args = parse("generate", ["--server", "h:1", "--prompt", "x"])
    except (ImportError, SystemExit):
        return False
    return getattr(args, "server", None) == "h:1"


@pytest.mark.skipif(not _generate_has_server_mode(), reason="mlaserve generate has no --server mode yet")
def test_generate_server_mode_streams_to_the_terminal(gateway, capsys):
    from mlaserve.worker.types import SamplingParams

    from .cluster.test_grpc_fake import expected_tokens, text_of

    rc = cli.main(["generate", "--server", gateway.server.address, "--prompt", "hello", "--max-tokens", "7"])
    assert rc == 0
    out = capsys.readouterr().out
    want, _ = expected_tokens(list(b"hello"), SamplingParams(max_tokens=7))
    assert text_of(want) in out

    # Checked by the client before sending (exit 2), and by the server (INVALID_ARGUMENT, exit 1).
    assert cli.main(["generate", "--server", gateway.server.address, "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
    rc = cli.main(["generate", "--server", gateway.server.address, "--prompt", "x", "--max-tokens", "5000"])
    err = capsys.readouterr().err
    assert rc == 1 and "INVALID_ARGUMENT: sampling.max_tokens: must be in [1, 4096]" in err

    # --no-stream asks with the unary RPC; several prompts are answered in order.
    rc = cli.main(
        [
            "generate",
            "--server",
            gateway.server.address,
            "--prompt",
            "ab",
            "--prompt",
            "cd",
            "--max-tokens",
            "3",
            "--no-stream",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert out.split() == [
        text_of(expected_tokens(list(p), SamplingParams(max_tokens=3))[0]) for p in (b"ab", b"cd")
    ]


# -- the real commands, as users run them ---------------------------------------------------------


def _mlaserve(*argv: str) -> list[str]:
    return [sys.executable, "-m", "mlaserve.cluster.cli", *argv]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.ray
@pytest.mark.slow
def test_demo_runs_the_whole_stack_in_under_a_minute():
    start = time.monotonic()
    proc = subprocess.run(
        _mlaserve("demo", "--max-tokens", "8"), capture_output=True, text=True, timeout=180, env=_env()
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "[stream]" in out and "[unary]" in out
    assert re.search(r"finish=length tokens=8 ", out), out
    assert "WORKER" in out and "total (2)" in out and "demo finished" in out
    assert elapsed < 60, f"demo took {elapsed:.0f} s"


@pytest.mark.ray
@pytest.mark.slow
def test_serve_answers_clients_then_drains_on_sigterm():
    proc = subprocess.Popen(
        _mlaserve("serve", "--host", "127.0.0.1", "--port", "0", "--num-workers", "2", "--metrics-port", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )
    lines: list[str] = []
    try:
        address = None
        deadline = time.monotonic() + 120
        while address is None:
            assert time.monotonic() < deadline, "serve did not start:\n" + "".join(lines)
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "serve exited:\n" + "".join(lines)
            lines.append(line)
            m = re.search(r"serving tiny on (127\.0\.0\.1:\d+)", line)
            if m:
                address = m.group(1)
        status = subprocess.run(
            _mlaserve("status", "--server", address), capture_output=True, text=True, timeout=60, env=_env()
        )
        assert status.returncode == 0, status.stderr
        assert "total (2)" in status.stdout and "healthy" in status.stdout
        if _generate_has_server_mode():
            gen = subprocess.run(
                _mlaserve("generate", "--server", address, "--prompt", "hi", "--max-tokens", "5"),
                capture_output=True,
                text=True,
                timeout=60,
                env=_env(),
            )
            assert gen.returncode == 0, gen.stderr
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=90)
        lines.append(rest)
        assert proc.returncode == 0, "".join(lines)
        assert "draining" in rest and "stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
