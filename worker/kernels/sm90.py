"""Python wrapper of the compiled sm_90a paged MLA decode kernels (`_C`, built from csrc/).

Same signatures as `reference`. Every argument is checked here, before anything is launched, and a
bad one raises TypeError/ValueError naming it; the extension itself receives only integers (data
pointers, sizes, strides, the current CUDA stream) and links no torch. CUDA errors come back as
RuntimeError.

    get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)
        -> (tile_scheduler_metadata [num_parts, 8] int32, num_splits [b + 1] int32)
    flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
                           tile_scheduler_metadata, num_splits, softmax_scale=None, causal=False,
                           *, out=None, lse=None) -> (out [b, s_q, h_q, 512] bf16, lse [b, h_q, s_q] fp32)

The metadata is computed on the GPU (no host sync, CUDA-graph capturable) and is reused by every
layer of a decode step. Page-table entries are not range-checked against the cache on the host
(that would need a sync); the TMA descriptor bounds the page coordinate, so an out-of-range page
id reads zeros instead of faulting.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from .validation import HEAD_DIM_QK, HEAD_DIM_V, PAGE_SIZE, check_attention_args, check_metadata_args

try:
    from . import _C
except ImportError:  # extension not built (MLASERVE_CUDA=OFF or no nvcc at install time)
    _C = None

BLOCK_M = 64  # query rows per CTA tile
METADATA_FIELDS = 8
MAX_BATCH = 4096  # the scheduler kernel keeps per-request arrays in shared memory
# split plans (csrc/tile_scheduler.cu); MLASERVE_MLA_SCHED picks one
_PLANS = {"auto": 0, "even": 1, "pack": 2}
# consumer schedules of the main kernel (csrc/solo.cuh, csrc/trio.cuh); MLASERVE_MLA_CONSUMER picks one
_CONSUMERS = {"auto": 0, "solo": 1, "trio": 2}
# The environment knobs read here (for measuring variants; each defaults to the best measured):
#   MLASERVE_MLA_SCHED=auto|even|pack       split plan, read by get_mla_metadata
#   MLASERVE_MLA_PDL=1|0                    combine launched as a programmatic dependent of the main kernel
#   MLASERVE_MLA_CONSUMER=auto|solo|trio    consumer schedule (auto: solo for <= 64 query rows per KV
#                                           head, trio above; schedule_for() says which, csrc/launch.cu why)
KNOBS = ("MLASERVE_MLA_SCHED", "MLASERVE_MLA_PDL", "MLASERVE_MLA_CONSUMER")


def _env_choice(name: str, choices: dict[str, int], default: str) -> int:
    """The value of a kernel knob (environment variable), or a ValueError naming the knob."""
    value = os.environ.get(name, default).lower()
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return choices[value]


def is_supported() -> bool:
    """True when the extension imports and the current CUDA device is compute capability 9.0."""
    if _C is None:
        return False
    try:
        if not torch.cuda.is_available():
            return False
        return torch.cuda.get_device_capability() == (9, 0)
    except (RuntimeError, AssertionError):
        return False


@functools.cache
def _num_sms(device_index: int) -> int:
    return int(_C.num_sms(device_index))


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _check_device(name: str, t: torch.Tensor) -> int:
    if _C is None:
        raise RuntimeError("the sm90 kernels are not built (mlaserve.worker.kernels._C is missing)")
    if not t.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor on a Hopper GPU, got device {t.device}")
    index = t.get_device()
    cap = _capability(index)
    if cap != (9, 0):
        raise ValueError(
            f"{name} is on {torch.cuda.get_device_name(index)} (compute capability {cap[0]}.{cap[1]}); "
            "the sm90 kernels need a Hopper GPU (9.0)"
        )
    return index


def num_parts_for(num_q_tokens_per_head_k: int, num_heads_k: int, device_index: int) -> int:
    """How many parts the split plan cuts the work into: about one CTA per SM."""
    m_blocks = -(-int(num_q_tokens_per_head_k) // BLOCK_M)
    return max(1, _num_sms(device_index) // int(num_heads_k) // m_blocks)


def split_cost_for(num_q_tokens_per_head_k: int) -> int:
    """Pages of extra cost of splitting a request: its fp32 partial (rows x 512 x 4 B) written and
    read back, over a page's 73728 B, plus about one page of combine and epilogue latency."""
    rows = min(int(num_q_tokens_per_head_k), BLOCK_M)
    return 1 + -(-(rows * HEAD_DIM_V * 4 * 2) // (PAGE_SIZE * HEAD_DIM_QK * 2))


def get_mla_metadata(cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int):
    """Split-KV plan for one decode step (reusable across its layers); computed on the GPU.

    About one part per SM. The GPU packs requests, in order, at the smallest makespan for which the
    packing fits, splitting a request only where balance gains more than the split costs; when that
    packing is not better than FlashMLA's even cut of the cost line (one split per part), the even
    cut is used. MLASERVE_MLA_SCHED=even|pack forces one of the two.
    """
    check_metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)
    device = _check_device("cache_seqlens", cache_seqlens)
    if not cache_seqlens.is_contiguous():
        raise ValueError("cache_seqlens must be contiguous")
    b = cache_seqlens.shape[0]
    if b > MAX_BATCH:
        raise ValueError(f"cache_seqlens has {b} requests; the sm90 scheduler takes at most {MAX_BATCH}")
    parts = num_parts_for(num_q_tokens_per_head_k, num_heads_k, device)
    metadata = torch.empty(parts, METADATA_FIELDS, dtype=torch.int32, device=cache_seqlens.device)
    num_splits = torch.empty(b + 1, dtype=torch.int32, device=cache_seqlens.device)
    stream = torch.cuda.current_stream(device).cuda_stream
    if b == 0:
        metadata.zero_()
        metadata[:, 2] = -1
        num_splits.zero_()
        return metadata, num_splits
    mode = _env_choice("MLASERVE_MLA_SCHED", _PLANS, "auto")
    _C.get_mla_metadata(
        device,
        cache_seqlens.data_ptr(),
        b,
        parts,
        split_cost_for(num_q_tokens_per_head_k),
        mode,
        metadata.data_ptr(),
        num_splits.data_ptr(),
        stream,
    )
    return metadata, num_splits


