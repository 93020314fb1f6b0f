"""Token-expert pairs sorted by expert into BLOCK_M-row blocks, in one kernel, with no host sync.

A token t routed to experts ids[t, 0..k) also visits the n_shared "shared" pseudo-experts
E .. E + n_shared (the shared MLP split into n_shared slices of moe_intermediate_size: the sum of the
slices' outputs is the MLP's output). So there are P = T·(k + n_shared) pairs, pair p = t·(k + ns) + j.

Output, for the grouped GEMMs (moe.py):
- sorted_pairs [max_blocks · BLOCK_M] int32: the pairs of expert 0 (in pair order), padded up to a
  multiple of BLOCK_M, then expert 1's, ... Padding entries are not written (the GEMMs mask them).
- block_expert [max_blocks] int32: the expert of each block, -1 for blocks past the last one used.
- block_rows [max_blocks] int32: how many of the block's BLOCK_M rows are real pairs.

max_blocks depends only on P, E and BLOCK_M (`max_blocks()`), never on the routing, so a CUDA graph
captures the kernels once per batch size. Each program counts every pair's expert (a histogram of
all pairs: cheap, P <= a few thousand in decode), places its own chunk of pairs by an exclusive
cumsum of one-hot rows, and writes its share of the block table. Expert ids outside [0, E) are
clamped into it (memory safety; the torch path would fail the whole batch instead).

Bytes: P·4 read (each program reads all ids: from L2) + P·4 + 2·max_blocks·4 written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import next_pow2


@dataclass(frozen=True)
class Alignment:
    sorted_pairs: torch.Tensor  # [max_blocks * block_m] int32
    block_expert: torch.Tensor  # [max_blocks] int32, -1 = unused
    block_rows: torch.Tensor  # [max_blocks] int32
    block_m: int
    pairs_per_token: int  # k + n_shared

    @property
    def max_blocks(self) -> int:
        return self.block_expert.shape[0]


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """An upper bound on sum over experts of ceil(count / block_m), for any routing of num_pairs pairs."""
    return (num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m


@triton.jit
def _expert_of(ids_ptr, p, P, K: tl.constexpr, KT: tl.constexpr, E: tl.constexpr, DUMP: tl.constexpr):
    """Expert of pair p (routed for j < K, shared pseudo-expert E + j - K after); DUMP where p >= P."""
    t = p // KT
    j = p - t * KT
    pm = p < P
    routed = tl.load(ids_ptr + t.to(tl.int64) * K + j, mask=pm & (j < K), other=0).to(tl.int32)
    routed = tl.minimum(tl.maximum(routed, 0), E - 1)
    ex = tl.where(j < K, routed, E + j - K)
    return tl.where(pm, ex, DUMP)


@triton.jit(do_not_specialize=["P", "max_blocks", "blocks_per_program"])
def _moe_align_kernel(
    ids_ptr,  # [T, K] int32 or int64
    sorted_ptr,  # [max_blocks * BM] int32
    block_expert_ptr,  # [max_blocks] int32
    block_rows_ptr,  # [max_blocks] int32
    P,
    max_blocks,
    blocks_per_program,
    K: tl.constexpr,
    KT: tl.constexpr,
    E: tl.constexpr,
    ET: tl.constexpr,
    BM: tl.constexpr,
    CH: tl.constexpr,
    COUNT_BLOCK: tl.constexpr,
    BLOCK_ET: tl.constexpr,  # > ET: the last bin takes the masked-off lanes
    BB: tl.constexpr,
):
    c = tl.program_id(0)
    start = c * CH
    DUMP: tl.constexpr = BLOCK_ET - 1
    total = tl.zeros((BLOCK_ET,), dtype=tl.int32)
    prior = tl.zeros((BLOCK_ET,), dtype=tl.int32)  # pairs of each expert before this program's chunk
    for p0 in range(0, P, COUNT_BLOCK):
        p = p0 + tl.arange(0, COUNT_BLOCK)
        ex = _expert_of(ids_ptr, p, P, K, KT, E, DUMP)
        total += tl.histogram(ex, BLOCK_ET)
        prior += tl.histogram(tl.where(p < start, ex, DUMP), BLOCK_ET)
    be = tl.arange(0, BLOCK_ET)
    real = be < ET
    total = tl.where(real, total, 0)
    prior = tl.where(real, prior, 0)
    padded = (total + BM - 1) // BM * BM
    pend = tl.cumsum(padded, axis=0)  # end of each expert's padded rows
    pstart = pend - padded

    # This program's pairs: position = expert's start + pairs of that expert before it.
    p = start + tl.arange(0, CH)
    ex = _expert_of(ids_ptr, p, P, K, KT, E, DUMP)
    onehot = (ex[:, None] == be[None, :]).to(tl.int32)  # [CH, BLOCK_ET]
    rank = tl.cumsum(onehot, axis=0) - onehot
    pos = tl.sum(onehot * (rank + (pstart + prior)[None, :]), axis=1)
    tl.store(sorted_ptr + pos, p, mask=p < P)

    # This program's share of the block table.
    lo = c * blocks_per_program
    hi = tl.minimum(lo + blocks_per_program, max_blocks)
    for b0 in range(lo, hi, BB):
        b = b0 + tl.arange(0, BB)
        q = b * BM
        eidx = tl.sum(((pend[None, :] <= q[:, None]) & real[None, :]).to(tl.int32), axis=1)
        hit = be[None, :] == eidx[:, None]
        rows = tl.sum(tl.where(hit, total[None, :] - (q[:, None] - pstart[None, :]), 0), axis=1)
        rows = tl.minimum(tl.maximum(rows, 0), BM)
        used = eidx < ET
        tl.store(block_expert_ptr + b, tl.where(used, eidx, -1), mask=b < hi)
        tl.store(block_rows_ptr + b, tl.where(used, rows, 0), mask=b < hi)


def align(
    ids: torch.Tensor,  # [T, k] int32 / int64 expert ids
    num_experts: int,
    block_m: int,
    n_shared: int = 0,
) -> Alignment:
    """Sorts the T·(k + n_shared) pairs by expert into block_m-row blocks (see the module doc)."""
    if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be [T, k] int32/int64, got {tuple(ids.shape)} {ids.dtype}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two, got {block_m}")
    ids = ids.contiguous()
    t, k = ids.shape
    kt = k + n_shared
    et = num_experts + n_shared
    pairs = t * kt
    nb = max_blocks(pairs, et, block_m)
    dev = ids.device
    sorted_pairs = torch.empty(nb * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(nb, dtype=torch.int32, device=dev)
    block_rows = torch.empty(nb, dtype=torch.int32, device=dev)
    if pairs:
        block_et = next_pow2(et + 1)
        ch = 128 if block_et <= 128 else max(16, 8192 // block_et)  # one-hot tile within registers
        programs = triton.cdiv(pairs, ch)
        _moe_align_kernel[(programs,)](
            ids,
            sorted_pairs,
            block_expert,
            block_rows,
            pairs,
            nb,
            triton.cdiv(nb, programs),
            K=k,
            KT=kt,
            E=num_experts,
            ET=et,
            BM=block_m,
            CH=ch,
            COUNT_BLOCK=512,  # fixed, so that one compile serves every batch size
            BLOCK_ET=block_et,
            BB=max(8, 8192 // block_et),
            num_warps=4,
        )
    return Alignment(sorted_pairs, block_expert, block_rows, block_m, kt)
