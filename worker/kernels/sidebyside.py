"""The pieces of the side-by-side kernel bench that need no timing: request lengths, the paged test
cache, adapters for both forms of FlashMLA's Python API, a no-split plan, and the agreement checks.

Any module with FlashMLA's API can be compared with ours (bench.py `--against MODULE`). Two forms:

  current:  meta, _ = get_mla_metadata()          # an empty object, filled by the first call
            out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                              meta, None, causal=...)
  original: meta, splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)   # tensors
            out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                              meta, splits, causal=...)

`api_form` tells them apart from the signature of get_mla_metadata, and where that is not conclusive
(a bare *args, as in FlashMLA's current API) from what a call without arguments returns.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType

import torch

PAGE = 64
D = 576
DV = 512

CURRENT = "current"
ORIGINAL = "original"


# ---- request lengths ------------------------------------------------------------------------------
def flashmla_varlen(s_k: int, s_q: int, b: int, seed: int = 0) -> list[int]:
    """FlashMLA's own varlen draws: random.seed(seed), then max(int(normalvariate(s_k, s_k/2)), s_q) per
    request (a private Random seeded the same way gives the same stream and leaves the global one alone)."""
    rng = random.Random(seed)
    return [max(int(rng.normalvariate(s_k, s_k / 2)), s_q) for _ in range(b)]


SERVING_MIXES = ("c600", "u4k")
SERVING_MIN, SERVING_MAX = 256, 4096


def serving_lengths(mix: str, b: int, seed: int = 0) -> list[int]:
    """Context lengths of the serving grid, drawn per request with Random(seed), all in [256, 4096]:
    c600 = int(normalvariate(600, 300)) clamped to the range (an engine serving ~600-token contexts),
    u4k = randint(256, 4096) (uniform over the whole range)."""
    rng = random.Random(seed)
    if mix == "c600":
        return [min(SERVING_MAX, max(SERVING_MIN, int(rng.normalvariate(600, 300)))) for _ in range(b)]
    if mix == "u4k":
        return [rng.randint(SERVING_MIN, SERVING_MAX) for _ in range(b)]
    raise ValueError(f"unknown context mix {mix!r}: expected one of {', '.join(SERVING_MIXES)}")


# ---- the paged cache ------------------------------------------------------------------------------
@dataclass
class PagedCache:
    k_cache: torch.Tensor  # [num_pages, 64, h_kv, 576] bf16: random keys, NaN in every unused slot
    block_table: torch.Tensor  # [b, max_pages] int32: a permutation; unused entries point at NaN pages
    seqlens: torch.Tensor  # [b] int32
    lengths: list[int]


def build_cache(
    lengths: list[int], h_kv: int = 1, device: str = "cuda", seed: int = 0, spare_pages: int = 8
) -> PagedCache:
    """A paged latent cache for `lengths`: each request's pages at permuted physical positions, NaN in
    the unused slots of its last page, in the spare pages and behind every unused page-table entry."""
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    pages = torch.tensor([(n + PAGE - 1) // PAGE for n in lengths], dtype=torch.long)
    total = int(pages.sum())
    num_pages = total + spare_pages
    max_pages = max(1, int(pages.max()) if b else 1)
    perm = torch.randperm(num_pages, generator=gen)
    # unused entries: spare (all-NaN) pages
    block_table = perm[total + torch.randint(0, spare_pages, (b, max_pages), generator=gen)]
    col = torch.arange(max_pages)[None, :]
    used = col < pages[:, None]
    start = torch.cumsum(pages, 0) - pages
    block_table[used] = perm[(start[:, None] + col)[used]]
    # the keys are drawn on the device (a 16k-token grid row holds 2.4 GB of them)
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    k_cache = torch.randn(num_pages, PAGE, h_kv, D, generator=dev_gen, device=device, dtype=torch.bfloat16)
    k_cache[perm[total:].to(device)] = float("nan")
    lens = torch.tensor(lengths, dtype=torch.long)
    has = pages > 0
    last = block_table[torch.arange(b)[has], pages[has] - 1].to(device)
    unused = torch.arange(PAGE)[None, :] >= (lens[has] - (pages[has] - 1) * PAGE)[:, None]  # [n, 64]
    tail = k_cache[last]
    tail[unused.to(device)] = float("nan")
    k_cache[last] = tail
    return PagedCache(
        k_cache=k_cache,
        block_table=block_table.to(torch.int32).to(device),
        seqlens=torch.tensor(lengths, dtype=torch.int32, device=device),
        lengths=list(lengths),
    )


# ---- knobs --------------------------------------------------------------------------------------
@contextlib.contextmanager
def knob_env(env: Mapping[str, str]) -> Iterator[None]:
    """Sets the environment variables `env` for the duration, then restores the previous values."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- FlashMLA's API, both forms ----------------------------------------------------------------
