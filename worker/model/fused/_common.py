"""What the kernel modules share: Triton imports, the interpreter work-around, small shape helpers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting

# Two work-arounds for Triton's interpreter (3.6), both compile-time branches that the GPU build never
# takes: it multiplies bf16 operands of tl.dot as their raw uint16 bits (kernels widen both operands to
# float32 first), and it narrows float32 to bf16 by truncation (kernels round to nearest even by hand,
# as the GPU's cvt.rn does), so interpreter runs compare tightly with torch.
INTERP = interpreting()


def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar into a Python int with int(1-element array), which
    numpy >= 2.4 refuses (`range(0, H, BLOCK)` with a runtime H then fails); 3.8 squeezes first.
    Re-installs the 3.8 behaviour. Interpreter only; a no-op where the hook is not there."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_mlaserve_fixed", False):
        return

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._mlaserve_fixed = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


if INTERP:
    _fix_interpreter_index()


def _cast_rne(x, dtype: tl.constexpr, INTERP: tl.constexpr):  # type: ignore[no-untyped-def]
    """x -> dtype, rounding to nearest even (the GPU's conversion; by hand for bf16 in the interpreter)."""
    if INTERP and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


# Compiled kernels call it as a Triton function; the interpreter runs kernels as Python, where a plain
# call skips the interpreter's per-call re-patching of triton.language (most of its time).
cast_rne = _cast_rne if INTERP else triton.jit(_cast_rne)

TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in TL_DTYPES:
        raise TypeError(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")


def check_last_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")
