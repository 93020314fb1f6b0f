"""Microbenchmark of the fused kernels against the torch path, on deepseek-v2-lite's shapes (random bf16
weights, random routing), on a CUDA GPU:

    python -m mlaserve.worker.model.bench_fused                # MoE block, norm, MLA prep
    python -m mlaserve.worker.model.bench_fused --sweep --layer --count --write-config tiles.json

- MoE block (router + routed + shared experts) per token count T: the torch path and the fused path,
  each captured in a CUDA graph and timed by its replays (triton.testing.do_bench, median, L2 flushed
  between runs), the bytes it must move (the experts the routing hit, the shared MLP, the router,
  x and out), GB/s and the share of a device-to-device copy measured in the same run.
- Fused RMSNorm (+ residual add) and MLA prep (kv_a_layernorm + RoPE + cache write) vs their torch ops.
- --sweep: tile configs of the two grouped GEMMs per T (BLOCK_M/N/K, num_warps, num_stages, split-K);
  prints the best per T; --write-config FILE saves them for MLASERVE_FUSED_MOE_CONFIG=FILE.
- --layer: one whole deepseek-v2-lite decoder layer (MLA attention over a paged cache of --context
  tokens per sequence + MoE) captured in a CUDA graph, replay time of each path (needs the sm90
  kernel for capture; with the reference backend the layer is timed eagerly and says so).
- --count: kernels launched per MoE decoder layer by each path (torch.profiler). On the CPU it counts
  torch ops + Triton launches instead, on a shrunk layer of the same structure, with the kernels
  under Triton's interpreter (run it with TRITON_INTERPRET=1).

Needs only torch, triton and mlaserve (no Ray).
"""

# ruff: noqa: B023 - every closure below is timed (or captured and replayed) within its loop iteration

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from . import fused
from .config import ModelConfig, MoEConfig
from .presets import get_preset

TOKENS = (1, 16, 64, 128, 256)

# The device the benchmark runs on; `--smoke` (a test of this module on a CPU, kernels under Triton's
# interpreter) sets "cpu", times one call by the host clock and replays nothing.
DEV = "cuda"
SMOKE = False


def _do_bench(fn: Callable[[], object], rep_ms: int = 40) -> float:
    """Median time of fn in ms (triton.testing.do_bench; L2 flushed before every run)."""
    import triton.testing

    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"))


