"""MLA's per-token preparation in one kernel: kv_a_layernorm of the latent, RoPE of k_pe and q_pe,
the 576-value cache row written at its slot, the rotated q_pe written into the query buffer.

Replaces (torch path, attention.py): RMSNorm on c_kv (~6 ops), two RotaryEmbedding.apply calls
(~14 ops each), the cat of [c_kv, k_pe], the cache's index_copy_, and the cat of [q_latent, q_pe]
(the query buffer's first 512 columns per head are filled by the W_UK product, written there
directly). One program per token; a negative slot (left padding) or one past the cache is not
written, so no host check and no `nonzero` are needed (CUDA-graph safe).

Bytes per token (bf16, h heads): read 576·2 (kv) + h·64·2 (q_pe) + 2·32·4 (cos, sin) + 512·2
(norm weight, cached after the first token); write 576·2 (cache row) + h·64·2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERP, cast_rne, check_dtype, next_pow2


@triton.jit(do_not_specialize=["num_slots"])
def _mla_prep_kernel(
    q_ptr,  # [T, h, >= NOPE + ROPE]: q_pe at columns NOPE .. NOPE + ROPE
    kv_ptr,  # [T, RANK + ROPE]: c_kv then k_pe
    cos_ptr,  # [T, ROPE // 2] float32
    sin_ptr,  # [T, ROPE // 2] float32
    w_ptr,  # [RANK]: kv_a_layernorm weight
    slot_ptr,  # [T] int64: cache slot per token, negative = not written
    cache_ptr,  # [num_slots, RANK + ROPE]
    qout_ptr,  # [T, h, >= RANK + ROPE]: rotated q_pe at columns RANK .. RANK + ROPE
    n_heads,
    num_slots,
    q_stride_t,
    q_stride_h,
    kv_stride_t,
    cs_stride_t,
    qout_stride_t,
    qout_stride_h,
    eps,
    NOPE: tl.constexpr,
    RANK: tl.constexpr,
    ROPE: tl.constexpr,
    INTERLEAVE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    INTERP: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = ROPE // 2
    i = tl.arange(0, HALF)
    if INTERLEAVE:  # pairs (x0, x1), (x2, x3), ...
        a_off = 2 * i
        b_off = 2 * i + 1
    else:  # halves (x_i, x_{i + ROPE/2})
        a_off = i
        b_off = i + HALF
    c = tl.load(cos_ptr + t * cs_stride_t + i)
    s = tl.load(sin_ptr + t * cs_stride_t + i)

    # The latent: RMSNorm (rounded as the torch module rounds) and the rotated k_pe, into the cache.
    slot = tl.load(slot_ptr + t).to(tl.int64)
    cols = tl.arange(0, RANK)
    # Masks built blockwise from the slot (Triton 3.9's interpreter mis-types scalar & block masks).
    slot_c = slot + cols.to(tl.int64) * 0
    write_c = (slot_c >= 0) & (slot_c < num_slots)
    slot_i = slot + i.to(tl.int64) * 0
    write_i = (slot_i >= 0) & (slot_i < num_slots)
    out_ty = cache_ptr.dtype.element_ty
    ckv = tl.load(kv_ptr + t * kv_stride_t + cols).to(tl.float32)
    mean_sq = tl.sum(ckv * ckv, axis=0) / RANK
    normed = cast_rne(ckv * tl.rsqrt(mean_sq + eps), kv_ptr.dtype.element_ty, INTERP).to(tl.float32)
    w = tl.load(w_ptr + cols).to(tl.float32)
    row = cache_ptr + slot * (RANK + ROPE)
    tl.store(row + cols, cast_rne(normed * w, out_ty, INTERP), mask=write_c)
    ka = tl.load(kv_ptr + t * kv_stride_t + RANK + a_off).to(tl.float32)
    kb = tl.load(kv_ptr + t * kv_stride_t + RANK + b_off).to(tl.float32)
    # Rounded to the activation dtype first, as the torch path rounds RoPE's output.
    ra = cast_rne(ka * c - kb * s, kv_ptr.dtype.element_ty, INTERP)
    rb = cast_rne(kb * c + ka * s, kv_ptr.dtype.element_ty, INTERP)
    tl.store(row + RANK + a_off, cast_rne(ra.to(tl.float32), out_ty, INTERP), mask=write_i)
    tl.store(row + RANK + b_off, cast_rne(rb.to(tl.float32), out_ty, INTERP), mask=write_i)

    # q_pe of every head, rotated into the query buffer's last ROPE columns.
    h = tl.arange(0, BLOCK_H)
    hm = (h < n_heads)[:, None]
    q_row = q_ptr + t * q_stride_t + h[:, None] * q_stride_h + NOPE
    qa = tl.load(q_row + a_off[None, :], mask=hm, other=0.0).to(tl.float32)
    qb = tl.load(q_row + b_off[None, :], mask=hm, other=0.0).to(tl.float32)
    qo_ty = qout_ptr.dtype.element_ty
    o_row = qout_ptr + t * qout_stride_t + h[:, None] * qout_stride_h + RANK
    qra = cast_rne(qa * c[None, :] - qb * s[None, :], q_ptr.dtype.element_ty, INTERP).to(tl.float32)
    qrb = cast_rne(qb * c[None, :] + qa * s[None, :], q_ptr.dtype.element_ty, INTERP).to(tl.float32)
    tl.store(o_row + a_off[None, :], cast_rne(qra, qo_ty, INTERP), mask=hm)
    tl.store(o_row + b_off[None, :], cast_rne(qrb, qo_ty, INTERP), mask=hm)


def mla_prep(
    q: torch.Tensor,  # [T, h, nope + rope]
    kv: torch.Tensor,  # [T, rank + rope]: kv_a_proj's output
    cos: torch.Tensor,  # [T, rope // 2] float32
    sin: torch.Tensor,  # [T, rope // 2] float32
    norm_weight: torch.Tensor,  # [rank]
    eps: float,
    slots: torch.Tensor,  # [T] int64, negative = do not write
    cache: torch.Tensor,  # [num_slots, rank + rope]
    q_out: torch.Tensor,  # [T, h, rank + rope]: columns rank.. receive the rotated q_pe
    *,
    nope: int,
    interleave: bool,
) -> None:
    """Writes each token's normalised latent and rotated k_pe at its slot, and its rotated q_pe into q_out."""
    t, h, _ = q.shape
    rank = norm_weight.shape[0]
    rope = kv.shape[-1] - rank
    for name, x in (("q", q), ("kv", kv), ("cache", cache), ("q_out", q_out)):
        check_dtype(name, x)
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {x.stride()}")
    if rope <= 0 or rope % 2 or rank & (rank - 1) or rope & (rope - 1):
        raise ValueError(f"need power-of-two rank and rope dims, got rank={rank}, rope={rope}")
    if q.shape[-1] < nope + rope or q_out.shape != (t, h, rank + rope) or kv.shape[0] != t:
        raise ValueError(
            f"shapes disagree: q {tuple(q.shape)}, kv {tuple(kv.shape)}, q_out {tuple(q_out.shape)}"
        )
    if cache.dim() != 2 or cache.shape[1] != rank + rope or not cache.is_contiguous():
        raise ValueError(f"cache must be a contiguous [num_slots, {rank + rope}], got {tuple(cache.shape)}")
    if cos.shape != (t, rope // 2) or sin.shape != cos.shape or cos.dtype != torch.float32:
        raise ValueError(f"cos/sin must be float32 [{t}, {rope // 2}], got {tuple(cos.shape)} {cos.dtype}")
    if slots.shape != (t,):
        raise ValueError(f"slots must be [{t}], got {tuple(slots.shape)}")
    if t == 0:
        return
    cos, sin = cos.contiguous(), sin.contiguous()
    _mla_prep_kernel[(t,)](
        q,
        kv,
        cos,
        sin,
        norm_weight,
        slots,
        cache,
        q_out,
        h,
        cache.shape[0],
        q.stride(0),
        q.stride(1),
        kv.stride(0),
        cos.stride(0),
        q_out.stride(0),
        q_out.stride(1),
        float(eps),
        NOPE=nope,
        RANK=rank,
        ROPE=rope,
        INTERLEAVE=interleave,
        BLOCK_H=next_pow2(h),
        INTERP=INTERP,
        num_warps=4,
    )
