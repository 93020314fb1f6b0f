"""The routed experts (and the shared ones) as three kernels after the alignment (moe_align.py):

1. gate_up: for each BLOCK_M block of pairs of one expert and each BLOCK_N slice of the intermediate
   dim, the gate and up rows of that slice against the block's gathered token rows (one pass over
   K = hidden), then act = silu(gate) * up written as the block's rows of act [max_blocks·BM, I].
2. down: act rows against the expert's down_proj slice, times the pair's routing weight (1 for the
   shared pseudo-experts), written at the pair's row of y [P, H] (float32 partials [split, P, H]
   with split-K).
3. combine: out[t] = sum over the token's k + n_shared pair rows of y, in the activation dtype.

The shared MLP (gate_proj, up_proj [ns·I, H], down_proj [H, ns·I]) joins as n_shared pseudo-experts
E .. E + ns - 1 of width I each (its intermediate dim cut into ns slices; each token visits all of
them with weight 1), so one pair of GEMM launches streams the routed and the shared weights.

Rounding follows the torch path (moe.Experts + DenseMLP): gate and up rounded to the activation
dtype before silu, silu rounded, the product rounded; the down product rounded before the weight
multiplies it; the k weighted rows summed in float32. Differences: the shared MLP's down product is
summed over its ns slices in float32 (one rounding fewer), and y is kept in the activation dtype
(the torch path keeps the routed sum in float32).

Bytes per layer (bf16): each expert hit streams 3·I·H·2 (gate, up, down), the shared ns·3·I·H·2;
activations: gathered x (P·H·2, mostly from L2), act P_pad·I·2 written + read, y P·H·2 written +
read, out T·H·2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERP, cast_rne, check_dtype
from .configs import GemmConfig, MoETiles, config_for
from .moe_align import Alignment, align


@triton.jit(do_not_specialize=["max_blocks"])
def _gate_up_kernel(
    x_ptr,  # [T, H]
    w13_ptr,  # [E, 2I, H]: gate rows 0..I, up rows I..2I
    wg_ptr,  # [ns·I, H] shared gate_proj
    wu_ptr,  # [ns·I, H] shared up_proj
    act_ptr,  # [max_blocks·BM, I] out
    sorted_ptr,
    block_expert_ptr,
    block_rows_ptr,
    H,
    INTER,
    x_stride,
    w13_stride_e,
    w13_stride_n,
    ws_stride_n,
    act_stride,
    max_blocks,
    E: tl.constexpr,
    KT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    INTERP: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % max_blocks  # blocks of one expert run side by side: its weight tile comes from L2
    pid_n = pid // max_blocks
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    nrows = tl.load(block_rows_ptr + pid_m)
    r = tl.arange(0, BM)
    rmask = r < nrows
    pair = tl.load(sorted_ptr + pid_m * BM + r, mask=rmask, other=0)
    tok = (pair // KT).to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < INTER
    if expert < E:
        g_base = w13_ptr + expert.to(tl.int64) * w13_stride_e
        u_base = g_base + INTER * w13_stride_n
        stride_n = w13_stride_n
    else:
        off = (expert - E).to(tl.int64) * INTER * ws_stride_n
        g_base = wg_ptr + off
        u_base = wu_ptr + off
        stride_n = ws_stride_n
    a_rows = x_ptr + tok[:, None] * x_stride
    g_cols = g_base + n[None, :].to(tl.int64) * stride_n
    u_cols = u_base + n[None, :].to(tl.int64) * stride_n
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, H, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < H
        a = tl.load(a_rows + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = nmask[None, :] & kmask[:, None]
        bg = tl.load(g_cols + kk[:, None], mask=wmask, other=0.0)
        bu = tl.load(u_cols + kk[:, None], mask=wmask, other=0.0)
        if INTERP:
            a32 = a.to(tl.float32)
            acc_g = tl.dot(a32, bg.to(tl.float32), acc_g, input_precision="ieee")
            acc_u = tl.dot(a32, bu.to(tl.float32), acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, bg, acc_g)
            acc_u = tl.dot(a, bu, acc_u)
    out_ty = act_ptr.dtype.element_ty
    g = cast_rne(acc_g, out_ty, INTERP).to(tl.float32)
    u = cast_rne(acc_u, out_ty, INTERP).to(tl.float32)
    s = cast_rne(g / (1.0 + tl.exp(-g)), out_ty, INTERP).to(tl.float32)
    act = cast_rne(s * u, out_ty, INTERP)
    rows = (pid_m * BM + r).to(tl.int64)
    tl.store(act_ptr + rows[:, None] * act_stride + n[None, :], act, mask=rmask[:, None] & nmask[None, :])


@triton.jit(do_not_specialize=["max_blocks"])
def _down_kernel(
    act_ptr,  # [max_blocks·BM, I]
    w2_ptr,  # [E, H, I]
    wd_ptr,  # [H, ns·I] shared down_proj
    y_ptr,  # [SPLIT, P, H] out
    rw_ptr,  # [T, K] float32 routing weights
    sorted_ptr,
    block_expert_ptr,
    block_rows_ptr,
    H,
    INTER,
    act_stride,
    w2_stride_e,
    w2_stride_n,
    wd_stride_n,
    y_stride_split,
    max_blocks,
    num_n_blocks,
    k_per_split,
    E: tl.constexpr,
    K: tl.constexpr,
    KT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT: tl.constexpr,
    INTERP: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % max_blocks
    rest = pid // max_blocks
    pid_n = rest % num_n_blocks
    pid_k = rest // num_n_blocks
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    nrows = tl.load(block_rows_ptr + pid_m)
    r = tl.arange(0, BM)
    rmask = r < nrows
    pair = tl.load(sorted_ptr + pid_m * BM + r, mask=rmask, other=0)
    tok = pair // KT
    j = pair - tok * KT
    weight = tl.load(rw_ptr + tok.to(tl.int64) * K + j, mask=rmask & (j < K), other=1.0)
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < H
    if expert < E:
        base = w2_ptr + expert.to(tl.int64) * w2_stride_e
        stride_n = w2_stride_n
    else:
        base = wd_ptr + (expert - E).to(tl.int64) * INTER
        stride_n = wd_stride_n
    a_rows = act_ptr + (pid_m * BM + r).to(tl.int64)[:, None] * act_stride
    b_cols = base + n[None, :].to(tl.int64) * stride_n
    k_lo = tl.multiple_of(pid_k * k_per_split, BK)  # k_per_split is a multiple of BK: aligned, vector loads
    k_hi = tl.minimum(k_lo + k_per_split, INTER)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < k_hi
        a = tl.load(a_rows + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_cols + kk[:, None], mask=nmask[None, :] & kmask[:, None], other=0.0)
        if INTERP:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if SPLIT == 1:  # rounded as the torch path's grouped GEMM output, then weighted
        acc = cast_rne(acc, act_ptr.dtype.element_ty, INTERP).to(tl.float32)
    y = acc * weight[:, None]
    y_rows = y_ptr + pid_k.to(tl.int64) * y_stride_split + pair.to(tl.int64)[:, None] * H
    tl.store(
        y_rows + n[None, :], cast_rne(y, y_ptr.dtype.element_ty, INTERP), mask=rmask[:, None] & nmask[None, :]
    )


@triton.jit
def _combine_kernel(
    y_ptr,  # [SPLIT, T·KT, H]
    out_ptr,  # [T, H]
    H,
    y_stride_split,
    out_stride,
    KT: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    INTERP: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        for j in tl.static_range(KT):
            acc += tl.load(y_ptr + s * y_stride_split + (t * KT + j) * H + cols, mask=mask, other=0.0).to(
                tl.float32
            )
    tl.store(out_ptr + t * out_stride + cols, cast_rne(acc, out_ptr.dtype.element_ty, INTERP), mask=mask)


def _check_weights(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> tuple[int, int, int]:
    check_dtype("x", x)
    e, two_i, h = w13.shape
    i = two_i // 2
    if x.dim() != 2 or x.shape[1] != h or two_i != 2 * i:
        raise ValueError(
            f"x [T, {h}] and gate_up_proj [E, 2I, H] disagree: {tuple(x.shape)}, {tuple(w13.shape)}"
        )
    if w2.shape != (e, h, i):
        raise ValueError(f"down_proj must be [{e}, {h}, {i}], got {tuple(w2.shape)}")
    for name, w in (("x", x), ("gate_up_proj", w13), ("down_proj", w2)):
        if w.stride(-1) != 1 or w.dtype != x.dtype:
            raise ValueError(f"{name} must be contiguous in its last dim and of x's dtype {x.dtype}")
    ns = 0
    if shared is not None:
        wg, wu, wd = shared
        ns = wg.shape[0] // i
        if (
            ns * i != wg.shape[0]
            or wg.shape != (ns * i, h)
            or wu.shape != wg.shape
            or wd.shape != (h, ns * i)
        ):
            raise ValueError(
                f"shared MLP must be gate/up [{ns} * {i}, {h}] and down [{h}, {ns} * {i}], got "
                f"{tuple(wg.shape)}, {tuple(wu.shape)}, {tuple(wd.shape)}"
            )
        for name, w in (("shared gate_proj", wg), ("shared up_proj", wu), ("shared down_proj", wd)):
            if w.stride(-1) != 1 or w.dtype != x.dtype:
                raise ValueError(f"{name} must be contiguous in its last dim and of x's dtype {x.dtype}")
    return e, i, ns


def fused_moe(
    x: torch.Tensor,  # [T, H]
    ids: torch.Tensor,  # [T, k] int32 / int64 routed expert ids
    weights: torch.Tensor,  # [T, k] float32 routing weights
    w13: torch.Tensor,  # [E, 2I, H] gate_up_proj
    w2: torch.Tensor,  # [E, H, I] down_proj
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    | None = None,  # gate, up [ns·I, H]; down [H, ns·I]
    *,
    tiles: MoETiles | None = None,
) -> torch.Tensor:  # [T, H] in x's dtype: sum_j weights[t, j] · expert_ids[t, j](x[t]) (+ shared MLP(x[t]))
    e, i, ns = _check_weights(x, w13, w2, shared)
    t, h = x.shape
    k = ids.shape[1]
    if ids.shape != (t, k) or weights.shape != (t, k):
        raise ValueError(f"ids and weights must be [{t}, k], got {tuple(ids.shape)}, {tuple(weights.shape)}")
    weights = weights.to(torch.float32).contiguous()
    tiles = tiles or config_for(t)
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    al = align(ids, e, tiles.block_m, ns)
    act = gate_up(x, w13, shared, al, e, tiles.gate_up)
    y = down(act, w2, shared, weights, al, e, k, t, tiles.down)
    combine(y, out, al.pairs_per_token)
    return out


def gate_up(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    al: Alignment,
    num_experts: int,
    cfg: GemmConfig,
) -> torch.Tensor:  # [max_blocks·BM, I]: rows of padding blocks are not written
    h = x.shape[1]
    i = w13.shape[1] // 2
    act = torch.empty(al.max_blocks * al.block_m, i, dtype=x.dtype, device=x.device)
    wg, wu = (shared[0], shared[1]) if shared is not None else (w13, w13)
    grid = (al.max_blocks * triton.cdiv(i, cfg.block_n),)
    _gate_up_kernel[grid](
        x,
        w13,
        wg,
        wu,
        act,
        al.sorted_pairs,
        al.block_expert,
        al.block_rows,
        h,
        i,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        wg.stride(0),
        act.stride(0),
        al.max_blocks,
        E=num_experts,
        KT=al.pairs_per_token,
        BM=al.block_m,
        BN=cfg.block_n,
        BK=cfg.block_k,
        INTERP=INTERP,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return act


def down(
    act: torch.Tensor,  # [max_blocks·BM, I]
    w2: torch.Tensor,  # [E, H, I]
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    weights: torch.Tensor,  # [T, k] float32
    al: Alignment,
    num_experts: int,
    k: int,
    num_tokens: int,
    cfg: GemmConfig,
) -> torch.Tensor:  # [split, P, H]: float32 partials with split-K, else act's dtype
    _, h, i = w2.shape
    wd = shared[2] if shared is not None else w2[0]
    split = cfg.split_k
    pairs = num_tokens * al.pairs_per_token
    y = torch.empty(split, pairs, h, dtype=act.dtype if split == 1 else torch.float32, device=act.device)
    k_per_split = triton.cdiv(triton.cdiv(i, split), cfg.block_k) * cfg.block_k
    n_blocks = triton.cdiv(h, cfg.block_n)
    _down_kernel[(al.max_blocks * n_blocks * split,)](
        act,
        w2,
        wd,
        y,
        weights,
        al.sorted_pairs,
        al.block_expert,
        al.block_rows,
        h,
        i,
        act.stride(0),
        w2.stride(0),
        w2.stride(1),
        wd.stride(0),
        y.stride(0),
        al.max_blocks,
        n_blocks,
        k_per_split,
        E=num_experts,
        K=k,
        KT=al.pairs_per_token,
        BM=al.block_m,
        BN=cfg.block_n,
        BK=cfg.block_k,
        SPLIT=split,
        INTERP=INTERP,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y


def combine(y: torch.Tensor, out: torch.Tensor, pairs_per_token: int) -> None:
    """out [T, H] = sum of each token's pairs_per_token rows of y [split, T·kt, H] (and its splits)."""
    t, h = out.shape
    block_h = min(1024, triton.next_power_of_2(h))
    _combine_kernel[(t, triton.cdiv(h, block_h))](
        y,
        out,
        h,
        y.stride(0),
        out.stride(0),
        KT=pairs_per_token,
        SPLIT=y.shape[0],
        BLOCK_H=block_h,
        INTERP=INTERP,
        num_warps=4,
    )