def _graph(fn: Callable[[], object]) -> Callable[[], None]:
    """fn captured in a CUDA graph (after a warm-up run on a side stream); returns its replay."""
    if SMOKE:

        def run() -> None:
            fn()

        return run
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read + written."""
    if SMOKE:
        return 1000.0
    n = 1 << 29
    src = torch.empty(n, dtype=torch.bfloat16, device=DEV).normal_()
    dst = torch.empty_like(src)
    ms = _do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / ms / 1e6


def _init_(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator(device=DEV).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)


@dataclass(frozen=True)
class MoEBytes:
    experts_hit: int
    total: int


def moe_bytes(moe: MoEConfig, hidden: int, ids: torch.Tensor, t: int, elem: int = 2) -> MoEBytes:
    """Bytes one MoE block must move: weights of the experts hit + shared MLP + router + x + out."""
    inter = moe.moe_intermediate_size
    hit = int(ids.unique().numel())
    expert = 3 * inter * hidden * elem
    total = (
        hit * expert
        + moe.n_shared_experts * expert
        + moe.n_routed_experts * hidden * elem
        + 2 * t * hidden * elem
    )
    return MoEBytes(hit, total)


@contextlib.contextmanager
def _path(on: bool) -> Iterator[None]:
    with fused.forced(on), torch.inference_mode():
        yield


def _table(rows: list[list[Any]], head: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
    print()


# ---------------------------------------------------------------------------------------- MoE block


def bench_moe(cfg: ModelConfig, tokens: tuple[int, ...], bw: float) -> None:
    from .moe import MoE

    print("== MoE block (router + routed + shared experts), CUDA-graph replay, median")
    block = MoE(cfg.moe, cfg.hidden_size, dtype=torch.bfloat16).to(DEV)
    _init_(block, 1)
    rows = []
    for t in tokens:
        x = torch.randn(t, 1, cfg.hidden_size, dtype=torch.bfloat16, device=DEV)
        with _path(True):
            _, ids = block.gate(x.view(t, -1))
        nbytes = moe_bytes(cfg.moe, cfg.hidden_size, ids, t)
        times = {}
        for on in (False, True):
            with _path(on):
                times[on] = _do_bench(_graph(lambda: block(x)))
        with _path(False):
            ref = block(x)
        with _path(True):
            err = float((block(x).float() - ref.float()).norm() / ref.float().norm())
        gbs = {on: nbytes.total / times[on] / 1e6 for on in times}
        rows.append(
            [
                t,
                nbytes.experts_hit,
                f"{nbytes.total / 1e6:.1f}",
                f"{times[False] * 1e3:.1f}",
                f"{gbs[False]:.0f} ({gbs[False] / bw:.0%})",
                f"{times[True] * 1e3:.1f}",
                f"{gbs[True]:.0f} ({gbs[True] / bw:.0%})",
                f"{times[False] / times[True]:.2f}x",
                f"{err:.1e}",
            ]
        )
    _table(
        rows,
        [
            "T",
            "experts hit",
            "MB",
            "torch us",
            "torch GB/s (%copy)",
            "fused us",
            "fused GB/s (%copy)",
            "speedup",
            "rel diff",
        ],
    )


# ---------------------------------------------------------------------------------------- norm, MLA prep


def bench_small(cfg: ModelConfig, tokens: tuple[int, ...]) -> None:
    from .attention import LATENT_DIM
    from .fused.mla_prep import mla_prep
    from .layers import RMSNorm
    from .rope import RotaryEmbedding

    print("== RMSNorm + residual add, MLA prep: CUDA-graph replay, median (us; GB/s)")
    hidden, h = cfg.hidden_size, cfg.num_attention_heads
    nope, rope, rank = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    norm = RMSNorm(hidden, cfg.rms_norm_eps, dtype=torch.bfloat16).to(DEV)
    kv_norm = RMSNorm(rank, cfg.rms_norm_eps, dtype=torch.bfloat16).to(DEV)
    rotary = RotaryEmbedding(cfg.rope).to(DEV)
    slots = 1 << 16
    cache = torch.zeros(slots, LATENT_DIM, dtype=torch.bfloat16, device=DEV)
    rows = []
    for t in tokens:
        x = torch.randn(t, hidden, dtype=torch.bfloat16, device=DEV)
        res = torch.randn_like(x)
        norm_bytes = 4 * t * hidden * 2
        q = torch.randn(t, h, nope + rope, dtype=torch.bfloat16, device=DEV)
        kv = torch.randn(t, LATENT_DIM, dtype=torch.bfloat16, device=DEV)
        q_out = torch.empty(t, h, LATENT_DIM, dtype=torch.bfloat16, device=DEV)
        q_latent = torch.randn(t, h, rank, dtype=torch.bfloat16, device=DEV)  # the W_UK product
        pos = torch.randint(0, 4096, (1, t), device=DEV)
        cos, sin = rotary.cos_sin(pos)
        slot = torch.randperm(slots, device=DEV)[:t]
        prep_bytes = t * (2 * LATENT_DIM * 2 + 2 * h * rope * 2 + rope * 4)

        def torch_prep() -> None:
            c_kv = kv_norm(kv[None, :, :rank])
            k_pe = rotary.apply(kv[None, :, rank:], cos, sin)
            cache.index_copy_(0, slot, torch.cat((c_kv, k_pe), dim=-1)[0])
            q_pe = rotary.apply(q[None, :, :, nope:], cos, sin)[0]
            torch.cat((q_latent, q_pe), dim=-1)  # the query buffer the kernel reads

        def fused_prep() -> None:
            mla_prep(
                q,
                kv,
                cos[0],
                sin[0],
                kv_norm.weight,
                kv_norm.eps,
                slot,
                cache,
                q_out,
                nope=nope,
                interleave=True,
            )

        with _path(False):
            n_torch = _do_bench(_graph(lambda: norm.add(x, res)))
            p_torch = _do_bench(_graph(torch_prep))
        with _path(True):
            n_fused = _do_bench(_graph(lambda: norm.add(x, res)))
            p_fused = _do_bench(_graph(fused_prep))
        rows.append(
            [
                t,
                f"{n_torch * 1e3:.1f}",
                f"{n_fused * 1e3:.1f} ({norm_bytes / n_fused / 1e6:.0f})",
                f"{p_torch * 1e3:.1f}",
                f"{p_fused * 1e3:.1f} ({prep_bytes / p_fused / 1e6:.0f})",
            ]
        )
    _table(rows, ["T", "norm torch", "norm fused (GB/s)", "prep torch", "prep fused (GB/s)"])


# ---------------------------------------------------------------------------------------- sweep


def _sweep_candidates(
    quick: bool,
) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int, int, int, int]]]:
    gate_up = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages)
        (32, 128, 4, 4),
        (64, 128, 4, 4),
        (32, 256, 4, 3),
        (64, 64, 4, 5),
        (16, 256, 4, 4),
        (64, 256, 8, 3),
        (128, 64, 4, 4),
        (128, 128, 8, 3),
    ]
    down = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages, split_k)
        (32, 128, 4, 4, 1),
        (64, 128, 4, 4, 1),
        (32, 256, 4, 3, 1),
        (64, 64, 4, 5, 1),
        (16, 128, 4, 4, 1),
        (128, 64, 4, 4, 1),
        (128, 128, 8, 3, 1),
        (32, 128, 4, 4, 2),
        (64, 64, 4, 4, 4),
    ]
    if SMOKE:
        return gate_up[:2], down[:1] + down[7:8]
    if quick:
        return gate_up[:4], down[:4] + down[7:8]
    return gate_up, down


def _fastest(run: Callable[[Any], None], candidates: list[Any]) -> tuple[float, Any]:
    """(ms, config) of the fastest candidate."""
    timed: list[tuple[float, Any]] = []
    for c in candidates:
        timed.append((_do_bench(functools.partial(run, c), 20), c))
    return min(timed, key=lambda tc: tc[0])


def sweep(cfg: ModelConfig, tokens: tuple[int, ...], bw: float, quick: bool, out_path: str | None) -> None:
    from .fused import configs
    from .fused.configs import GemmConfig, MoETiles
    from .fused.moe import combine, down, gate_up
    from .fused.moe_align import align
    from .moe import MoE

    print("== Tile sweep of the fused GEMMs (kernel time, median; GB/s of the weights hit)")
    moe = cfg.moe
    block = MoE(moe, cfg.hidden_size, dtype=torch.bfloat16).to(DEV)
    _init_(block, 2)
    mlp = block.shared_experts
    assert mlp is not None
    shared = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    w13, w2 = block.experts.gate_up_proj, block.experts.down_proj
    gu_cands, dn_cands = _sweep_candidates(quick)
    best: dict[int, MoETiles] = {}
    rows = []
    inter, hidden = moe.moe_intermediate_size, cfg.hidden_size
    for t in tokens:
        x = torch.randn(t, hidden, dtype=torch.bfloat16, device=DEV)
        with _path(True):
            weights, ids = block.gate(x)
        hit = int(ids.unique().numel()) + moe.n_shared_experts
        gu_bytes, dn_bytes = hit * 2 * inter * hidden * 2, hit * inter * hidden * 2
        result = None
        for bm in (16, 32) if t >= 128 else (16,):  # BLOCK_M 32 only where experts get > 16 rows
            al = align(ids, moe.n_routed_experts, bm, moe.n_shared_experts)
            act = gate_up(x, w13, shared, al, moe.n_routed_experts, GemmConfig(64, 128))
            out = torch.empty_like(x)

            def run_gate_up(c: GemmConfig) -> None:
                gate_up(x, w13, shared, al, moe.n_routed_experts, c)

            def run_down(c: GemmConfig) -> None:
                y = down(act, w2, shared, weights, al, moe.n_routed_experts, moe.num_experts_per_tok, t, c)
                combine(y, out, al.pairs_per_token)

            gu_best = _fastest(run_gate_up, [GemmConfig(*g) for g in gu_cands])
            dn_best = _fastest(run_down, [GemmConfig(*d) for d in dn_cands])
            total = gu_best[0] + dn_best[0]
            if result is None or total < result[0]:
                result = (total, bm, gu_best, dn_best)
        assert result is not None
        _, bm, (gu_ms, gu_cfg), (dn_ms, dn_cfg) = result
        best[t] = MoETiles(bm, gu_cfg, dn_cfg)
        default = configs.config_for(t)
        rows.append(
            [
                t,
                bm,
                f"{gu_cfg.block_n}/{gu_cfg.block_k}/{gu_cfg.num_warps}/{gu_cfg.num_stages}",
                f"{gu_ms * 1e3:.1f} ({gu_bytes / gu_ms / 1e6 / bw:.0%})",
                f"{dn_cfg.block_n}/{dn_cfg.block_k}/{dn_cfg.num_warps}/{dn_cfg.num_stages}/{dn_cfg.split_k}",
                f"{dn_ms * 1e3:.1f} ({dn_bytes / dn_ms / 1e6 / bw:.0%})",
                "yes" if default == best[t] else "no",
            ]
        )
    _table(
        rows,
        [
            "T",
            "BM",
            "gate_up N/K/w/s",
            "gate_up us (%copy)",
            "down N/K/w/s/split",
            "down+combine us (%copy)",
            "= default",
        ],
    )
    print("best tiles as a Python table (paste into fused/configs.py DEFAULT_TABLE):")
    for t, c in best.items():
        g, d = c.gate_up, c.down
        print(
            f"    {t}: MoETiles({c.block_m}, GemmConfig({g.block_n}, {g.block_k}, {g.num_warps}, {g.num_stages}), "
            f"GemmConfig({d.block_n}, {d.block_k}, {d.num_warps}, {d.num_stages}, split_k={d.split_k})),"
        )
    print()
    if out_path:
        with open(out_path, "w") as f:
            json.dump({str(t): c.to_dict() for t, c in best.items()}, f, indent=1)
        print(f"wrote {out_path} (use it with MLASERVE_FUSED_MOE_CONFIG={out_path})\n")


# ---------------------------------------------------------------------------------------- one layer


def _layer_inputs(cfg: ModelConfig, t: int, context: int, device: str):  # type: ignore[no-untyped-def]
    from ..attention_metadata import AttentionMetadata, CacheWrite
    from ..kernels import get_mla_metadata
    from .deepseek import PAGE_SIZE
    from .rope import RotaryEmbedding

    pages_per_seq = -(-(context + 1) // PAGE_SIZE)
    num_pages = t * pages_per_seq
    cache = torch.randn(num_pages, PAGE_SIZE, 1, 576, device=device).to(
        torch.bfloat16 if device == "cuda" else torch.float32
    )
    table = torch.randperm(num_pages, device=device).to(torch.int32).view(t, pages_per_seq)
    lens = torch.full((t,), context + 1, dtype=torch.int32, device=device)
    pos = torch.full((t, 1), context, dtype=torch.int64, device=device)
    slots = (table[:, context // PAGE_SIZE].to(torch.int64) * PAGE_SIZE + context % PAGE_SIZE).view(t, 1)
    md, splits = get_mla_metadata(lens, cfg.num_attention_heads, 1)
    meta = AttentionMetadata(table, lens, slots, md, splits)
    write = CacheWrite(slots.view(-1), None)
    rotary = RotaryEmbedding(cfg.rope).to(device)
    return cache, meta, write, rotary, rotary.cos_sin(pos)


def bench_layer(cfg: ModelConfig, tokens: tuple[int, ...], context: int, bw: float) -> None:
    from .. import kernels
    from .deepseek import DecoderLayer

    graphs = kernels.backend() == "sm90" and not SMOKE
    how = "CUDA-graph replay" if graphs else "EAGER (reference attention backend: no graph capture)"
    print(f"== One deepseek-v2-lite decoder layer (MLA + MoE), {context} cached tokens per sequence, {how}")
    layer = DecoderLayer(cfg, 1, dtype=torch.bfloat16).to(DEV)
    _init_(layer, 3)
    dense = sum(p.numel() * 2 for n, p in layer.named_parameters() if ".experts." not in n)
    rows = []
    for t in tokens:
        cache, meta, write, rotary, cos_sin = _layer_inputs(cfg, t, context, DEV)
        x = torch.randn(t, 1, cfg.hidden_size, dtype=torch.bfloat16, device=DEV)
        res = torch.randn_like(x)
        with _path(True):
            gate = layer.mlp.gate
            assert isinstance(gate, torch.nn.Module)
            _, ids = gate(layer.post_attention_layernorm(x).view(t, -1))
        hit = int(ids.unique().numel())
        nbytes = (
            dense
            + hit * 3 * cfg.moe.moe_intermediate_size * cfg.hidden_size * 2
            + t * (context + 1) * 576 * 2
        )

        def step() -> None:
            layer(x, res, cos_sin, rotary, cache, meta, write)

        times = {}
        for on in (False, True):
            with _path(on):
                times[on] = _do_bench(_graph(step) if graphs else step)
        rows.append(
            [
                t,
                f"{nbytes / 1e6:.0f}",
                f"{nbytes / bw / 1e3:.1f}",
                f"{times[False] * 1e3:.1f}",
                f"{times[True] * 1e3:.1f} ({nbytes / times[True] / 1e6 / bw:.0%})",
                f"{times[False] / times[True]:.2f}x",
            ]
        )
    _table(rows, ["T", "MB moved", "bound us", "torch us", "fused us (% of bound)", "speedup"])


# ---------------------------------------------------------------------------------------- kernel count


def _small_v2_lite() -> ModelConfig:
    """deepseek-v2-lite's structure (16 heads, 64 routed top-6 + 2 shared experts, YaRN) at tiny widths."""
    import dataclasses

    c = get_preset("deepseek-v2-lite").config
    return dataclasses.replace(
        c,
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        qk_nope_head_dim=16,
        v_head_dim=16,
        moe=dataclasses.replace(c.moe, moe_intermediate_size=32),
    )


