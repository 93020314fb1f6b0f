"""The acceptance check of repeated worker deaths, by hand (not collected by pytest; minutes long):

    python -m tests.cluster.chaos_serve --streams 200 --max-tokens 64 --kill-every 3 --kills 5

Starts `mlaserve serve --num-workers 2` (its own local Ray cluster, CPU workers, tiny model),
runs the streams once undisturbed through its gateway, then again while a worker process of
*that* serve (a `ray::WorkerActor` process descended from it, never another session's) is
SIGKILLed every --kill-every seconds, --kills times (any of them, or with --ready-only the
oldest while one is live, so that every kill hits a worker with streams on it); compares every disturbed stream with its
undisturbed twin (tokens, text, finish reason, usage) and prints what happened, including how
long no worker at all was alive (from GetClusterStatus polled every 0.2 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from mlaserve.cluster.client import DecoderClient
from mlaserve.worker.types import SamplingParams


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def start_time(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def worker_pids(serve_pid: int) -> list[int]:
    pids = []
    for pid in descendants(serve_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::WorkerActor"):
            pids.append(pid)
    return pids


async def run_streams(
    client: DecoderClient, prompts: list[list[int]], sp: SamplingParams, tag: str
) -> list[Any]:
    async def one(i: int) -> Any:
        try:
            tokens: list[int] = []
            text, reason, usage = "", None, None
            async for cd in client.stream(prompts[i], sampling=sp, request_id=f"{tag}{i}"):
                tokens.extend(cd.delta.token_ids)
                text += cd.delta.text
                if cd.delta.finished:
                    reason, usage = cd.delta.finish_reason, cd.delta.usage
            return tuple(tokens), text, reason, usage.completion_tokens if usage else None
        except grpc.aio.AioRpcError as e:
            return e

    return await asyncio.gather(*(one(i) for i in range(len(prompts))))


async def main(args: argparse.Namespace) -> int:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "mlaserve.cluster.cli", "serve", "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--num-workers", "2", "--num-pages", str(args.num_pages), "--metrics-port", "0"]
    serve = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log: list[str] = []
    try:
        address = metrics = None
        while address is None:
            line = serve.stdout.readline()  # type: ignore[union-attr]
            if not line and serve.poll() is not None:
                print("".join(log))
                return 1
            log.append(line)
            m = re.search(r"serving tiny on (127\.0\.0\.1:\d+)(?:, metrics on (\S+))?", line)
            if m:
                address, metrics = m.group(1), m.group(2)
        threading.Thread(target=lambda: log.extend(serve.stdout), daemon=True).start()  # type: ignore[arg-type]
        rng = random.Random(args.seed)
        prompts = [[rng.randrange(1, 256) for _ in range(rng.randint(4, 40))] for _ in range(args.streams)]
        sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        async with DecoderClient(address) as client:
            t0 = time.monotonic()
            calm = await run_streams(client, prompts, sp, "calm")
            calm_s = time.monotonic() - t0
            bad = [r for r in calm if isinstance(r, BaseException)]
            print(f"undisturbed: {len(calm) - len(bad)}/{len(calm)} streams in {calm_s:.1f} s")
            if bad:
                print("undisturbed run failed:", bad[0])
                return 1

            kills: list[tuple[float, int]] = []
            none_alive_s, none_alive_seen = 0.0, 0
            done = asyncio.Event()

            async def killer() -> None:
                while len(kills) < args.kills and not done.is_set():
                    await asyncio.sleep(args.kill_every)
                    if args.ready_only:  # wait for a live worker; its process is the oldest one
                        while not done.is_set():
                            with contextlib.suppress(grpc.aio.AioRpcError):
                                if any(w.alive for w in (await client.status(timeout=5)).workers):
                                    break
                            await asyncio.sleep(0.2)
                    pids = worker_pids(serve.pid)
                    if pids and not done.is_set():
                        pid = min(pids, key=start_time) if args.ready_only else rng.choice(pids)
                        os.kill(pid, signal.SIGKILL)
                        kills.append((time.monotonic() - t0, pid))

            async def watcher() -> None:
                nonlocal none_alive_s, none_alive_seen
                last = time.monotonic()
                while not done.is_set():
                    await asyncio.sleep(0.2)
                    now = time.monotonic()
                    try:
                        status = await client.status(timeout=5)
                    except grpc.aio.AioRpcError:
                        continue
                    if not any(w.alive for w in status.workers):
                        none_alive_seen += 1
                        none_alive_s += now - last
                    last = now

            t0 = time.monotonic()
            side = [asyncio.create_task(killer()), asyncio.create_task(watcher())]
            chaos = await run_streams(client, prompts, sp, "chaos")
            chaos_s = time.monotonic() - t0
            done.set()
            await asyncio.gather(*side, return_exceptions=True)
        failed = [r for r in chaos if isinstance(r, BaseException)]
        differ = [
            i for i, (a, b) in enumerate(zip(calm, chaos)) if not isinstance(b, BaseException) and a != b
        ]
        print(
            f"with kills: {len(chaos) - len(failed) - len(differ)}/{len(chaos)} streams identical to the undisturbed run, {len(failed)} failed, {len(differ)} different; {chaos_s:.1f} s"
        )
        print(f"kills at (s): {', '.join(f'{t:.1f}' for t, _ in kills)}")
        print(f"no live worker: seen in {none_alive_seen} status polls, about {none_alive_s:.1f} s in all")
        for err in failed[:5]:
            print("  failed:", err.code().name, err.details())  # type: ignore[attr-defined]
        if metrics:
            import urllib.request

            text = urllib.request.urlopen(metrics, timeout=10).read().decode()
            for name in ("worker_failures", "worker_losses", "resumes", "retries", "suspected_poison"):
                m = re.search(rf"^mlaserve_{name}_total (\S+)$", text, re.MULTILINE)
                print(f"  mlaserve_{name}_total = {m.group(1) if m else '?'}")
        return 0 if not failed and not differ and len(kills) == args.kills else 1
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kill-every", type=float, default=3.0)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--num-pages", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ready-only",
        action="store_true",
        help="kill only while a worker is live, and the oldest worker process (a ready one, not a "
        "replacement still starting); default: any worker process at random, as an outside killer would",
    )
    sys.exit(asyncio.run(main(parser.parse_args())))
