"""Fused Triton kernels for the decode step: norms, MLA's RoPE + cache write, the router, the routed
(and shared) experts.

Which path a call takes (`use_fused`): the fused kernels on CUDA bf16 tensors when Triton imports,
the torch modules otherwise (CPU, float32, no Triton) — the torch path is also every kernel's test
oracle. `MLASERVE_FUSED=0` turns the fused path off (A/B runs); `forced(True)` turns it on for any
device and dtype, for tests that run the kernels under Triton's interpreter (`TRITON_INTERPRET=1`,
set before the first kernel module is imported). Nothing here imports Triton until a fused call is
considered, so the model stays importable (and CPU-only) without it.

Modules: norm.py (RMSNorm with the residual add), mla_prep.py (kv_a_layernorm + RoPE of q_pe and
k_pe + the latent cache write), router.py (gate GEMM + scores + top-k, group-limited and noaux_tc),
moe_align.py (pairs sorted by expert into BLOCK_M-padded blocks), moe.py (gate_up GEMM with
SiLU·mul, down GEMM with the routing weight, combine), configs.py (tile table by token count).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

_forced: bool | None = None


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton imports here (it is present on CUDA images; optional elsewhere)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: no fused path
        return False
    return True


def interpreting() -> bool:
    """Triton's CPU interpreter is on (TRITON_INTERPRET=1): kernels run in numpy on host tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_fused(t: torch.Tensor) -> bool:
    """Whether the model's fused kernels handle the activation `t` (see the module doc)."""
    if _forced is not None:
        return _forced and triton_available()
    if os.environ.get("MLASERVE_FUSED", "1") == "0":
        return False
    return t.is_cuda and t.dtype == torch.bfloat16 and triton_available()


@contextlib.contextmanager
def forced(on: bool) -> Iterator[None]:
    """Within the block, the fused path is on (or off) whatever the device and dtype (tests)."""
    global _forced
    before = _forced
    _forced = on
    try:
        yield
    finally:
        _forced = before