def _aliases(out: object, args: tuple) -> bool:
    """Whether an op's output is (a view of) one of its inputs: a view or a no-op cast, no kernel."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    ins = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    return any(isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in ins for o in outs)


def count_kernels(cfg: ModelConfig, t: int, device: str) -> dict[str, dict[str, int]]:
    """Kernels (CUDA: profiler kernel events; CPU: torch ops + Triton launches) of one MoE decoder
    layer's decode forward over t tokens, per path."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from .. import kernels
    from . import moe as moe_module
    from .deepseek import DecoderLayer

    dtype = torch.bfloat16  # bf16 on the CPU too: casts that are no-ops in float32 are kernels in bf16
    layer = DecoderLayer(cfg, 1, dtype=dtype).to(device)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5)
    cache, meta, write, rotary, cos_sin = _layer_inputs(cfg, t, 64, device)
    cache = cache.to(dtype)
    # The runner's decode forward: cos/sin computed once per step, the metadata built before the layers.
    x = torch.randn(t, 1, cfg.hidden_size, dtype=dtype, device=device)
    res = torch.randn_like(x)
    result: dict[str, dict[str, int]] = {}
    for on in (False, True):
        counts: dict[str, int] = {}
        with _path(on):
            layer(x, res, cos_sin, rotary, cache, meta, write)  # compile / warm up
            if device == "cuda":
                from torch.profiler import ProfilerActivity, profile

                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    layer(x, res, cos_sin, rotary, cache, meta, write)
                    torch.cuda.synchronize()
                for ev in prof.events():
                    if ev.device_type == torch.autograd.DeviceType.CUDA:
                        name = ev.name[:60]
                        counts[name] = counts.get(name, 0) + 1
            else:
                import triton

                skip = {
                    "detach",
                    "view",
                    "_unsafe_view",
                    "t",
                    "transpose",
                    "expand",
                    "slice",
                    "select",
                    "split",
                    "split_with_sizes",
                    "unsqueeze",
                    "squeeze",
                    "permute",
                    "alias",
                    "as_strided",
                    "reshape",
                    "unbind",
                    "chunk",
                    "empty",
                    "empty_like",
                    "lift_fresh",
                    "empty_strided",
                    "new_empty",
                    "_reshape_alias",
                }  # views and allocations launch nothing

                class Count(TorchDispatchMode):
                    depth = 0

                    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                        name = func.overloadpacket.__name__
                        out = func(*args, **(kwargs or {}))
                        if (
                            Count.depth == 0
                            and name not in skip
                            and (name.endswith("_") or not _aliases(out, args))
                        ):
                            counts[name] = counts.get(name, 0) + 1
                        return out

                launch = triton.runtime.interpreter.InterpretedFunction.run

                def counted(self, *a, **k):  # type: ignore[no-untyped-def]
                    counts["triton:" + self.fn.__name__] = counts.get("triton:" + self.fn.__name__, 0) + 1
                    Count.depth += 1  # the interpreter's own tensor copies are no kernels
                    try:
                        return launch(self, *a, **k)
                    finally:
                        Count.depth -= 1

                mla = kernels.flash_mla_with_kvcache

                def mla_counted(*a, **k):  # type: ignore[no-untyped-def]
                    counts["mla kernel (sm90: split + combine)"] = (
                        counts.get("mla kernel (sm90: split + combine)", 0) + 1
                    )
                    Count.depth += 1  # the CPU reference's ops are not the GPU's
                    try:
                        return mla(*a, **k)
                    finally:
                        Count.depth -= 1

                histc = torch.histc

                def histc_any(t: torch.Tensor, *a, **k):  # type: ignore[no-untyped-def]
                    counts["histc"] = counts.get("histc", 0) + 1
                    Count.depth += 1  # the CPU has no integer histc; CUDA's is one kernel
                    try:
                        return histc(t.float(), *a, **k)
                    finally:
                        Count.depth -= 1

                grouped = moe_module._use_grouped
                triton.runtime.interpreter.InterpretedFunction.run = counted
                kernels.flash_mla_with_kvcache = mla_counted
                moe_module._use_grouped = lambda x: moe_module._grouped_mm is not None  # CUDA's torch path
                torch.histc = histc_any  # type: ignore[assignment]
                try:
                    with Count():
                        layer(x, res, cos_sin, rotary, cache, meta, write)
                finally:
                    triton.runtime.interpreter.InterpretedFunction.run = launch
                    kernels.flash_mla_with_kvcache = mla
                    moe_module._use_grouped = grouped
                    torch.histc = histc
        result["fused" if on else "torch"] = counts
    return result


