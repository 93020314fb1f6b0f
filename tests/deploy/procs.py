"""Processes a test started, found and ended by process id (from /proc; no psutil, no `ray stop`),
and the ports a `ray start --head` of a test binds."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable

# Every port `ray start --head` would otherwise pick by itself: a port Ray picks at random may be one
# the test has chosen and released but Ray has not bound yet ("... is trying to use a port number N
# that is used by other components"). (Worker ports stay in Ray's 10002-19999, below the ephemeral
# range the kernel hands out for port 0.)
RAY_HEAD_PORT_OPTIONS = (
    "port", "node-manager-port", "object-manager-port", "ray-client-server-port", "dashboard-port",
    "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
)  # fmt: skip
RAY_START_ATTEMPTS = 3  # a port taken by another process between choosing and binding: choose again


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all bound at once while choosing, then released)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def ray_head_ports() -> dict[str, int]:
    """`ray start` option -> a distinct free port, for every option in RAY_HEAD_PORT_OPTIONS."""
    return dict(zip(RAY_HEAD_PORT_OPTIONS, free_ports(len(RAY_HEAD_PORT_OPTIONS)), strict=True))


def ray_port_conflict(log: str) -> bool:
    """True when a `ray start` log ends in Ray's refusal of a port (start again on new ports)."""
    return "is trying to use a port number" in log


def start_ray_head(
    launch: Callable[[dict[str, int]], subprocess.Popen[bytes]],
    read_log: Callable[[], str],
    timeout: float = 120.0,
) -> None:
    """Runs launch(ports) (`ray start --head --block` on those ports, in a process group of its own)
    until its log says the head is up. A head that exits on a port conflict has its process group
    killed and is launched again on new ports, up to RAY_START_ATTEMPTS times; any other exit, or
    no start within timeout, fails with the log."""
    for attempt in range(RAY_START_ATTEMPTS):
        proc = launch(ray_head_ports())
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in read_log():
            if proc.poll() is not None:
                with contextlib.suppress(ProcessLookupError):  # whatever it started before failing
                    os.killpg(proc.pid, signal.SIGKILL)
                assert ray_port_conflict(read_log()) and attempt + 1 < RAY_START_ATTEMPTS, (
                    f"ray start exited:\n{read_log()}"
                )
                break
            assert time.monotonic() < deadline, f"the head did not start:\n{read_log()}"
            time.sleep(0.25)
        else:
            return


def process_table() -> dict[int, tuple[str, int]]:
    """pid -> (state letter, parent pid) of every process."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            rest = stat[stat.rindex(")") + 2 :].split()
            table[int(name)] = (rest[0], int(rest[1]))
    return table


def descendants(root: int) -> set[int]:
    """Every process below `root` (children, their children, ...)."""
    table = process_table()
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, (_, ppid) in table.items() if ppid in frontier} - found
        found |= frontier
    return found


def reap(pids: set[int], timeout: float = 20.0) -> None:
    """Wait for these processes to exit; SIGKILL the ones still running after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        table = process_table()
        alive = {p for p in pids if p in table and table[p][0] != "Z"}
        if not alive:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
