"""Processes a test started, found and ended by process id (from /proc; no psutil, no `ray stop`)."""

from __future__ import annotations

import contextlib
import os
import signal
import time


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
