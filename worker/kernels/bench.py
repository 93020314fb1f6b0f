"""Benchmark of the paged MLA decode kernel: `python -m mlaserve.worker.kernels.bench [--quick]`.

Standard grid: b = 128; s_q in {1, 2}; h_q in {16, 32, 64, 128}; s_k in {4096, 8192, 16384}; fixed
lengths and varlen (each length max(N(s_k, s_k/2), s_q), fixed seed). Each row times the full call
(`flash_mla_with_kvcache`, metadata computed once and reused), median of many calls, rotating
between cache copies that are each larger than the 60 MB L2. Prints µs, GB/s with the fraction of
the device-to-device copy bandwidth, and TFLOP/s with the fraction of the bf16 GEMM rate, both
ceilings measured in the same run; and FlashMLA's time on this H200 where the issue lists it.

bytes = (Σlen·576 + b·s_q·h_q·(576 + 512))·2;  FLOPs = 2·s_q·h_q·Σlen·(576 + 512).
"""

from __future__ import annotations

import argparse
import statistics

import torch

PAGE = 64
D = 576
DV = 512

# FlashMLA on this H200 (µs), from the kernel issue: (s_q, h_q, s_k, mode) -> time
FLASHMLA_US = {
    (1, 16, 4096, "fixed"): 167,
    (1, 16, 16384, "fixed"): 612,
    (1, 64, 4096, "fixed"): 171,
    (1, 64, 4096, "varlen"): 186,
    (1, 64, 16384, "varlen"): 639,
    (1, 128, 8192, "fixed"): 506,
    (2, 32, 4096, "varlen"): 187,
    (2, 128, 16384, "fixed"): 1822,
}


def measure_copy_gbps(nbytes: int = 2 << 30) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    times = _time_calls(lambda i: dst.copy_(src), 20, warmup=3)
    return 2 * nbytes / (statistics.median(times) * 1e-6) / 1e9


def measure_gemm_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    times = _time_calls(lambda i: a @ b, 10, warmup=3)
    return 2 * n**3 / (statistics.median(times) * 1e-6) / 1e12


def _time_calls(fn, iters: int, warmup: int = 5) -> list[float]:
    """Per-call device times in µs (events around each call; the host runs ahead of the GPU)."""
    for i in range(warmup):
        fn(i)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        fn(i)
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]


def lengths_for(s_k: int, s_q: int, mode: str, b: int, seed: int = 0) -> list[int]:
    if mode == "fixed":
        return [s_k] * b
    g = torch.Generator().manual_seed(seed)
    x = torch.normal(float(s_k), s_k / 2, (b,), generator=g)
    return [max(int(v), s_q) for v in x]


class CacheSets:
    """Several independent paged caches (each > L2) with random permuted page tables, rotated per call."""

    def __init__(self, seqlens: list[int], copies: int):
        b = len(seqlens)
        pages = [(n + PAGE - 1) // PAGE for n in seqlens]
        per_set = sum(pages)
        max_pages = max(pages)
        total = per_set * copies
        self.k_cache = torch.empty(total, PAGE, 1, D, dtype=torch.bfloat16, device="cuda").normal_()
        perm = torch.randperm(total, device="cuda").to(torch.int32)
        self.block_tables = []
        cursor = 0
        for _ in range(copies):
            bt = torch.zeros(b, max_pages, dtype=torch.int32, device="cuda")
            for i, n in enumerate(pages):
                bt[i, :n] = perm[cursor : cursor + n]
                cursor += n
            self.block_tables.append(bt)
        self.seqlens = torch.tensor(seqlens, dtype=torch.int32, device="cuda")


def run_row(kernels, cache: CacheSets, s_q: int, h_q: int, iters: int) -> float:
    b = cache.seqlens.shape[0]
    copies = len(cache.block_tables)
    qs = [torch.randn(b, s_q, h_q, D, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
    meta, splits = kernels.get_mla_metadata(cache.seqlens, s_q * h_q, 1)
    outs = [torch.empty(b, s_q, h_q, DV, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
    lses = [torch.empty(b, h_q, s_q, dtype=torch.float32, device="cuda") for _ in range(copies)]

    def call(i):
        j = i % copies
        kernels.flash_mla_with_kvcache(
            qs[j],
            cache.k_cache,
            cache.block_tables[j],
            cache.seqlens,
            DV,
            meta,
            splits,
            causal=True,
            out=outs[j],
            lse=lses[j],
        )

    return statistics.median(_time_calls(call, iters, warmup=6))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the rows with a FlashMLA time")
    ap.add_argument("--s-q", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--h-q", type=int, nargs="*", default=[16, 32, 64, 128])
    ap.add_argument("--s-k", type=int, nargs="*", default=[4096, 8192, 16384])
    ap.add_argument("--mode", nargs="*", default=["fixed", "varlen"], choices=["fixed", "varlen"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args(argv)

    from mlaserve.worker.kernels import sm90

    if not sm90.is_supported():
        raise SystemExit("the sm90 kernels need a Hopper GPU and the compiled extension")
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    copy_gbps = measure_copy_gbps()
    gemm_tf = measure_gemm_tflops()
    print(f"# {dev}: copy {copy_gbps:.0f} GB/s (read+write), bf16 GEMM {gemm_tf:.0f} TFLOP/s (same run)")
    hdr = (
        f"{'s_q':>3} {'h_q':>4} {'s_k':>6} {'mode':>6} {'us':>8} {'GB/s':>7} {'%copy':>6} {'TF/s':>6} "
        f"{'%gemm':>6} {'FlashMLA':>9} {'vs FM':>6}"
    )
    print(hdr)
    rows = []
    for s_k in args.s_k:
        for mode in args.mode:
            wanted = [
                (s_q, h_q)
                for s_q in args.s_q
                for h_q in args.h_q
                if not args.quick or (s_q, h_q, s_k, mode) in FLASHMLA_US
            ]
            if not wanted:
                continue
            lens = lengths_for(s_k, 1 if mode == "fixed" else max(args.s_q), mode, args.batch)
            cache = CacheSets(lens, copies=2)
            total = sum(lens)
            for s_q, h_q in wanted:
                us = run_row(sm90, cache, s_q, h_q, args.iters)
                nbytes = (total * D + args.batch * s_q * h_q * (D + DV)) * 2
                flops = 2 * s_q * h_q * total * (D + DV)
                gbps = nbytes / (us * 1e-6) / 1e9
                tf = flops / (us * 1e-6) / 1e12
                fm = FLASHMLA_US.get((s_q, h_q, s_k, mode))
                line = (
                    f"{s_q:>3} {h_q:>4} {s_k:>6} {mode:>6} {us:>8.1f} {gbps:>7.0f} {100 * gbps / copy_gbps:>5.1f}% "
                    f"{tf:>6.0f} {100 * tf / gemm_tf:>5.1f}% {fm if fm else '':>9} "
                    f"{(f'{fm / us:.2f}x' if fm else ''):>6}"
                )
                print(line, flush=True)
                rows.append(line)
            del cache
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
