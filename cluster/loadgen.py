"""A gRPC load generator for `mlaserve bench serve`: pure asyncio over `DecoderClient`.

    cfg = LoadConfig(requests=200, concurrency=32, prompt_len=512, max_tokens=128)
    async with DecoderClient("127.0.0.1:50051") as client:  # tls=ClientTLSConfig(...) for a TLS gateway
        result = await run_load(client, cfg)
    print(format_result(result, bound_tokens_per_s=None))

Every request is greedy with ignore_eos, so it generates exactly its max_tokens. Prompts are random
token ids in [0, 256) (every model's vocabulary holds those). At most `concurrency` requests are in
flight; each is streamed and timed. Failures are counted by gRPC status code and never stop the run.
GetClusterStatus is polled in the background to record each worker's peak cache occupancy.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import grpc

from mlaserve.cluster.client import DecoderClient
from mlaserve.worker.types import FinishReason, SamplingParams

TOKEN_ID_LIMIT = 256  # prompts use ids in [0, 256): the tiny, byte-level and real vocabularies hold them
VARLEN_SIGMA = 1.0  # log-normal spread of --varlen lengths
VARLEN_CAP = 8  # --varlen lengths are capped at this many times the mean


@dataclass(frozen=True)
class LoadConfig:
    requests: int = 100
    concurrency: int = 16
    prompt_len: int = 128  # mean prompt tokens (0 still sends one token)
    max_tokens: int = 64  # mean tokens to generate
    seed: int = 0
    varlen: bool = False  # long-tailed (log-normal) lengths instead of fixed ones
    timeout_s: float | None = None  # deadline of each request
    status_interval_s: float = 0.5  # how often GetClusterStatus is polled during the run

    def __post_init__(self) -> None:
        for name, low in (("requests", 1), ("concurrency", 1), ("prompt_len", 0), ("max_tokens", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if not self.status_interval_s > 0:
            raise ValueError(f"status_interval_s must be > 0, got {self.status_interval_s!r}")


def _lengths(rng: random.Random, mean: int, n: int, varlen: bool) -> list[int]:
    if not varlen or mean <= 1:
        return [max(1, mean)] * n
    mu = math.log(mean) - VARLEN_SIGMA**2 / 2  # E[lognormal(mu, sigma)] == mean
    return [min(VARLEN_CAP * mean, max(1, round(rng.lognormvariate(mu, VARLEN_SIGMA)))) for _ in range(n)]


def make_workload(cfg: LoadConfig) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens) per request, reproducible from cfg.seed."""
    rng = random.Random(cfg.seed)
    prompt_lens = _lengths(rng, cfg.prompt_len, cfg.requests, cfg.varlen)
    out_lens = _lengths(rng, cfg.max_tokens, cfg.requests, cfg.varlen)
    return [([rng.randrange(TOKEN_ID_LIMIT) for _ in range(p)], m) for p, m in zip(prompt_lens, out_lens)]


@dataclass
class RequestRecord:
    """What one request did, in seconds since the run started."""

    start: float
    end: float = math.nan
    first_token: float | None = None
    token_gaps: list[float] = field(
        default_factory=list
    )  # inter-token latency of tokens after the first chunk
    prompt_tokens: int = 0
    output_tokens: int = 0
    worker_id: str = ""
    error: str | None = None  # gRPC status code name, or why the stream was not a full answer


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default); NaN if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def rate(count: float, seconds: float) -> float:
    """count / seconds, 0 for an empty interval."""
    return count / seconds if seconds > 0 else 0.0


@dataclass(frozen=True)
class WorkerRow:
    worker_id: str
    device: str
    peak_occupancy: float  # highest used/total pages seen while polling
    tokens_per_s: float  # output tokens streamed from this worker / wall time


@dataclass(frozen=True)
class LoadResult:
    requests: int
    completed: int
    errors: dict[str, int]  # status code name -> count
    wall_s: float
    prompt_tokens: int  # of requests that produced at least one token
    output_tokens: int
    output_tokens_per_s: float
    total_tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float
    latency_p50_s: float
    latency_p99_s: float
    workers: tuple[WorkerRow, ...] = ()
    failed_status_polls: int = 0  # GetClusterStatus polls that failed (peak occupancy may be low)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(
    records: Sequence[RequestRecord],
    wall_s: float,
    workers: Sequence[WorkerRow] = (),
    failed_status_polls: int = 0,
) -> LoadResult:
    """The run's figures from its per-request records."""
    done = [r for r in records if r.error is None]
    started = [r for r in records if r.output_tokens > 0]
    prompt = sum(r.prompt_tokens for r in started)
    output = sum(r.output_tokens for r in records)
    ttft = [r.first_token - r.start for r in records if r.first_token is not None]
    itl = [g for r in records for g in r.token_gaps]
    latency = [r.end - r.start for r in done]
    return LoadResult(
        requests=len(records),
        completed=len(done),
        errors=dict(sorted(Counter(r.error for r in records if r.error is not None).items())),
        wall_s=wall_s,
        prompt_tokens=prompt,
        output_tokens=output,
        output_tokens_per_s=rate(output, wall_s),
        total_tokens_per_s=rate(prompt + output, wall_s),
        ttft_p50_s=percentile(ttft, 50),
        ttft_p99_s=percentile(ttft, 99),
        itl_p50_s=percentile(itl, 50),
        itl_p99_s=percentile(itl, 99),
        latency_p50_s=percentile(latency, 50),
        latency_p99_s=percentile(latency, 99),
        workers=tuple(workers),
        failed_status_polls=failed_status_polls,
    )