def schedule_for(s_q: int, h_q: int, h_kv: int) -> str:
    """The consumer schedule ("solo", "trio") that flash_mla_with_kvcache runs for this shape
    under the current MLASERVE_MLA_CONSUMER (the launcher's own rule, csrc/launch.cu)."""
    if _C is None:
        raise RuntimeError("the sm90 kernels are not built (mlaserve.worker.kernels._C is missing)")
    if h_kv < 1 or h_q % h_kv or s_q < 1:
        raise ValueError(f"s_q={s_q}, h_q={h_q}, h_kv={h_kv}: need s_q >= 1 and h_q a multiple of h_kv >= 1")
    requested = _env_choice("MLASERVE_MLA_CONSUMER", _CONSUMERS, "auto")
    chosen = int(_C.resolve_schedule(requested, s_q * (h_q // h_kv)))
    return next(name for name, value in _CONSUMERS.items() if value == chosen)


def _check_aligned(name: str, t: torch.Tensor, elems: int, what: str) -> None:
    """Strides (all but the last, which must be 1) multiples of `elems`, base aligned to that many elements."""
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {tuple(t.stride())}")
    if any(s % elems for s in t.stride()[:-1]) or t.data_ptr() % (elems * t.element_size()):
        raise ValueError(f"{name} must have {what}, got strides {tuple(t.stride())}")


def flash_mla_with_kvcache(
    q: torch.Tensor,  # [b, s_q, h_q, 576] bf16
    k_cache: torch.Tensor,  # [num_pages, 64, h_kv, 576] bf16
    block_table: torch.Tensor,  # [b, max_pages] int32
    cache_seqlens: torch.Tensor,  # [b] int32
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,  # [num_parts, 8] int32, from get_mla_metadata
    num_splits: torch.Tensor,  # [b + 1] int32, from get_mla_metadata
    softmax_scale: float | None = None,
    causal: bool = False,
    *,
    out: torch.Tensor | None = None,  # [b, s_q, h_q, 512] bf16, optional preallocated output
    lse: torch.Tensor | None = None,  # [b, h_q, s_q] fp32, optional preallocated LSE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over the paged latent cache: (out [b, s_q, h_q, 512] bf16, lse [b, h_q, s_q] fp32)."""
    check_attention_args(q, k_cache, block_table, cache_seqlens, head_dim_v, (torch.bfloat16,))
    device = _check_device("q", q)
    b, s_q, h_q, _ = q.shape
    h_kv = k_cache.shape[2]
    _check_aligned("q", q, 8, "16-byte aligned rows (strides multiples of 8 elements)")
    _check_aligned("k_cache", k_cache, 8, "16-byte aligned rows (strides multiples of 8 elements)")
    if block_table.stride(-1) != 1:
        raise ValueError(
            f"block_table must be contiguous in its last dimension, got strides {tuple(block_table.stride())}"
        )
    if not cache_seqlens.is_contiguous():
        raise ValueError("cache_seqlens must be contiguous")
    for name, t, n in (
        ("tile_scheduler_metadata", tile_scheduler_metadata, None),
        ("num_splits", num_splits, b + 1),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor from get_mla_metadata, got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if n is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name} must be [batch + 1 = {n}], got shape {tuple(t.shape)}")
    if tile_scheduler_metadata.dim() != 2 or tile_scheduler_metadata.shape[1] != METADATA_FIELDS:
        raise ValueError(
            f"tile_scheduler_metadata must be [num_parts, {METADATA_FIELDS}], got shape {tuple(tile_scheduler_metadata.shape)}"
        )
    num_parts = tile_scheduler_metadata.shape[0]
    if num_parts < 1:
        raise ValueError("tile_scheduler_metadata has no parts")
    if out is None:
        out = torch.empty(b, s_q, h_q, HEAD_DIM_V, dtype=q.dtype, device=q.device)
    else:
        if (
            not isinstance(out, torch.Tensor)
            or out.dtype != q.dtype
            or tuple(out.shape) != (b, s_q, h_q, HEAD_DIM_V)
        ):
            raise ValueError(f"out must be a {q.dtype} tensor of shape {(b, s_q, h_q, HEAD_DIM_V)}")
        if out.device != q.device:
            raise ValueError(f"out is on {out.device} but q is on {q.device}")
        _check_aligned("out", out, 4, "8-byte aligned rows (strides multiples of 4 elements)")
    if lse is None:
        lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)
    else:
        if (
            not isinstance(lse, torch.Tensor)
            or lse.dtype != torch.float32
            or tuple(lse.shape) != (b, h_q, s_q)
        ):
            raise ValueError(f"lse must be a float32 tensor of shape {(b, h_q, s_q)}")
        if lse.device != q.device:
            raise ValueError(f"lse is on {lse.device} but q is on {q.device}")
        if not lse.is_contiguous():
            raise ValueError("lse must be contiguous")
    if b == 0:
        return out, lse
    rows = s_q * (h_q // h_kv)
    max_splits = b + num_parts
    # the split partials: fp32 O [max_splits, h_kv, rows, 512], then their LSE, in one workspace
    n_lse = max_splits * h_kv * rows
    accum = torch.empty(n_lse * (HEAD_DIM_V + 1), dtype=torch.float32, device=q.device)
    o_accum, lse_accum = accum[: n_lse * HEAD_DIM_V], accum[n_lse * HEAD_DIM_V :]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(HEAD_DIM_QK)
    consumer = _env_choice("MLASERVE_MLA_CONSUMER", _CONSUMERS, "auto")
    stream = torch.cuda.current_stream(device).cuda_stream
    _C.mla_decode(
        device,
        q.data_ptr(),
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_cache.data_ptr(),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        k_cache.shape[0],
        block_table.data_ptr(),
        block_table.stride(0),
        cache_seqlens.data_ptr(),
        tile_scheduler_metadata.data_ptr(),
        num_splits.data_ptr(),
        num_parts,
        out.data_ptr(),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        lse.data_ptr(),
        o_accum.data_ptr(),
        lse_accum.data_ptr(),
        b,
        s_q,
        h_q,
        h_kv,
        scale,
        bool(causal),
        os.environ.get("MLASERVE_MLA_PDL", "1") != "0",
        consumer,
        stream,
    )
    return out, lse


__all__ = [
    "KNOBS",
    "PAGE_SIZE",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "is_supported",
    "num_parts_for",
    "schedule_for",
]
