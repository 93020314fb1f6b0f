"""Side-by-side benchmark of the paged MLA decode kernel:
`python -m mlaserve.worker.kernels.bench [--grid standard|serving|both] [--against MODULE] [--quick]`

`--against MODULE` imports any module with FlashMLA's Python API (`--against flash_mla` where FlashMLA
is installed; `peer_flashmla` on the H200 machine, see csrc/device_run.sh), in its current form or
its original one (sidebyside.py), and times it beside ours in the same process, on the same buffers.

Grids (h_kv = 1, causal, 64-token pages):
  standard  b = 128; s_q in {1, 2}; h_q in {16, 32, 64, 128}; s_k in {4096, 8192, 16384}; "fixed"
            (every request s_k tokens) and "varlen", FlashMLA's own draws: random.seed(0), then
            max(int(random.normalvariate(s_k, s_k / 2)), s_q) per request. 48 rows (--quick: 8).
  serving   the shapes an engine runs at decode: b in {1, 16, 64, 256}; h_q in {16, 128}; s_q in
            {1, 2}; two context mixes, drawn per request with random.seed(0), all in [256, 4096]:
            "c600" = int(normalvariate(600, 300)) clamped to the range (an engine at ~600-token
            contexts), "u4k" = randint(256, 4096). 32 rows.

Method: one paged cache per row's lengths (pages permuted, NaN in every unused slot and page); each
library computes its split plan once per row (untimed) and reuses it; every call is timed by
`triton.testing.do_bench` (L2 flushed before each call, median; --warmup-ms / --rep-ms), or where
Triton is missing by the same loop with CUDA events; --passes passes (default: one per implementation
timed, at least 2), after one untimed pass that brings the power-capped GPU to its steady clock (the
first call after the correctness checks ran 5-10% faster than any later one), pass p in the order
rotated by p, so that with the default every implementation takes every slot once; each side's best is
the min over passes and peer/ours > 1 means ours is faster.
--graph times each side's call as a CUDA-graph replay (captured once per row, after the untimed call):
the GPU time as an engine's decode-step graph sees it, without either side's Python launch cost.
Before timing, each row checks ours against the peer (out rel. error / lse abs. error, all requests)
and ours and the peer against the float32 reference on the first --ref-requests requests.

Variants of ours (--variants, timed in the same passes; the first is the one the ratio is for):
  ours      the default build and knobs        pdl0     MLASERVE_MLA_PDL=0 (combine not overlapped)
  even / pack / auto   MLASERVE_MLA_SCHED      nosplit  a host plan that splits no request
  solo / trio          MLASERVE_MLA_CONSUMER (consumer schedule forced on every row; each row line
                       names the schedule every variant ran: "sched ours=trio ...")
  NAME:VAR=VAL[,VAR=VAL]  any of sm90.KNOBS
The serving grid times ours, pdl0 and nosplit by default and prints how many requests our plan splits;
--kernel-times adds each kernel's own duration (torch.profiler): with PDL the combine kernel starts
while the main kernel's last CTAs still run and waits for them, so its duration there includes that
wait; its duration with PDL off, and the full call with and without splits, give the real cost.

Printed first: the copy bandwidth and bf16 GEMM rate of the same run (ceilings); per row µs, GB/s and
% of copy, TFLOP/s and % of GEMM, split requests, agreement; last, the compact tables and a summary.
bytes = (Σlen·576 + b·s_q·h_q·(576 + 512))·2;  FLOPs = 2·s_q·h_q·Σlen·(576 + 512).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import signal
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .sidebyside import (
    CURRENT,
    DV,
    ORIGINAL,
    SERVING_MIXES,
    Agreement,
    Impl,
    agreement,
    api_form,
    build_cache,
    flashmla_varlen,
    knob_env,
    serving_lengths,
    split_requests,
)

D = 576
FLOPS_PER_KEY_ROW = 2 * (D + DV)

STANDARD_S_Q, STANDARD_H_Q, STANDARD_S_K = (1, 2), (16, 32, 64, 128), (4096, 8192, 16384)
QUICK_ROWS = {  # (s_q, h_q, s_k, mode): one or two rows of each regime
    (1, 16, 4096, "fixed"),
    (1, 16, 16384, "fixed"),
    (1, 64, 4096, "fixed"),
    (1, 64, 4096, "varlen"),
    (1, 64, 16384, "varlen"),
    (1, 128, 8192, "fixed"),
    (2, 32, 4096, "varlen"),
    (2, 128, 16384, "fixed"),
}
SERVING_B, SERVING_H_Q, SERVING_S_Q = (1, 16, 64, 256), (16, 128), (1, 2)
FLUSH_BYTES = 256 << 20  # what triton.testing.do_bench zeroes before each call

BUILTIN_VARIANTS: dict[str, tuple[dict[str, str], str | None]] = {
    "ours": ({}, None),
    "pdl0": ({"MLASERVE_MLA_PDL": "0"}, None),
    "even": ({"MLASERVE_MLA_SCHED": "even"}, None),
    "pack": ({"MLASERVE_MLA_SCHED": "pack"}, None),
    "auto": ({"MLASERVE_MLA_SCHED": "auto"}, None),
    "nosplit": ({}, "nosplit"),
    "solo": ({"MLASERVE_MLA_CONSUMER": "solo"}, None),
    "trio": ({"MLASERVE_MLA_CONSUMER": "trio"}, None),
}


# ---- rows -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    grid: str  # "standard" | "serving"
    s_q: int
    h_q: int
    ctx: str  # "4096 fixed", "8192 varlen", "c600", "u4k"
    lengths: tuple[int, ...]

    @property
    def b(self) -> int:
        return len(self.lengths)

    @property
    def compute_bound(self) -> bool:  # rows per KV head: <= 64 fill one padded tile, >= 128 two
        return self.s_q * self.h_q > 64

    @property
    def nbytes(self) -> int:
        return (sum(self.lengths) * D + self.b * self.s_q * self.h_q * (D + DV)) * 2

    @property
    def flops(self) -> int:
        return self.s_q * self.h_q * sum(self.lengths) * FLOPS_PER_KEY_ROW

    def label(self) -> str:
        return f"b={self.b} s_q={self.s_q} h_q={self.h_q} {self.ctx}"


def standard_rows(
    s_qs=STANDARD_S_Q,
    h_qs=STANDARD_H_Q,
    s_ks=STANDARD_S_K,
    modes=("fixed", "varlen"),
    b: int = 128,
    quick: bool = False,
) -> list[Row]:
    rows = []
    for s_k in s_ks:
        for mode in modes:
            for s_q in s_qs:
                lengths = tuple([s_k] * b if mode == "fixed" else flashmla_varlen(s_k, s_q, b))
                for h_q in h_qs:
                    if not quick or (s_q, h_q, s_k, mode) in QUICK_ROWS:
                        rows.append(Row("standard", s_q, h_q, f"{s_k} {mode}", lengths))
    return rows


def serving_rows(bs=SERVING_B, h_qs=SERVING_H_Q, s_qs=SERVING_S_Q, mixes=SERVING_MIXES) -> list[Row]:
    return [
        Row("serving", s_q, h_q, mix, tuple(serving_lengths(mix, b)))
        for mix in mixes
        for b in bs
        for s_q in s_qs
        for h_q in h_qs
    ]


# ---- timing ---------------------------------------------------------------------------------------
class Timer:
    """Median device time (µs) of fn() with L2 flushed before every call: triton.testing.do_bench, or the
    same loop with CUDA events where Triton is missing."""

    def __init__(self, warmup_ms: float, rep_ms: float, use_triton: bool = True):
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self._do_bench = None
        if use_triton:
            try:
                from triton.testing import do_bench

                self._do_bench = do_bench
            except ImportError:
                pass
        self._flush: torch.Tensor | None = None
        how = "triton.testing.do_bench" if self._do_bench else "CUDA events (Triton is missing)"
        self.method = (
            f"{how}, L2 flushed before every call, median, warmup {warmup_ms:g} ms / rep {rep_ms:g} ms"
        )

    def flush_buffer(self) -> torch.Tensor:
        if self._flush is None:
            self._flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
        return self._flush

    def __call__(self, fn: Callable[[], object]) -> float:
        if self._do_bench is not None:
            return 1e3 * float(
                self._do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median")
            )
        flush = self.flush_buffer()
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            flush.zero_()
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
        for _ in range(max(1, int(self.warmup_ms / estimate_ms))):
            fn()
        n = max(1, int(self.rep_ms / estimate_ms))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return 1e3 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def copy_gbps(timer: Timer, nbytes: int = 2 << 30) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    us = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (us * 1e-6) / 1e9


def gemm_tflops(timer: Timer, n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    c = torch.empty(n, n, dtype=torch.bfloat16, device="cuda")
    us = timer(lambda: torch.matmul(a, b, out=c))
    return 2 * n**3 / (us * 1e-6) / 1e12


def kernel_times(call: Callable[[], object], flush: torch.Tensor, calls: int = 10) -> dict[str, float] | None:
    """Each kernel's own duration per call (µs, torch.profiler / CUPTI), L2 flushed before each call:
    {"main": ..., "combine": ...} (the combine is the kernel named so; main the longest other one)."""
    try:
        from torch.profiler import ProfilerActivity, profile

        call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                flush.zero_()
                call()
            torch.cuda.synchronize()
        per_call: dict[str, float] = {}
        for avg in prof.key_averages():
            total = getattr(avg, "device_time_total", None)
            if total is None:
                total = getattr(avg, "cuda_time_total", 0.0)
            name = avg.key
            if not total or any(s in name for s in ("FillFunctor", "elementwise", "emset", "Memcpy")):
                continue
            per_call[name] = per_call.get(name, 0.0) + float(total) / calls
    except Exception as e:  # noqa: BLE001 - a profiler failure must not end the run
        print(f"# kernel times unavailable: {type(e).__name__}: {e}", flush=True)
        return None
    out = {"combine": sum(t for n, t in per_call.items() if "combine" in n.lower())}
    rest = {n: t for n, t in per_call.items() if "combine" not in n.lower()}
    out["main"] = max(rest.values(), default=0.0)
    return out


# ---- one row --------------------------------------------------------------------------------------
@dataclass
class RowResult:
    row: Row
    times: dict[str, list[float]] = field(default_factory=dict)  # impl -> µs per pass
    split: int | None = None  # requests our plan splits
    checks: dict[str, Agreement] = field(default_factory=dict)
    kernels: dict[str, dict[str, float] | None] = field(default_factory=dict)
    schedules: dict[str, str] = field(default_factory=dict)  # variant of ours -> consumer schedule it ran

    def best(self, name: str) -> float:
        return min(self.times[name])

    def ok(self) -> bool:
        return all(a.ok for a in self.checks.values())

    def bad(self) -> list[str]:
        return [f"{k} {a}" for k, a in self.checks.items() if not a.ok]


def poisoned_call(call: Callable[[], tuple[torch.Tensor, torch.Tensor]], q: torch.Tensor):
    """call(), right after NaN-filled blocks of the output's and the LSE's sizes were freed, so that the
    caching allocator most likely hands them out again: an element the call does not write stays NaN
    (best effort; test_sm90's preallocated-output test checks ours exactly)."""
    b, s_q, h_q, _ = q.shape
    poison = (
        torch.full((b, s_q, h_q, DV), float("nan"), dtype=q.dtype, device=q.device),
        torch.full((b, h_q, s_q), float("nan"), dtype=torch.float32, device=q.device),
    )
    del poison
    return call()


def graph_replay(call: Callable[[], object], name: str) -> Callable[[], object]:
    """`call` captured into a CUDA graph (as an engine runs a decode step): the replay runs the same
    kernels on the same buffers without the host-side launch cost. Raises naming the implementation when
    its call cannot be captured (e.g. it synchronizes with the host)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            call()
    except RuntimeError as e:
        raise RuntimeError(f"{name}: its call cannot be captured in a CUDA graph ({e})") from e
    return g.replay


def measure_row(
    row: Row,
    cache,
    ours: Sequence[Impl],
    peer: Impl | None,
    timer: Callable[[Callable[[], object]], float],
    passes: int,
    ref_requests: int,
    with_kernel_times: bool,
    seed: int = 0,
    graph: bool = False,
) -> RowResult:
    from . import reference

    res = RowResult(row)
    device = cache.k_cache.device
    gen = torch.Generator(device=device).manual_seed(seed + 1000 * row.s_q + row.h_q)
    q = torch.randn(row.b, row.s_q, row.h_q, D, generator=gen, device=device, dtype=torch.bfloat16)
    impls = [*ours, *([peer] if peer else [])]
    calls = {}
    for impl in impls:
        calls[impl.name], splits = impl.prepare(cache, q)
        if impl is ours[0]:
            res.split = split_requests(splits)
    for impl in ours:  # the consumer schedule each variant runs, as the launcher picks it (sm90 only)
        schedule_for = getattr(impl.module, "schedule_for", None)
        if schedule_for is not None:
            with knob_env(impl.env):
                res.schedules[impl.name] = schedule_for(row.s_q, row.h_q, cache.k_cache.shape[2])
    # correctness first (untimed): every implementation against the peer and the float32 reference
    outs = {}
    for impl in impls:
        with knob_env(impl.env):
            outs[impl.name] = poisoned_call(calls[impl.name], q)
    k = min(ref_requests, row.b)
    if k:
        ref_out, ref_lse = reference.flash_mla_with_kvcache(
            q[:k], cache.k_cache, cache.block_table[:k], cache.seqlens[:k], DV, causal=True
        )
        for impl in impls:
            o, lse = outs[impl.name]
            res.checks[f"{impl.name}~ref"] = agreement(o[:k], lse[:k], ref_out, ref_lse)
    if peer:
        for impl in ours:
            res.checks[f"{impl.name}~{peer.name}"] = agreement(*outs[impl.name], *outs[peer.name])
    del outs
    timed = {impl.name: calls[impl.name] for impl in impls}
    if graph:  # each side's call captured once (after the untimed call above) and timed as a graph replay
        for impl in impls:
            with knob_env(impl.env):
                timed[impl.name] = graph_replay(calls[impl.name], impl.name)
    # One untimed pass first: after the (light) correctness phase the power-capped GPU runs at a higher clock
    # for a while, and the first timed call of a row measured 5-10% faster than every later one (the same
    # kernel, H200, 2026-12-02) -- a bonus that went to whichever implementation came first.
    for impl in impls:
        with knob_env(impl.env):
            timer(timed[impl.name])
    # timing: pass p in the order rotated by p (every implementation in every slot over len(impls) passes)
    for p in range(passes):
        k = p % len(impls)
        for impl in impls[k:] + impls[:k]:
            with knob_env(impl.env):
                res.times.setdefault(impl.name, []).append(timer(timed[impl.name]))
    if with_kernel_times:
        flush = timer.flush_buffer()
        first = ours[0]
        with knob_env(first.env):
            res.kernels[first.name] = kernel_times(calls[first.name], flush)
        with knob_env({**first.env, "MLASERVE_MLA_PDL": "0"}):
            res.kernels[f"{first.name} PDL off"] = kernel_times(calls[first.name], flush)
        if peer:
            res.kernels[peer.name] = kernel_times(calls[peer.name], flush)
    return res


# ---- output ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ceilings:
    copy_gbps: float
    gemm_tflops: float

    def roof(self, row: Row, us: float) -> str:
        """% of the same-run ceiling that bounds the row: GEMM for compute-bound rows, else copy."""
        if row.compute_bound:
            return f"{100 * row.flops / (us * 1e-6) / 1e12 / self.gemm_tflops:.1f}% gemm"
        return f"{100 * row.nbytes / (us * 1e-6) / 1e9 / self.copy_gbps:.1f}% copy"


def row_line(r: RowResult, ceil: Ceilings, names: Sequence[str], peer: str | None) -> str:
    row, first = r.row, names[0]
    us = r.best(first)
    gbps, tf = row.nbytes / (us * 1e-6) / 1e9, row.flops / (us * 1e-6) / 1e12
    parts = [f"{row.b:>4} {row.s_q:>3} {row.h_q:>4} {row.ctx:>12} | {first} {us:8.1f}"]
    if peer:
        pu = r.best(peer)
        parts.append(f"{peer} {pu:8.1f} {pu / us:5.2f}x")
    parts += [f"{n} {r.best(n):8.1f}" for n in names[1:]]
    parts.append(
        f"| {gbps:5.0f} GB/s {100 * gbps / ceil.copy_gbps:5.1f}% copy {tf:4.0f} TF {100 * tf / ceil.gemm_tflops:5.1f}% gemm"
    )
    parts.append(f"| split {r.split if r.split is not None else '-'}/{row.b}")
    if r.schedules:
        parts.append("| sched " + " ".join(f"{n}={s}" for n, s in r.schedules.items()))
    parts.append("| " + " ".join(f"{k} {a}" for k, a in r.checks.items()))
    for name, kt in r.kernels.items():
        if kt:
            parts.append(f"| {name}: main {kt['main']:.1f} combine {kt['combine']:.1f}")
    parts.append("OK" if r.ok() else "BAD")
    return " ".join(parts)


def final_table(
    results: Sequence[RowResult], ceil: Ceilings, names: Sequence[str], peer: str | None
) -> list[str]:
    if not results:
        return []
    first = names[0]
    serving = results[0].row.grid == "serving"
    head = ["b", "s_q", "h_q", "lengths", f"{first} µs"]
    if peer:
        head += [f"{peer} µs", f"{peer}/{first}"]
    head += [f"{n} µs" for n in names[1:]]
    head += [f"{first} roofline"] + ([f"{peer} roofline"] if peer else []) + ["split"]
    kt_names = list(results[0].kernels) if serving else []
    head += [f"{k}: main / combine µs" for k in kt_names]
    head += ["check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row, us = r.row, r.best(first)
        cells = [str(row.b), str(row.s_q), str(row.h_q), row.ctx, f"{us:.1f}"]
        if peer:
            cells += [f"{r.best(peer):.1f}", f"{r.best(peer) / us:.2f}"]
        cells += [f"{r.best(n):.1f}" for n in names[1:]]
        cells += [ceil.roof(row, us)] + ([ceil.roof(row, r.best(peer))] if peer else [])
        cells += [f"{r.split}/{row.b}" if r.split is not None else "-"]
        for k in kt_names:
            kt = r.kernels.get(k)
            cells.append(f"{kt['main']:.1f} / {kt['combine']:.1f}" if kt else "n/a")
        cells.append("ok" if r.ok() else "BAD: " + "; ".join(r.bad()))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ratio_summary(label: str, results: Sequence[RowResult], first: str, peer: str, bar: float) -> str:
    ratios = [r.best(peer) / r.best(first) for r in results]
    if not ratios:
        return f"{label}: no rows"
    geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    below = [r.row for r in results if r.best(peer) / r.best(first) < 1.0]
    worst = min(results, key=lambda r: r.best(peer) / r.best(first))
    return (
        f"{label}: {len(ratios)} rows, {peer}/{first} {min(ratios):.2f}-{max(ratios):.2f}, geomean {geo:.2f}, "
        f"{sum(x >= 1.0 for x in ratios)} >= 1.00{f', {sum(x >= bar for x in ratios)} >= {bar:.2f}' if bar != 1.0 else ''}; "
        f"{len(below)} below 1.00 (worst {worst.row.label()} {worst.best(peer) / worst.best(first):.2f})"
    )


def summary(results: Sequence[RowResult], first: str, peer: str | None) -> list[str]:
    out = []
    if peer and results:
        if results[0].row.grid == "standard":
            out.append(
                ratio_summary(
                    "memory-bound rows (s_q*h_q <= 64)",
                    [r for r in results if not r.row.compute_bound],
                    first,
                    peer,
                    1.00,
                )
            )
            out.append(
                ratio_summary(
                    "compute-bound rows (s_q*h_q >= 128)",
                    [r for r in results if r.row.compute_bound],
                    first,
                    peer,
                    1.05,
                )
            )
        else:
            out.append(ratio_summary("serving rows", results, first, peer, 1.00))
    bad = [r for r in results if not r.ok()]
    out.append(
        "checks: every row agrees (out rel <= 1e-2, lse abs <= 1e-3)"
        if not bad
        else "checks: DISAGREEMENT in " + "; ".join(f"{r.row.label()}: {', '.join(r.bad())}" for r in bad)
    )
    return out


# ---- command line ---------------------------------------------------------------------------------
def passes_for(requested: int | None, implementations: int) -> int:
    """Timing passes: as requested, else one per implementation (so each takes every slot), at least 2."""
    return requested if requested is not None else max(2, implementations)


def parse_variant(spec: str, knobs: Sequence[str]) -> tuple[str, dict[str, str], str | None]:
    """'ours' / 'pdl0' / 'even' / 'pack' / 'auto' / 'nosplit', or 'NAME:VAR=VAL[,VAR=VAL]' with VAR a knob
    that the ours module reads (anything else would be silently ignored, so it is a ValueError)."""
    if ":" in spec:
        name, rest = spec.split(":", 1)
        env = {}
        for item in filter(None, rest.split(",")):
            if "=" not in item:
                raise ValueError(f"variant {spec!r}: {item!r} is not VAR=VALUE")
            var, val = item.split("=", 1)
            if var not in knobs:
                raise ValueError(f"variant {spec!r}: {var} is not a kernel knob (known: {', '.join(knobs)})")
            env[var] = val
        if not name:
            raise ValueError(f"variant {spec!r} has no name")
        return name, env, None
    if spec not in BUILTIN_VARIANTS:
        raise ValueError(
            f"unknown variant {spec!r}: expected one of {', '.join(BUILTIN_VARIANTS)} or NAME:VAR=VAL"
        )
    env, plan = BUILTIN_VARIANTS[spec]
    return spec, dict(env), plan


def load_peer(name: str) -> Impl:
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise SystemExit(f"--against {name}: cannot import it ({e})") from e
    try:
        form = api_form(module)
    except ValueError as e:
        raise SystemExit(f"--against {name}: {e}") from e
    return Impl(name="peer", module=module, form=form)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_grids(plans, peer: Impl | None, timer: Timer, ceil: Ceilings, args, done: list) -> None:
    """Measures every row of every grid and prints each as it is done; (grid, ours, results) are put in
    `done` before their rows are measured, so an interruption keeps the rows measured so far."""
    for grid, ours, rows in plans:
        names = [o.name for o in ours]
        print(
            f"## {grid} grid: b s_q h_q lengths | µs ({', '.join(names)}{', ' + peer.name if peer else ''}) | "
            "ours roofline | split requests | agreement out-rel/lse-abs",
            flush=True,
        )
        results: list[RowResult] = []
        done.append((grid, ours, results))
        cache, key = None, None
        for row in rows:
            if row.lengths != key:
                del cache
                torch.cuda.empty_cache()
                cache, key = build_cache(list(row.lengths)), row.lengths
            r = measure_row(
                row,
                cache,
                ours,
                peer,
                timer,
                passes_for(args.passes, len(ours) + bool(peer)),
                args.ref_requests,
                args.kernel_times and grid == "serving",
                graph=args.graph,
            )
            results.append(r)
            print(row_line(r, ceil, names, peer.name if peer else None), flush=True)
        del cache
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", choices=["standard", "serving", "both"], default="standard")
    ap.add_argument("--against", metavar="MODULE", help="a module with FlashMLA's API to time beside ours")
    ap.add_argument(
        "--variants", nargs="+", metavar="V", help="variants of ours (see above; first = ratio's)"
    )
    ap.add_argument("--quick", action="store_true", help="standard grid: 8 rows, one or two of each regime")
    ap.add_argument("--s-q", type=int, nargs="+", default=list(STANDARD_S_Q), help="standard grid filter")
    ap.add_argument("--h-q", type=int, nargs="+", default=list(STANDARD_H_Q), help="standard grid filter")
    ap.add_argument("--s-k", type=int, nargs="+", default=list(STANDARD_S_K), help="standard grid filter")
    ap.add_argument("--mode", nargs="+", default=["fixed", "varlen"], choices=["fixed", "varlen"])
    ap.add_argument("--batch", type=int, default=128, help="standard grid batch")
    ap.add_argument(
        "--passes",
        type=int,
        default=None,
        help="timing passes, each in a rotated order (>= 1; default: one per implementation, at least 2)",
    )
    ap.add_argument("--warmup-ms", type=float, default=10.0)
    ap.add_argument("--rep-ms", type=float, default=50.0)
    ap.add_argument("--ref-requests", type=int, default=2, help="requests checked against the fp32 reference")
    ap.add_argument(
        "--kernel-times", action="store_true", help="serving grid: per-kernel durations (profiler)"
    )
    ap.add_argument(
        "--no-triton", action="store_true", help="time with the CUDA-event loop even if Triton is there"
    )
    ap.add_argument(
        "--graph",
        action="store_true",
        help="time each side's call as a CUDA-graph replay (no host launch cost, as the engine runs it)",
    )
    ap.add_argument("--json", metavar="PATH", help="write every row's numbers here")
    args = ap.parse_args(argv)
    if args.passes is not None and args.passes < 1:
        ap.error("--passes must be >= 1")

    from . import sm90

    peer = load_peer(args.against) if args.against else None
    grids = ["standard", "serving"] if args.grid == "both" else [args.grid]
    plans = []
    for grid in grids:
        specs = args.variants or (["ours"] if grid == "standard" else ["ours", "pdl0", "nosplit"])
        try:
            ours = [
                Impl(name, sm90, ORIGINAL, env, plan)
                for name, env, plan in (parse_variant(s, sm90.KNOBS) for s in specs)
            ]
        except ValueError as e:
            ap.error(str(e))
        names = [o.name for o in ours] + ([peer.name] if peer else [])
        if len(set(names)) < len(names):
            ap.error(f"variant names must be distinct (and not 'peer'): {', '.join(names)}")
        rows = (
            standard_rows(args.s_q, args.h_q, args.s_k, args.mode, args.batch, args.quick)
            if grid == "standard"
            else serving_rows()
        )
        plans.append((grid, ours, rows))
    if not sm90.is_supported():
        raise SystemExit("the sm90 kernels need a Hopper GPU and the compiled extension")

    torch.manual_seed(0)
    timer = Timer(args.warmup_ms, args.rep_ms, use_triton=not args.no_triton)
    ceil = Ceilings(copy_gbps(timer), gemm_tflops(timer))
    print(
        f"# {torch.cuda.get_device_name()}: copy {ceil.copy_gbps:.0f} GB/s (read+write), "
        f"bf16 GEMM {ceil.gemm_tflops:.0f} TFLOP/s (same run)"
    )
    passes = args.passes or "one per implementation (>= 2)"
    how = "CUDA-graph replays" if args.graph else "eager calls (host launch included)"
    print(f"# timer: {timer.method}; {how}; {passes} passes, each in a rotated order, best of passes")
    if peer:
        print(
            f"# peer = {args.against} ({peer.form} API form{', metadata filled by its first call' if peer.form == CURRENT else ''})"
        )
    measurements = sum(
        len(rows) * (len(ours) + bool(peer)) * passes_for(args.passes, len(ours) + bool(peer))
        for _, ours, rows in plans
    )
    print(
        f"# {measurements} timed measurements, about {measurements * (args.warmup_ms + args.rep_ms + 15) / 1e3:.0f} s "
        "of timing",
        flush=True,
    )

    done: list[tuple[str, list[Impl], list[RowResult]]] = []
    # a timeout's SIGTERM ends the run early but still prints the tables of the rows measured so far
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_grids(plans, peer, timer, ceil, args, done)
    except KeyboardInterrupt:
        print("# INTERRUPTED: the tables below hold only the rows measured so far", flush=True)

    print()
    print(
        f"# copy {ceil.copy_gbps:.0f} GB/s, bf16 GEMM {ceil.gemm_tflops:.0f} TFLOP/s (same run); {timer.method}"
    )
    for grid, ours, results in done:
        names = [o.name for o in ours]
        print(f"\n### {grid} grid ({len(results)} rows{f'; peer = {args.against}' if peer else ''})")
        print("\n".join(final_table(results, ceil, names, peer.name if peer else None)))
        print("\n".join(summary(results, names[0], peer.name if peer else None)), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(),
                    "ceilings": asdict(ceil),
                    "timer": timer.method,
                    "peer": args.against,
                    "rows": [
                        {
                            **{k: v for k, v in asdict(r.row).items() if k != "lengths"},
                            "b": r.row.b,
                            "sum_lengths": sum(r.row.lengths),
                            "us": r.times,
                            "split": r.split,
                            "checks": {k: [a.out_rel, a.lse_abs] for k, a in r.checks.items()},
                            "kernels": r.kernels,
                            "schedules": r.schedules,
                        }
                        for _, _, results in done
                        for r in results
                    ],
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