async def _one(
    client: DecoderClient,
    prompt: list[int],
    max_tokens: int,
    timeout_s: float | None,
    rec: RequestRecord,
    t0: float,
) -> None:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    reason: FinishReason | None = None
    last = rec.start
    try:
        async for chunk in client.stream(prompt, sampling=sampling, timeout=timeout_s):
            now = time.perf_counter() - t0
            n = len(chunk.delta.token_ids)
            if n:
                if rec.first_token is None:
                    rec.first_token = now  # the first chunk's wait is TTFT, not inter-token latency
                else:
                    rec.token_gaps.extend([(now - last) / n] * n)  # a chunk's gap spread over its tokens
                last = now
                rec.output_tokens += n
            rec.worker_id = chunk.worker_id or rec.worker_id
            if chunk.delta.usage is not None:
                rec.prompt_tokens = chunk.delta.usage.prompt_tokens
            reason = chunk.delta.finish_reason or reason
    except grpc.aio.AioRpcError as e:
        rec.error = e.code().name
    except Exception as e:  # noqa: BLE001 - a load generator counts every failure and carries on
        rec.error = type(e).__name__
    else:
        if reason is None:
            rec.error = "NO_FINISH_REASON"
        elif reason is FinishReason.ABORT:
            rec.error = "ABORTED"
    if rec.output_tokens and not rec.prompt_tokens:
        rec.prompt_tokens = len(prompt)
    rec.end = time.perf_counter() - t0


class _StatusPoller:
    """Polls GetClusterStatus; keeps each worker's device and peak occupancy (poll errors are skipped)."""

    def __init__(self, client: DecoderClient, interval_s: float):
        self.client, self.interval_s = client, interval_s
        self.peak: dict[str, float] = {}
        self.device: dict[str, str] = {}
        self.failed_polls = 0

    async def poll_once(self) -> None:
        try:
            status = await self.client.status(timeout=max(self.interval_s * 4, 2.0))
        except Exception:  # noqa: BLE001 - a missed poll only makes the peak less complete
            self.failed_polls += 1
            return
        for w in status.workers:
            self.device[w.worker_id] = w.device
            self.peak[w.worker_id] = max(self.peak.get(w.worker_id, 0.0), float(w.occupancy))

    async def loop(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.interval_s)


async def run_load(client: DecoderClient, cfg: LoadConfig) -> LoadResult:
    """Send cfg.requests streamed requests, at most cfg.concurrency at a time, and measure them."""
    workload = make_workload(cfg)
    records: list[RequestRecord] = []
    poller = _StatusPoller(client, cfg.status_interval_s)
    poll_task = asyncio.create_task(poller.loop())
    pending = iter(workload)
    t0 = time.perf_counter()

    async def lane() -> None:
        for prompt, max_tokens in pending:  # the shared iterator hands each request to one lane
            rec = RequestRecord(start=time.perf_counter() - t0)
            records.append(rec)
            await _one(client, prompt, max_tokens, cfg.timeout_s, rec, t0)

    try:
        await asyncio.gather(*(lane() for _ in range(min(cfg.concurrency, cfg.requests))))
        wall = time.perf_counter() - t0
    finally:
        poll_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poll_task
    await poller.poll_once()  # the final state, so workers that came up late are listed too
    per_worker: Counter[str] = Counter()
    for r in records:
        per_worker[r.worker_id] += r.output_tokens
    ids = list(poller.device) + sorted(w for w in per_worker if w and w not in poller.device)
    rows = [
        WorkerRow(w, poller.device.get(w, "?"), poller.peak.get(w, math.nan), rate(per_worker[w], wall))
        for w in ids
    ]
    return summarize(records, wall, rows, poller.failed_polls)


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{1000 * seconds:.1f}"


def format_result(result: LoadResult, bound_tokens_per_s: float | None = None) -> str:
    """Markdown: the run's summary table, per-worker rows, and the roofline fraction if a bound is given."""
    errors = ", ".join(f"{k} {v}" for k, v in result.errors.items())
    rows = [
        ("requests", str(result.requests)),
        ("completed", str(result.completed)),
        ("errors", f"{sum(result.errors.values())}" + (f" ({errors})" if errors else "")),
        ("wall time (s)", f"{result.wall_s:.2f}"),
        ("output tokens/s", f"{result.output_tokens_per_s:.1f}"),
        ("total tokens/s (prompt+output)", f"{result.total_tokens_per_s:.1f}"),
        ("TTFT p50 / p99 (ms)", f"{_ms(result.ttft_p50_s)} / {_ms(result.ttft_p99_s)}"),
        ("inter-token latency p50 / p99 (ms)", f"{_ms(result.itl_p50_s)} / {_ms(result.itl_p99_s)}"),
        ("request latency p50 / p99 (ms)", f"{_ms(result.latency_p50_s)} / {_ms(result.latency_p99_s)}"),
    ]
    if bound_tokens_per_s is not None:
        frac = rate(result.output_tokens_per_s, bound_tokens_per_s)
        rows.append(("output tokens/s vs bound", f"{100 * frac:.1f}% of {bound_tokens_per_s:.1f}"))
    lines = ["| metric | value |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows)]
    if result.workers:
        lines += ["", "| worker | device | peak occupancy | output tokens/s |", "|---|---|---:|---:|"]
        for w in result.workers:
            occ = "-" if math.isnan(w.peak_occupancy) else f"{100 * w.peak_occupancy:.1f}%"
            lines.append(f"| {w.worker_id} | {w.device} | {occ} | {w.tokens_per_s:.1f} |")
    if result.failed_status_polls:
        lines.append(f"\n({result.failed_status_polls} GetClusterStatus polls failed: peaks may be low)")
    return "\n".join(lines)
