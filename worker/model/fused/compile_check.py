"""Compiles every fused kernel for sm_90a on any machine (no GPU needed: Triton ships ptxas) and
reports, per kernel and launch config, registers, spill stack, shared memory and whether the weight
loads became cp.async pipelines (the thing weight streaming lives on).

    python -m mlaserve.worker.model.fused.compile_check     # TRITON_INTERPRET must be unset

It drives the real wrappers (fused.norm / mla_prep / router / moe_align / moe) on CPU tensors of
deepseek-v2-lite's (and V3's router) shapes with JITFunction.run replaced by a compile-only
function: the signature, constexprs and 16-divisibility hints are derived from the arguments as
Triton's launcher derives them. `bench_fused` runs it too; a test checks the default tiles.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Compiled:
    kernel: str
    constexprs: dict[str, Any]
    options: dict[str, int]
    registers: int
    spill_stack: int
    shared: int
    cp_async: int
    mma: int


def compile_all(tiles: list[Any] | None = None) -> list[Compiled]:
    """Compiles the kernels for the default tile table (and `tiles`, MoETiles, if given)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the kernels must be JIT functions)")
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    ptr_types = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64"}
    target = GPUTarget("cuda", 90, 32)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    results: list[Compiled] = []
    seen: set[tuple] = set()

    def compile_only(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        options: dict[str, int] = {k: int(kwargs.pop(k)) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(self.arg_names, args))
        bound.update(kwargs)
        signature: dict[str, str] = {}
        constexprs: dict[str, Any] = {}
        attrs: dict[tuple[int, ...], list] = {}
        for i, p in enumerate(self.params):
            v = bound[p.name]
            if p.is_constexpr:
                signature[p.name], constexprs[p.name] = "constexpr", v
                continue
            if isinstance(v, torch.Tensor):
                signature[p.name] = ptr_types[v.dtype]
                aligned = v.data_ptr() % 16 == 0
            elif isinstance(v, bool):
                signature[p.name], aligned = "i1", False
            elif isinstance(v, int):
                signature[p.name] = "i64" if abs(v) >= 2**31 else "i32"
                aligned = v % 16 == 0
            else:
                signature[p.name], aligned = "fp32", False
            if aligned and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        key = (
            self.fn.__name__,
            tuple(sorted((k, str(v)) for k, v in constexprs.items())),
            tuple(options.items()),
        )
        if key in seen:
            return
        seen.add(key)
        src = triton.compiler.ASTSource(fn=self, signature=signature, constexprs=constexprs, attrs=attrs)
        kernel = triton.compile(src, target=target, options=options)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run(
                [cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True
            ).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
        if m is None:
            raise RuntimeError(f"no resource usage for {self.fn.__name__}: {usage[:300]}")
        ptx = kernel.asm["ptx"]
        results.append(
            Compiled(
                self.fn.__name__,
                {k: v for k, v in constexprs.items() if k != "INTERP"},
                options,
                int(m.group(1)),
                int(m.group(2)),
                int(kernel.metadata.shared),
                ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
                ptx.count("mma.sync"),
            )
        )

    original = JITFunction.run
    JITFunction.run = compile_only  # type: ignore[method-assign]
    try:
        _drive(torch, tiles or [])
    finally:
        JITFunction.run = original  # type: ignore[method-assign]
    return results


def _drive(torch: Any, extra_tiles: list[Any]) -> None:
    from ..config import MoEConfig
    from . import configs, mla_prep, moe, norm, router
    from .moe_align import Alignment, align, max_blocks

    bf = torch.bfloat16
    x = torch.zeros(64, 2048, dtype=bf)
    norm.rms_norm(x, torch.zeros(2048, dtype=bf), 1e-6, x)
    norm.rms_norm(x, torch.zeros(2048, dtype=bf), 1e-6)
    for heads in (16, 128):
        t = 8
        mla_prep.mla_prep(
            torch.zeros(t, heads, 192, dtype=bf),
            torch.zeros(t, 576, dtype=bf),
            torch.zeros(t, 32),
            torch.zeros(t, 32),
            torch.zeros(512, dtype=bf),
            1e-6,
            torch.zeros(t, dtype=torch.int64),
            torch.zeros(64, 576, dtype=bf),
            torch.zeros(t, heads, 576, dtype=bf),
            nope=128,
            interleave=True,
        )
    v2 = MoEConfig(64, 2, 6, 1408)
    v3 = MoEConfig(
        256,
        1,
        8,
        2048,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        n_group=8,
        topk_group=4,
        norm_topk_prob=True,
    )
    router.route(x, torch.zeros(64, 2048, dtype=bf), v2)
    router.route(torch.zeros(64, 7168, dtype=bf), torch.zeros(256, 7168, dtype=bf), v3, torch.zeros(256))
    e, h, i, ns, k = 64, 2048, 1408, 2, 6
    tiles = list(dict.fromkeys([*configs.DEFAULT_TABLE.values(), *extra_tiles]))
    for t in (1, 64, 256):
        align(torch.zeros(t, k, dtype=torch.int32), e, configs.config_for(t).block_m, ns)
    w13, w2 = torch.zeros(e, 2 * i, h, dtype=bf), torch.zeros(e, h, i, dtype=bf)
    shared = (
        torch.zeros(ns * i, h, dtype=bf),
        torch.zeros(ns * i, h, dtype=bf),
        torch.zeros(h, ns * i, dtype=bf),
    )
    t = 64
    for c in tiles:
        nb = max_blocks(t * (k + ns), e + ns, c.block_m)
        zeros = torch.zeros(nb, dtype=torch.int32)
        al = Alignment(torch.zeros(nb * c.block_m, dtype=torch.int32), zeros, zeros, c.block_m, k + ns)
        act = moe.gate_up(torch.zeros(t, h, dtype=bf), w13, shared, al, e, c.gate_up)
        y = moe.down(act, w2, shared, torch.zeros(t, k), al, e, k, t, c.down)
        moe.combine(y, torch.zeros(t, h, dtype=bf), k + ns)


def report(results: list[Compiled]) -> None:
    print(
        "== The fused kernels compiled for sm_90a (registers, spill stack bytes, shared bytes, cp.async, mma)"
    )
    for r in results:
        cx = ", ".join(f"{k}={v}" for k, v in r.constexprs.items())
        opts = ", ".join(f"{k}={v}" for k, v in r.options.items())
        print(
            f"{r.kernel:18s} regs {r.registers:3d}  spill {r.spill_stack:4d}  smem {r.shared:6d}  "
            f"cp.async {r.cp_async:3d}  mma {r.mma:3d}  [{opts}] {cx}"
        )
    print()


if __name__ == "__main__":
    report(compile_all())
    sys.exit(0)