def api_form(module: ModuleType) -> str:
    """CURRENT or ORIGINAL (see the module docstring); a module without the API is a ValueError."""
    name = getattr(module, "__name__", repr(module))
    for fn in ("get_mla_metadata", "flash_mla_with_kvcache"):
        if not callable(getattr(module, fn, None)):
            raise ValueError(f"{name} has no {fn}(): not FlashMLA's Python API")
    get = module.get_mla_metadata
    try:
        params = list(inspect.signature(get).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: ask the function itself
        params = None
    if params is not None:
        required = [
            p
            for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
        if required:
            return ORIGINAL
    try:
        meta = get()
    except TypeError:
        return ORIGINAL
    first = meta[0] if isinstance(meta, tuple) and meta else meta
    if isinstance(first, torch.Tensor):
        raise ValueError(f"{name}.get_mla_metadata() returned tensors without being given cache_seqlens")
    return CURRENT


Call = Callable[[], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Impl:
    """One timed implementation: a module with FlashMLA's API, the knobs it runs under (environment
    variables read by the module), and optionally a plan of our own instead of its metadata."""

    name: str
    module: ModuleType
    form: str
    env: Mapping[str, str] = field(default_factory=dict)
    plan: str | None = None  # None: the module's own metadata; "nosplit": no_split_plan (original form only)

    def prepare(
        self, cache: PagedCache, q: torch.Tensor, causal: bool = True
    ) -> tuple[Call, torch.Tensor | None]:
        """Computes this row's metadata once (untimed) and returns (call, num_splits or None). In the
        current form the first call fills the metadata object, so it is made here too."""
        s_q, h_q = q.shape[1], q.shape[2]
        h_kv = cache.k_cache.shape[2]
        mod, k, bt, seq = self.module, cache.k_cache, cache.block_table, cache.seqlens
        with knob_env(self.env):
            if self.form == CURRENT:
                meta, _ = mod.get_mla_metadata()

                def call() -> tuple[torch.Tensor, torch.Tensor]:
                    return mod.flash_mla_with_kvcache(q, k, bt, seq, DV, meta, None, causal=causal)

                call()
                return call, None
            if self.plan == "nosplit":
                parts = mod.num_parts_for(s_q * h_q // h_kv, h_kv, q.device.index or 0)
                rows, splits = no_split_plan(cache.lengths, parts)
                meta = torch.tensor(rows, dtype=torch.int32, device=q.device)
                num_splits = torch.tensor(splits, dtype=torch.int32, device=q.device)
            elif self.plan is None:
                meta, num_splits = mod.get_mla_metadata(seq, s_q * h_q // h_kv, h_kv)
            else:
                raise ValueError(f"unknown plan {self.plan!r}")

        def call_original() -> tuple[torch.Tensor, torch.Tensor]:
            return mod.flash_mla_with_kvcache(q, k, bt, seq, DV, meta, num_splits, causal=causal)

        return call_original, num_splits


def no_split_plan(
    lengths: list[int], num_parts: int, piece_cost: int = 2
) -> tuple[list[list[int]], list[int]]:
    """A plan in our metadata format (csrc/tile_scheduler.h) that splits no request: contiguous runs of
    whole requests, at the smallest makespan (pages + piece_cost per request) that fits in num_parts.
    Returns (tile_scheduler_metadata rows [num_parts][8], num_splits [b + 1])."""
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    pages = [(n + PAGE - 1) // PAGE for n in lengths]
    cost = [p + piece_cost if p else 0 for p in pages]

    def groups(m: int) -> list[tuple[int, int]] | None:
        out: list[tuple[int, int]] = []
        start, load = 0, 0
        for i, c in enumerate(cost):
            if load + c > m and load > 0:
                out.append((start, i - 1))
                start, load = i, 0
            load += c
        if lengths:
            out.append((start, len(lengths) - 1))
        return out if len(out) <= num_parts else None

    lo, hi = max(cost, default=0), max(1, sum(cost))
    while lo < hi:
        mid = (lo + hi) // 2
        if groups(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    best = groups(lo) or []
    rows = [[first, 0, last, pages[last], 0, 0, 0, 0] for first, last in best if sum(cost[first : last + 1])]
    rows += [[0, 0, -1, 0, 0, 0, 0, 0]] * (num_parts - len(rows))
    splits = [0]
    for p in pages:
        splits.append(splits[-1] + (1 if p else 0))
    return rows, splits


def split_requests(num_splits: torch.Tensor | None) -> int | None:
    """How many requests the plan splits (two or more pieces, so their partials go through the combine)."""
    if num_splits is None:
        return None
    n = num_splits.to("cpu", torch.long)
    return int(((n[1:] - n[:-1]) >= 2).sum())


# ---- agreement ----------------------------------------------------------------------------------
OUT_TOL = 1e-2  # ||out - ref|| / ||ref|| per request (bf16 inputs), as in tests/kernels/test_sm90.py
LSE_TOL = 1e-3  # |lse - ref| where finite


@dataclass(frozen=True)
class Agreement:
    out_rel: float  # max over requests of ||a - b|| / ||b||
    lse_abs: float  # max |lse_a - lse_b| where finite; inf if finiteness differs; NaN anywhere -> nan

    @property
    def ok(self) -> bool:
        return self.out_rel <= OUT_TOL and self.lse_abs <= LSE_TOL

    def __str__(self) -> str:
        return f"{self.out_rel:.1e}/{self.lse_abs:.0e}"


def as_bhs(lse: torch.Tensor, b: int, s_q: int, h_q: int) -> torch.Tensor:
    """An LSE as [b, h_q, s_q] (ours and FlashMLA's layout), also accepting [b, s_q, h_q]."""
    if tuple(lse.shape) == (b, h_q, s_q):
        return lse
    if tuple(lse.shape) == (b, s_q, h_q):
        return lse.transpose(1, 2)
    raise ValueError(f"lse of shape {tuple(lse.shape)} is neither [b, h_q, s_q] nor [b, s_q, h_q]")


def agreement(
    out: torch.Tensor, lse: torch.Tensor, ref_out: torch.Tensor, ref_lse: torch.Tensor
) -> Agreement:
    """How far (out, lse) is from (ref_out, ref_lse); out [b, s_q, h_q, dv], lse in either layout."""
    b, s_q, h_q, _ = ref_out.shape
    o, r = out.float().flatten(1), ref_out.float().flatten(1)
    lse, ref_lse = as_bhs(lse, b, s_q, h_q).float(), as_bhs(ref_lse, b, s_q, h_q).float()
    if torch.isnan(o).any() or torch.isnan(lse).any():
        return Agreement(math.nan, math.nan)
    num, den = (o - r).norm(dim=1), r.norm(dim=1)
    rel = torch.where(den > 0, num / den.clamp_min(1e-30), num)
    fin = torch.isfinite(ref_lse)
    if not torch.equal(torch.isfinite(lse), fin):
        lse_abs = math.inf
    else:
        lse_abs = float((lse[fin] - ref_lse[fin]).abs().max()) if fin.any() else 0.0
    return Agreement(float(rel.max()) if rel.numel() else 0.0, lse_abs)