def print_counts(cfg: ModelConfig, t: int, device: str) -> None:
    what = "CUDA kernels (profiler)" if device == "cuda" else "torch ops + Triton launches (CPU)"
    print(f"== {what} per MoE decoder layer, decode forward of {t} tokens")
    counts = count_kernels(cfg, t, device)
    for path, c in counts.items():
        print(f"{path}: {sum(c.values())} in all")
        for name, n in sorted(c.items(), key=lambda kv: -kv[1]):
            print(f"    {n:3d}  {name}")
    print()


# ---------------------------------------------------------------------------------------- main


def smoke(tokens: tuple[int, ...], args: argparse.Namespace) -> int:
    """Every mode once on a CPU with deepseek-v2-lite's structure at tiny widths (the times mean nothing)."""
    global DEV, SMOKE
    if not fused.interpreting():
        print("--smoke runs the kernels under Triton's interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    DEV, SMOKE = "cpu", True
    try:
        cfg = _small_v2_lite()
        bench_moe(cfg, tokens, 1000.0)
        bench_small(cfg, tokens)
        sweep(cfg, tokens, 1000.0, True, args.write_config)
        bench_layer(cfg, tokens, args.context, 1000.0)
    finally:
        DEV, SMOKE = "cuda", False
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m mlaserve.worker.model.bench_fused", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS), help="token counts T per forward")
    ap.add_argument("--sweep", action="store_true", help="sweep the grouped GEMMs' tile configs per T")
    ap.add_argument("--quick", action="store_true", help="a short sweep (5 of the configs)")
    ap.add_argument("--write-config", metavar="FILE", help="with --sweep: write the best tiles as JSON")
    ap.add_argument("--layer", action="store_true", help="time one whole decoder layer in a CUDA graph")
    ap.add_argument("--context", type=int, default=512, help="cached tokens per sequence for --layer")
    ap.add_argument("--count", action="store_true", help="count kernels per MoE decoder layer, both paths")
    ap.add_argument("--count-tokens", type=int, default=64, help="tokens of the forward --count profiles")
    ap.add_argument("--no-micro", action="store_true", help="skip the MoE / norm / prep microbenchmarks")
    ap.add_argument(
        "--smoke", action="store_true", help="test run on the CPU (TRITON_INTERPRET=1, tiny shapes)"
    )
    args = ap.parse_args(argv)
    tokens = tuple(args.tokens)
    if args.smoke:
        return smoke(tokens, args)
    if not torch.cuda.is_available():
        if not args.count:
            print("bench_fused needs a CUDA GPU (only --count runs on the CPU)", file=sys.stderr)
            return 2
        if not fused.interpreting():
            print(
                "on the CPU, run --count with TRITON_INTERPRET=1 (the fused kernels run interpreted)",
                file=sys.stderr,
            )
            return 2
        print_counts(_small_v2_lite(), args.count_tokens, "cpu")
        return 0
    if not fused.triton_available():
        print("triton does not import here", file=sys.stderr)
        return 2
    import triton

    cfg = get_preset("deepseek-v2-lite").config
    start = time.perf_counter()
    bw = copy_bandwidth()
    print(
        f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
        f"copy bandwidth (1 GiB d2d, read + write) {bw:.0f} GB/s\n"
    )
    if not args.no_micro:
        bench_moe(cfg, tokens, bw)
        bench_small(cfg, tokens)
    if args.sweep:
        sweep(cfg, tokens, bw, args.quick, args.write_config)
    if args.layer:
        bench_layer(cfg, tokens, args.context, bw)
    if args.count:
        print_counts(cfg, args.count_tokens, "cuda")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
