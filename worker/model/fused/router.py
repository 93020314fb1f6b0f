"""The MoE router in one kernel: gate GEMM (bf16 operands, float32 accumulation — the products of two
bf16 values are exact in float32, so this is the torch path's float32 GEMM up to summation order),
softmax or sigmoid scores, group-limited or noaux_tc group selection, top-k, normalisation, scaling.

Replaces (torch path, moe.Router): the casts of x and of the [E, H] weight to float32 (the weight's
cast ran every step), the GEMM, softmax/sigmoid, the group ops (view/amax/topk/scatter/expand/
masked_fill), topk, gather and the normalisation — ~8 to 20 kernels. One program per BLOCK_T tokens;
experts are chosen by repeated arg-max, highest first (the torch path's topk order is unspecified:
compare as sets). Ties pick the lowest expert id. A row whose scores are not finite still gets k
valid, distinct expert ids (never an out-of-range index).

Bytes: T·H·2 (x) + E·H·2 (weight, from L2 after the first program) + T·k·8 (out).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import MoEConfig
from ._common import INTERP, check_dtype, next_pow2

_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


@triton.jit(do_not_specialize=["T"])
def _router_kernel(
    x_ptr,  # [T, H]
    w_ptr,  # [E, H]
    bias_ptr,  # [E] float32 (METHOD 2)
    weights_ptr,  # [T, K] float32 out
    ids_ptr,  # [T, K] int32 out
    T,
    H,
    x_stride,
    w_stride,
    scaling,
    E: tl.constexpr,
    K: tl.constexpr,
    SIGMOID: tl.constexpr,
    METHOD: tl.constexpr,  # 0 greedy, 1 group_limited_greedy, 2 noaux_tc
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    NORM: tl.constexpr,
    SCALE_AFTER_NORM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_KK: tl.constexpr,
    IEEE: tl.constexpr,
    INTERP: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < H
        xa = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * x_stride + kk[None, :],
            mask=rmask[:, None] & kmask[None, :],
            other=0.0,
        )
        wb = tl.load(
            w_ptr + e[None, :] * w_stride + kk[:, None], mask=emask[None, :] & kmask[:, None], other=0.0
        )
        if INTERP or IEEE:
            acc = tl.dot(xa.to(tl.float32), wb.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xa, wb, acc)
    neg_inf = float("-inf")
    if SIGMOID:
        scores = tl.sigmoid(acc)
    else:
        logits = tl.where(emask[None, :], acc, neg_inf)
        m = tl.max(logits, axis=1)
        p = tl.exp(logits - m[:, None])
        scores = p / tl.sum(p, axis=1)[:, None]
    scores = tl.where(emask[None, :], scores, neg_inf)
    e2 = e[None, :] + tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32)  # [BT, BE] expert ids

    if METHOD == 2:
        bias = tl.load(bias_ptr + e, mask=emask, other=0.0)
        choice = scores + bias[None, :]
    else:
        choice = scores
    if METHOD != 0:
        # Group scores: the best expert (group_limited) or the sum of the best two (noaux_tc) per group.
        per_group: tl.constexpr = E // N_GROUP
        grp = e2 // per_group
        g = tl.arange(0, BLOCK_G)[None, :] + tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.int32)
        gscore = tl.full((BLOCK_T, BLOCK_G), neg_inf, dtype=tl.float32)
        for gi in tl.static_range(N_GROUP):
            cg = tl.where((grp == gi) & emask[None, :], choice, neg_inf)
            m1 = tl.max(cg, axis=1)
            if METHOD == 2:
                first = tl.min(tl.where(cg == m1[:, None], e2, BLOCK_E), axis=1)
                m2 = tl.max(tl.where(e2 == first[:, None], neg_inf, cg), axis=1)
                v = m1 + m2
            else:
                v = m1
            gscore = tl.where(g == gi, v[:, None], gscore)
        keep = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            gm = tl.max(gscore, axis=1)
            best = tl.min(tl.where(gscore == gm[:, None], g, BLOCK_G), axis=1)
            keep = keep | (grp == best[:, None])
            gscore = tl.where(g == best[:, None], neg_inf, gscore)
        if METHOD == 1:  # the torch path masks the other groups' scores to 0, not -inf
            sel = tl.where(keep, choice, 0.0)
        else:
            sel = tl.where(keep, choice, neg_inf)
        sel = tl.where(emask[None, :], sel, neg_inf)
    else:
        sel = choice

    kk2 = tl.arange(0, BLOCK_KK)[None, :] + tl.zeros((BLOCK_T, BLOCK_KK), dtype=tl.int32)
    wsel = tl.zeros((BLOCK_T, BLOCK_KK), dtype=tl.float32)
    isel = tl.zeros((BLOCK_T, BLOCK_KK), dtype=tl.int32)
    # NaN scores (a non-finite hidden state) rank lowest; once only -inf is left the lowest free
    # expert is taken, so the ids stay valid and distinct whatever the input.
    sel = tl.where(sel == sel, sel, neg_inf)
    free = emask[None, :] & (e2 >= 0)
    for j in tl.static_range(K):
        cand = tl.where(free, sel, neg_inf)
        m = tl.max(cand, axis=1)
        pick = tl.min(tl.where((cand == m[:, None]) & free, e2, BLOCK_E), axis=1)
        wj = tl.sum(tl.where(e2 == pick[:, None], scores, 0.0), axis=1)
        wsel = tl.where(kk2 == j, wj[:, None], wsel)
        isel = tl.where(kk2 == j, pick[:, None], isel)
        free = free & (e2 != pick[:, None])
    if NORM:
        wsel = wsel / (tl.sum(wsel, axis=1)[:, None] + 1e-20)
        if SCALE_AFTER_NORM:
            wsel = wsel * scaling
    else:
        wsel = wsel * scaling
    out = rows[:, None].to(tl.int64) * K + kk2
    omask = rmask[:, None] & (kk2 < K)
    tl.store(weights_ptr + out, wsel, mask=omask)
    tl.store(ids_ptr + out, isel, mask=omask)


def route(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [E, H]
    moe: MoEConfig,
    bias: torch.Tensor | None = None,  # [E] float32: e_score_correction_bias (noaux_tc)
    *,
    block_t: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] -> (weights [T, k] float32, expert ids [T, k] int32), as moe.Router computes them."""
    check_dtype("x", x)
    t, hidden = x.shape
    e, k = moe.n_routed_experts, moe.num_experts_per_tok
    if weight.shape != (e, hidden):
        raise ValueError(f"weight must be [{e}, {hidden}], got {tuple(weight.shape)}")
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("x and weight must be contiguous in their last dimension")
    method = _METHODS[moe.topk_method]
    if method == 2 and (bias is None or bias.shape != (e,) or bias.dtype != torch.float32):
        raise ValueError(f"noaux_tc needs a float32 [{e}] e_score_correction_bias")
    weights = torch.empty(t, k, dtype=torch.float32, device=x.device)
    ids = torch.empty(t, k, dtype=torch.int32, device=x.device)
    if t == 0:
        return weights, ids
    block_e = max(16, next_pow2(e))
    _router_kernel[(triton.cdiv(t, block_t),)](
        x,
        weight,
        bias if bias is not None else weights,
        weights,
        ids,
        t,
        hidden,
        x.stride(0),
        weight.stride(0),
        float(moe.routed_scaling_factor),
        E=e,
        K=k,
        SIGMOID=moe.scoring_func == "sigmoid",
        METHOD=method,
        N_GROUP=moe.n_group,
        TOPK_GROUP=moe.topk_group,
        NORM=moe.norm_topk_prob,
        SCALE_AFTER_NORM=moe.scale_after_norm,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_K=64 if block_e >= 256 else 128,
        BLOCK_G=next_pow2(moe.n_group),
        BLOCK_KK=next_pow2(k),
        IEEE=x.dtype == torch.float32,
        INTERP=INTERP,
        num_warps=4,
    )
    return weights, ids
