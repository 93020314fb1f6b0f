"""Every cluster config in deploy/ must pass Ray's own launcher validation and our invariants.

Ray's checks are the ones `ray up` runs before it touches a cloud: `prepare_config` (defaults,
setup-command merging, per-type worker bounds; the local provider's own preparation) and
`validate_config` (the ray-schema.json that ships with Ray, plus its cross-field rules). For the
local provider the whole offline part of `ray up` (`_bootstrap_config`) runs as well.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("jsonschema")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CONFIGS = sorted([*DEPLOY.glob("*.yaml"), *DEPLOY.glob("*.yml")])
CLOUD_PROVIDERS = {"aws", "gcp", "azure"}
REMOTE_CHECKOUT = "~/mlaserve"


def _load(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


def _prepared(path: Path) -> dict:
    """What `ray up` works with after its offline preparation; raises where it would abort."""
    config = prepare_config(copy.deepcopy(_load(path)))
    validate_config(config)
    return config


def _ray_start_args(commands: list[str]) -> list[list[str]]:
    """The argument lists of every `ray start` in a list of shell commands."""
    found = []
    for command in commands:
        for part in re.split(r";|&&|\|\|", command):
            words = shlex.split(part)
            if words[:2] == ["ray", "start"]:
                found.append(words[2:])
    return found


def _worker_types(config: dict) -> dict[str, dict]:
    types = config["available_node_types"]
    if config["provider"]["type"] == "local":
        # One node type for head and workers; Ray detects their resources on each machine.
        return dict(types)
    return {name: t for name, t in types.items() if name != config["head_node_type"]}


def _first_worker(config: dict) -> dict:
    return next(iter(_worker_types(config).values()))


def test_deploy_has_a_hopper_cloud_and_an_on_prem_config():
    providers = {_load(p)["provider"]["type"] for p in CONFIGS}
    assert providers & CLOUD_PROVIDERS, f"no cloud config in deploy/ (providers: {providers})"
    assert "local" in providers, "no config for existing machines (provider type: local) in deploy/"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_ray_accepts_the_config(path: Path):
    config = _prepared(path)
    assert config["head_node_type"] in config["available_node_types"]
    if config["provider"]["type"] == "local":
        from ray.autoscaler._private.commands import _bootstrap_config

        _bootstrap_config(copy.deepcopy(_load(path)), no_config_cache=True)


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda c: c.update(max_workes=3), "max_workes"),  # misspelled top-level key
        (lambda c: c.update(idle_timeout_minutes="ten"), "ten"),
        (lambda c: c.update(head_node_type="head.missing"), "head_node_type"),
        (lambda c: _first_worker(c).update(min_workers=3) or c.update(max_workers=2), "max_workers"),
    ],
)
def test_ray_validation_rejects_broken_configs(mutate, error):
    """The check above has teeth: the same machinery refuses configs `ray up` would refuse."""
    cloud = next(p for p in CONFIGS if _load(p)["provider"]["type"] in CLOUD_PROVIDERS)
    config = _load(cloud)
    mutate(config)
    with pytest.raises(Exception, match=re.escape(error)):
        validate_config(prepare_config(config))


def test_ray_validation_rejects_a_misspelled_node_type_key():
    cloud = next(p for p in CONFIGS if _load(p)["provider"]["type"] in CLOUD_PROVIDERS)
    config = _load(cloud)
    worker = _first_worker(config)
    worker["min_worker"] = worker.pop("min_workers", 0)
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_head_offers_no_gpu(path: Path):
    config = _prepared(path)
    head = config["available_node_types"][config["head_node_type"]]
    if config["provider"]["type"] != "local":
        assert head["resources"].get("GPU", 0) == 0, "the head node type must not declare GPUs"
        assert head["max_workers"] == 0
    heads = [args for args in _ray_start_args(config["head_start_ray_commands"]) if "--head" in args]
    assert len(heads) == 1, f"expected one `ray start --head` in head_start_ray_commands, got {heads}"
    assert "--num-gpus=0" in heads[0], "the head must start Ray with --num-gpus=0 (no worker lands there)"
    assert any(a.startswith("--autoscaling-config=") for a in heads[0]), "the head must run the autoscaler"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_gpu_node_types_scale_between_bounds(path: Path):
    raw = _load(path)
    config = _prepared(path)
    assert raw.get("idle_timeout_minutes", 0) > 0, "set idle_timeout_minutes: idle GPU nodes must go away"
    workers = _worker_types(config)
    assert workers, "no worker node type"
    for name, node_type in workers.items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name
        assert node_type["max_workers"] >= 1, f"{name} can never scale up"
        if config["provider"]["type"] != "local":
            assert node_type["resources"].get("GPU", 0) >= 1, f"worker node type {name} declares no GPU"
    if config["provider"]["type"] == "local":
        assert config["max_workers"] <= len(raw["provider"]["worker_ips"])
    joins = _ray_start_args(config["worker_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in args for args in joins), joins


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_node_installs_mlaserve_with_its_kernel(path: Path):
    config = _prepared(path)
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged into both
        setup = [c for c in config[key] if "deploy/setup-node.sh" in c]
        assert setup, f"{key} never runs deploy/setup-node.sh"
        assert all("MLASERVE_CUDA=ON" in c for c in setup), (
            f"{key}: build the sm_90a kernel (MLASERVE_CUDA=ON)"
        )
    # The checkout the commands use is synced from this repository.
    assert config["file_mounts"].get(REMOTE_CHECKOUT) in (".", "./", str(REPO)), config["file_mounts"]
    if config["provider"]["type"] == "aws":
        assert any("boto3" in c for c in config["head_setup_commands"]), (
            "the AWS autoscaler needs boto3 on the head"
        )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_paths_the_config_uses_exist_in_the_repository(path: Path):
    config = _load(path)
    for local in config.get("file_mounts", {}).values():
        assert (REPO / os.path.expanduser(local)).exists(), f"file_mounts source {local} does not exist"
    commands = json.dumps({k: v for k, v in config.items() if k.endswith("_commands")})
    referenced = set(re.findall(re.escape(REMOTE_CHECKOUT) + r"/([\w./-]+)", commands))
    assert "deploy/setup-node.sh" in referenced and "deploy/start-gateway.sh" in referenced
    for rel in referenced:
        assert (REPO / rel).is_file(), (
            f"{path.name} runs {REMOTE_CHECKOUT}/{rel}, which is not in the repository"
        )


@pytest.mark.parametrize("script", sorted(DEPLOY.glob("*.sh")), ids=lambda p: p.name)
def test_scripts_parse_and_are_executable(script: Path):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"


# --- start-gateway.sh: the command it builds is one `mlaserve serve` accepts ---------------------


def _fake_mlaserve(bin_dir: Path, record: Path) -> None:
    """`mlaserve` that records its arguments and pid; `serve` then lives FAKE_SERVE_SECONDS and exits
    with FAKE_SERVE_STATUS; `status` exits at once with FAKE_STATUS_STATUS."""
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "mlaserve"
    fake.write_text(
        textwrap.dedent(
            f"""\
            #!{sys.executable}
            import json, os, sys, time
            tls_env = {{k: v for k, v in os.environ.items() if k.startswith("MLASERVE_TLS")}}
            with open({str(record)!r}, "a") as f:
                f.write(json.dumps({{"argv": sys.argv[1:], "pid": os.getpid(), "env": tls_env}}) + "\\n")
            if sys.argv[1] == "serve":
                print("fake serve starting", flush=True)
                time.sleep(float(os.environ.get("FAKE_SERVE_SECONDS", "0")))
                if os.environ.get("FAKE_SERVE_STATUS", "0") != "0":
                    print("model not found", file=sys.stderr, flush=True)
                sys.exit(int(os.environ.get("FAKE_SERVE_STATUS", "0")))
            sys.exit(int(os.environ.get("FAKE_STATUS_STATUS", "0")))
            """
        )
    )
    fake.chmod(0o755)


def _gateway_script(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    record = tmp_path / "calls.jsonl"
    _fake_mlaserve(tmp_path / "bin", record)
    full_env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "HOME": str(tmp_path), **(env or {})}
    done = subprocess.run(
        ["bash", str(DEPLOY / "start-gateway.sh"), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return done, calls


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _running(p)]


PLAINTEXT = {"MLASERVE_TLS_DIR": "off"}  # the supervision tests below need no certificates (nor openssl)
needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="deploy/make-certs.sh needs openssl"
)


def test_start_gateway_builds_a_serve_command_the_cli_accepts(tmp_path: Path):
    (tmp_path / "mlaserve.env").write_text("MLASERVE_MODEL=/mnt/models/from-env-file\nMLASERVE_PORT=6000\n")
    done, calls = _gateway_script(tmp_path, "--foreground", env={"MLASERVE_PORT": "7000", **PLAINTEXT})
    assert done.returncode == 0, done.stderr
    assert len(calls) == 1 and calls[0]["argv"][0] == "serve", calls
    argv = calls[0]["argv"][1:]
    # The environment beats ~/mlaserve.env, which beats the defaults.
    assert argv[argv.index("--port") + 1] == "7000"
    assert argv[argv.index("--model") + 1] == "/mnt/models/from-env-file"
    assert argv[argv.index("--address") + 1] == "auto"
    # Workers hold a GPU even though the cluster has none yet when the gateway starts.
    assert argv[argv.index("--num-gpus-per-worker") + 1] == "1"

    from mlaserve.cluster.cli import COMMANDS

    serve = pytest.importorskip(COMMANDS["serve"][0])
    import argparse

    parser = argparse.ArgumentParser(prog="mlaserve serve")
    serve.add_arguments(parser)
    args = parser.parse_args(argv)  # SystemExit here means the script drifted from the CLI
    pool_config = serve.pool_config_from_args(args)
    assert pool_config.num_gpus_per_worker == 1.0
    assert pool_config.model == "/mnt/models/from-env-file"
    assert serve.server_config_from_args(args).tls is None and "--tls-cert" not in argv


def _serve_args(argv: list[str]):
    import argparse

    from mlaserve.cluster.commands import serve

    parser = argparse.ArgumentParser(prog="mlaserve serve")
    serve.add_arguments(parser)
    return serve, parser.parse_args(argv)


@needs_openssl
def test_start_gateway_serves_mutual_tls_by_default_and_its_probe_uses_it(tmp_path: Path):
    """No TLS setting at all: certificates are made in ~/mlaserve-tls, the gateway gets them as flags
    (checked by the real TLSConfig), and the readiness probe connects with the client bundle."""
    env = {"MLASERVE_GATEWAY_WAIT_S": "30", "FAKE_SERVE_SECONDS": "120"}
    done, calls = _gateway_script(tmp_path, env=env)
    try:
        assert done.returncode == 0 and "gateway ready on port 50051 (TLS)" in done.stdout, (
            done.stdout,
            done.stderr,
        )
        by_command = {c["argv"][0]: c for c in calls}
        tls_dir = tmp_path / "mlaserve-tls"
        argv = by_command["serve"]["argv"][1:]
        assert argv[argv.index("--tls-cert") + 1] == str(tls_dir / "server.crt")
        assert argv[argv.index("--tls-key") + 1] == str(tls_dir / "server.key")
        assert argv[argv.index("--tls-client-ca") + 1] == str(tls_dir / "ca.crt")
        serve, args = _serve_args(argv)
        tls = serve.server_config_from_args(args).tls
        assert tls is not None and tls.mutual

        probe = by_command["status"]
        assert probe["argv"][1:] == ["--server", "localhost:50051", "--tls"]
        assert probe["env"]["MLASERVE_TLS_CA"] == str(tls_dir / "client" / "ca.crt")
        assert probe["env"]["MLASERVE_TLS_CLIENT_CERT"] == str(tls_dir / "client" / "client.crt")
        assert probe["env"]["MLASERVE_TLS_CLIENT_KEY"] == str(tls_dir / "client" / "client.key")
    finally:
        _gateway_script(tmp_path, "--stop", env=env)


def test_start_gateway_takes_certificates_of_your_own(tmp_path: Path):
    env = {
        "MLASERVE_TLS_CERT": "/etc/mlaserve/gw.crt",
        "MLASERVE_TLS_KEY": "/etc/mlaserve/gw.key",
        "MLASERVE_AUTH_TOKEN": "t0k",
    }
    done, calls = _gateway_script(tmp_path, "--foreground", env=env)
    assert done.returncode == 0, done.stderr
    argv = calls[0]["argv"][1:]
    assert argv[argv.index("--tls-cert") + 1] == "/etc/mlaserve/gw.crt"
    assert argv[argv.index("--tls-key") + 1] == "/etc/mlaserve/gw.key"
    assert "--tls-client-ca" not in argv  # TLS with a token, no client certificates
    assert not (tmp_path / "mlaserve-tls").exists(), "certificates were made although the user gave some"
    _, args = _serve_args(argv)
    assert (args.tls_cert, args.tls_key, args.tls_client_ca) == (
        "/etc/mlaserve/gw.crt",
        "/etc/mlaserve/gw.key",
        None,
    )


def test_start_gateway_detaches_waits_until_status_answers_and_stops(tmp_path: Path):
    env = {"MLASERVE_GATEWAY_WAIT_S": "30", "FAKE_SERVE_SECONDS": "120", **PLAINTEXT}
    done, calls = _gateway_script(tmp_path, env=env)
    assert done.returncode == 0 and "gateway ready on port 50051" in done.stdout, (done.stdout, done.stderr)
    by_command = {c["argv"][0]: c for c in calls}
    assert sorted(by_command) == ["serve", "status"] and len(calls) == 2, calls
    assert by_command["status"]["argv"][1:] == ["--server", "localhost:50051"]
    supervisor = int((tmp_path / ".mlaserve-gateway.pid").read_text())
    serve = by_command["serve"]["pid"]
    assert _running(supervisor) and _running(serve)

    done, _ = _gateway_script(tmp_path, "--stop", env=env)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / ".mlaserve-gateway.pid").exists()
    assert not _wait_gone([supervisor, serve]), "the gateway survived --stop"


def test_start_gateway_restarts_serve_after_a_failure_when_detached(tmp_path: Path):
    """ray up starts it with --no-wait: a start that fails (no GPU node yet) is retried."""
    env = {
        "FAKE_SERVE_SECONDS": "0",
        "FAKE_SERVE_STATUS": "3",
        "MLASERVE_GATEWAY_RESTART_DELAY_S": "0.2",
        **PLAINTEXT,
    }
    done, _ = _gateway_script(tmp_path, "--no-wait", env=env)
    assert done.returncode == 0, done.stderr
    record = tmp_path / "calls.jsonl"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (not record.exists() or len(record.read_text().splitlines()) < 3):
        time.sleep(0.1)
    serves = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(serves) >= 3 and {c["argv"][0] for c in serves} == {"serve"}, "serve was not restarted"
    assert "serve exited with status 3" in (tmp_path / "mlaserve-gateway.log").read_text()
    supervisor = int((tmp_path / ".mlaserve-gateway.pid").read_text())
    _gateway_script(tmp_path, "--stop", env=env)
    assert not _wait_gone([supervisor])


def test_start_gateway_reports_a_gateway_that_fails_to_start(tmp_path: Path):
    env = {
        "FAKE_SERVE_SECONDS": "0.5",
        "FAKE_SERVE_STATUS": "3",
        "MLASERVE_GATEWAY_WAIT_S": "30",
        **PLAINTEXT,
    }
    done, calls = _gateway_script(tmp_path, env={**env, "FAKE_STATUS_STATUS": "14"})  # never answers
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "model not found" in done.stderr and "failed to start" in done.stderr
    assert not (tmp_path / ".mlaserve-gateway.pid").exists(), "the supervisor was left running"
    assert not _wait_gone([c["pid"] for c in calls])


# --- setup-node.sh: which nvcc it builds the sm_90a kernel with --------------------------------


def _fake_nvcc(directory: Path, release: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    nvcc = directory / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\n"
        'echo "nvcc: NVIDIA (R) Cuda compiler driver"\n'
        f'echo "Cuda compilation tools, release {release}, V{release}.99"\n'
    )
    nvcc.chmod(0o755)
    return nvcc


def _find_nvcc(tmp_path: Path, cudacxx: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": f"{tmp_path / 'path-bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "MLASERVE_CUDA_ROOTS": f"{tmp_path / 'cuda-12.2'} {tmp_path / 'cuda-12.*'} {tmp_path / 'cuda-11.8'}",
    }
    if cudacxx is not None:
        env["CUDACXX"] = str(cudacxx)
    return subprocess.run(
        ["bash", str(DEPLOY / "setup-node.sh"), "--find-nvcc"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_setup_picks_the_newest_nvcc_recent_enough_for_sm90a(tmp_path: Path):
    _fake_nvcc(tmp_path / "path-bin", "12.1")  # on PATH, but too old for sm_90a
    _fake_nvcc(tmp_path / "cuda-11.8" / "bin", "11.8")
    _fake_nvcc(tmp_path / "cuda-12.2" / "bin", "12.2")
    assert _find_nvcc(tmp_path).returncode != 0, "no CUDA >= 12.3 yet: nothing may be chosen"

    _fake_nvcc(tmp_path / "cuda-12.4" / "bin", "12.4")
    newest = _fake_nvcc(tmp_path / "cuda-12.10" / "bin", "12.10")  # version order, not text order
    found = _find_nvcc(tmp_path)
    assert found.returncode == 0 and found.stdout.strip() == str(newest), found

    chosen = _fake_nvcc(tmp_path / "mine" / "bin", "12.6")
    assert _find_nvcc(tmp_path, cudacxx=chosen).stdout.strip() == str(chosen)  # CUDACXX wins when recent
    old = _fake_nvcc(tmp_path / "old" / "bin", "12.0")
    assert _find_nvcc(tmp_path, cudacxx=old).stdout.strip() == str(newest)
