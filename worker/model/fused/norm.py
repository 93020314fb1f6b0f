"""RMSNorm in one kernel, optionally with the residual add before it (one program per row).

`rms_norm(x, weight, eps)` -> weight * bf16(x / rms(x)); `rms_norm(x, weight, eps, residual)` ->
(that of s, s) with s = x + residual rounded to x's dtype. The rounding steps are the torch
module's (layers.RMSNorm after a dtype add): s is rounded before it is normalised, the normalised
row is rounded before the weight multiplies it, so the two paths differ only in the order of the
mean's summation and rsqrt's last bit.

Bytes per row of n values (bf16): 2n read (+ 2n residual read + 2n sum written) + 2n written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERP, cast_rne, check_dtype, check_last_contiguous, next_pow2


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [R, n]
    res_ptr,  # [R, n] (HAS_RES)
    w_ptr,  # [n]
    out_ptr,  # [R, n]
    sum_ptr,  # [R, n]: x + residual (HAS_RES)
    n,
    x_stride,
    res_stride,
    out_stride,
    sum_stride,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        s = cast_rne(x.to(tl.float32) + r.to(tl.float32), sum_ptr.dtype.element_ty, INTERP)  # rounded
        tl.store(sum_ptr + row * sum_stride + cols, s, mask=mask)
        xf = s.to(tl.float32)
    else:
        xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=0) / n
    normed = cast_rne(xf * tl.rsqrt(mean_sq + eps), out_ptr.dtype.element_ty, INTERP).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + row * out_stride + cols, cast_rne(normed * w, out_ptr.dtype.element_ty, INTERP), mask=mask
    )


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


def rms_norm(
    x: torch.Tensor,  # [..., n]
    weight: torch.Tensor,  # [n]
    eps: float,
    residual: torch.Tensor | None = None,  # [..., n], x's shape
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The normalised x [..., n] (x's dtype); with residual, (normalised x + residual, x + residual)."""
    check_dtype("x", x)
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight must be [{n}], got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    check_last_contiguous("x", x)
    x2 = x.reshape(-1, n)  # a view for any layout whose rows are evenly strided
    rows = x2.shape[0]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, n)
    if residual is not None:
        check_last_contiguous("residual", residual)
        r2 = residual.reshape(-1, n)
        total = torch.empty_like(out)
        s2 = total.view(-1, n)
    else:
        r2 = s2 = x2  # unused
    if rows:
        block = next_pow2(n)
        _rms_norm_kernel[(rows,)](
            x2,
            r2,
            weight,
            out2,
            s2,
            n,
            x2.stride(0),
            r2.stride(0),
            out2.stride(0),
            s2.stride(0),
            float(eps),
            HAS_RES=residual is not None,
            BLOCK=block,
            INTERP=INTERP,
            num_warps=_warps(block),
        )
    if residual is None:
        return out
    return out, total
