"""Engine benchmark: decode step time against the bandwidth bound, GPU-busy time, TTFT and inter-token
latency, swept over batch sizes.

    python -m mlaserve.worker.bench --model tiny --batch 32 --prompt-len 128 --max-tokens 32
    python -m mlaserve.worker.bench --model deepseek-v2-lite --batch 1,16,64,128,256 \\
        --prompt-len 512 --max-tokens 128                                       # on a GPU

For each batch size B: B random prompts of --prompt-len tokens (--varlen: uniform in [P/2, P]),
greedy, ignore_eos, --max-tokens each, all added at once to one engine (the same engine for every
B, built once; its decode graphs are captured at start-up). A warm-up on other prompts runs first.

Per row:
- decode step: mean wall time of the steady decode steps (engine.step() calls whose launched step
  and the step read back are both decode-only), decode tok/s = rows / step time;
- GPU busy: CUDA-event time from the start to the end of each steady step's device work (the
  launch is queued behind the step before it, so this is the GPU's time for the step); the rest of
  the wall time is the GPU waiting for the host;
- bound: (dense weights + embedding rows + expected routed experts hit + latent cache read) / the
  bandwidth of a 1 GiB device-to-device copy measured in the same run. The routed experts a decode
  step of b rows hits are not observable inside a replayed graph, so they are the expectation
  Σ_layers Σ_e 1 - (1 - k·p_e)^b under the expert frequencies p_e the routers showed during the
  eager prefills of the same workload (with --no-graphs the decode steps' real hits are printed
  beside it);
- TTFT (add to first token) and inter-token latency (gaps between a stream's token deltas), p50/p99.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import CacheConfig, EngineConfig, SchedulerConfig
from .engine import Engine
from .kv_cache import HEAD_DIM, NUM_KV_HEADS
from .model.presets import PRESETS
from .types import SamplingParams


@dataclass
class LaunchRecord:
    """One launched step: its shape and, on CUDA, events around its device work."""

    decode_only: bool
    rows: int
    kv_tokens: int  # latents the step's attention reads (every row's length after the step)
    start: Any = None  # torch.cuda.Event
    end: Any = None


@dataclass
class StepRecord:
    wall: float
    launched: LaunchRecord | None
    read: LaunchRecord | None  # the step whose tokens this step() returned (overlap: the one before)
    deltas: list[Any]  # the RequestDeltas step() returned


class Recorder:
    """Wraps the engine's runner.launch and step (instance attributes) to time them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.cuda = engine.device.type == "cuda"
        self.launches: list[LaunchRecord] = []
        self._last: LaunchRecord | None = None
        self.routing: dict[int, torch.Tensor] = {}  # MoE layer -> expert counts [E] of eager forwards
        self.decode_hits: list[int] = []  # experts hit by each eager decode forward (all layers)
        self._forward_hits = 0
        self._decoding = False
        launch = engine.runner.launch

        def timed_launch(plan: Any, *args: Any, **kwargs: Any) -> Any:
            rec = LaunchRecord(not plan.prefills, len(plan.seqs), sum(s.seqlen for s in plan.seqs))
            self._decoding = rec.decode_only
            self._forward_hits = 0
            if self.cuda:
                rec.start = torch.cuda.Event(enable_timing=True)
                rec.end = torch.cuda.Event(enable_timing=True)
                rec.start.record()
            out = launch(plan, *args, **kwargs)
            if self.cuda:
                rec.end.record()
            if rec.decode_only and self._forward_hits:
                self.decode_hits.append(self._forward_hits)
            self._last = rec
            self.launches.append(rec)
            return out

        engine.runner.launch = timed_launch  # type: ignore[method-assign]
        for i, module in enumerate(m for m in engine.runner.model.modules() if type(m).__name__ == "Router"):
            module.register_forward_hook(self._routing_hook(i))

    def _routing_hook(self, layer: int) -> Callable[..., None]:
        def hook(module: Any, inputs: Any, output: tuple[torch.Tensor, torch.Tensor]) -> None:
            ids = output[1]  # [T, k]
            if self._decoding:
                self._forward_hits += int(ids.unique().numel())
                return
            counts = torch.bincount(ids.flatten(), minlength=module.moe.n_routed_experts).float().cpu()
            self.routing[layer] = self.routing.get(layer, torch.zeros_like(counts)) + counts

        return hook

    def step(self) -> StepRecord:
        before = self._last
        n = len(self.launches)
        t0 = time.perf_counter()
        deltas = self.engine.step()
        wall = time.perf_counter() - t0
        launched = self.launches[-1] if len(self.launches) > n else None
        read = before if self.engine.config.overlap else launched
        return StepRecord(wall, launched, read, deltas)

    def expected_expert_hits(self, rows: int, k: int) -> float:
        """Σ over MoE layers of the expected number of experts `rows` tokens hit."""
        total = 0.0
        for counts in self.routing.values():
            p = counts / counts.sum().clamp(min=1)  # share of routing slots per expert
            total += float((1 - (1 - (k * p).clamp(max=1)) ** rows).sum())
        return total


@dataclass(frozen=True)
class ByteModel:
    """Bytes a forward reads from device memory, from the model's parameters."""

    dense_bytes: int  # every parameter but the routed experts and the embedding table
    embed_row_bytes: int  # one row of the embedding table (one per computed token)
    expert_bytes: int  # one routed expert (gate_up + down)
    kv_token_bytes: int  # one cached latent across all layers
    experts_per_token: int  # k of the routers (0 without MoE)

    @classmethod
    def of(cls, engine: Engine) -> ByteModel:
        model = engine.runner.model
        embed = model.model.embed_tokens.weight
        dense = 0
        expert = 0
        seen: set[int] = set()
        for name, p in model.named_parameters():
            if id(p) in seen:  # tied lm_head / embedding: counted once, as the lm_head
                continue
            seen.add(id(p))
            if ".experts." in name:  # fused [E, ...] tensors: one expert's share
                expert += p[0].numel() * p.element_size()
            elif p is not embed or model.config.tie_word_embeddings:
                dense += p.numel() * p.element_size()
        num_moe = sum(1 for m in model.modules() if type(m).__name__ == "Experts")
        kv = engine.kv_cache.num_layers * NUM_KV_HEADS * HEAD_DIM * engine.kv_cache.layers[0].element_size()
        moe = getattr(model.config, "moe", None)
        return cls(
            dense_bytes=dense,
            embed_row_bytes=embed.shape[1] * embed.element_size(),
            expert_bytes=expert // max(num_moe, 1),
            kv_token_bytes=kv,
            experts_per_token=int(moe.num_experts_per_tok) if num_moe and moe is not None else 0,
        )

    def step_bytes(self, rows: int, kv_tokens: float, experts_hit: float) -> float:
        return (
            self.dense_bytes
            + rows * self.embed_row_bytes
            + experts_hit * self.expert_bytes
            + kv_tokens * self.kv_token_bytes
        )


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    return 2 * nbytes * iters / (time.perf_counter() - t0)


def random_prompts(
    rng: random.Random, n: int, length: int, vocab: int, varlen: bool = False
) -> list[list[int]]:
    lengths = [rng.randint(max(1, length // 2), length) if varlen else length for _ in range(n)]
    return [[rng.randrange(vocab) for _ in range(k)] for k in lengths]


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


@dataclass
class Row:
    """One batch size's results."""

    batch: int
    steps: list[StepRecord] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)  # s
    itl: list[float] = field(default_factory=list)  # s
    output_tokens: int = 0
    wall: float = 0.0

    def steady(self) -> list[StepRecord]:
        return [
            s
            for s in self.steps
            if s.launched is not None and s.launched.decode_only and s.read is not None and s.read.decode_only
        ]


def run_batch(rec: Recorder, prompts: Sequence[Sequence[int]], max_tokens: int, tag: str) -> Row:
    """Adds every prompt at once (greedy, ignore_eos) and steps the engine until all are done."""
    engine = rec.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    row = Row(len(prompts))
    t_start = time.perf_counter()
    last: dict[str, float] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
    while engine.has_unfinished():
        step = rec.step()
        now = time.perf_counter()
        row.steps.append(step)
        for d in step.deltas:
            if not d.token_ids:
                continue
            row.output_tokens += len(d.token_ids)
            if d.request_id in last:
                row.itl.append(now - last[d.request_id])
            else:
                row.ttft.append(now - t_start)
            last[d.request_id] = now
    row.wall = time.perf_counter() - t_start
    return row


def profile_batch(
    rec: Recorder, prompts: Sequence[Sequence[int]], max_tokens: int, steps: int, out: str | None
) -> None:
    """torch.profiler over `steps` steady decode steps of one batch: the GPU kernels by total time
    (their count per step, too), printed as a table and saved as a Chrome trace to `out`."""
    from torch.profiler import ProfilerActivity, profile

    engine = rec.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"prof-{i}", prompt, params)
    while engine.has_unfinished():  # until two decode-only launches in a row
        step = rec.step()
        if (
            step.launched is not None
            and step.launched.decode_only
            and step.read is not None
            and step.read.decode_only
        ):
            break
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if rec.cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            rec.step()
        if rec.cuda:
            torch.cuda.synchronize(engine.device)
        wall = time.perf_counter() - t0
    while engine.has_unfinished():
        rec.step()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"] if rec.cuda else []
    gpu_us = sum(e.self_device_time_total for e in kernels)
    print(
        f"profile: {len(prompts)} rows, {steps} decode steps, {1e3 * wall / steps:.2f} ms wall per step, "
        f"{gpu_us / 1e3 / steps:.2f} ms of GPU kernels per step, "
        f"{sum(e.count for e in kernels) / steps:.0f} kernels per step"
    )
    print("| kernel | ms per step | calls per step | share |")
    print("|---|---:|---:|---:|")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:30]:
        print(
            f"| {e.key[:90]} | {e.self_device_time_total / 1e3 / steps:.3f} | {e.count / steps:.1f} | "
            f"{e.self_device_time_total / max(gpu_us, 1e-9):.1%} |"
        )
    if out:
        prof.export_chrome_trace(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlaserve.worker.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="preset name or checkpoint directory (default tiny)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: CUDA when available)")
    p.add_argument("--dtype", default=None, help="default: bf16 on CUDA, float32 on the CPU")
    p.add_argument("--batch", default="32", help="batch sizes, comma-separated (default 32)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--varlen", action="store_true", help="prompt lengths uniform in [prompt-len / 2, prompt-len]"
    )
    p.add_argument(
        "--num-pages", type=int, default=None, help="default: sized to fit the workload (CPU) or memory"
    )
    p.add_argument("--max-batched-tokens", type=int, default=None, help="scheduler token budget per step")
    p.add_argument(
        "--prefill-max-padding",
        type=float,
        default=EngineConfig.prefill_max_padding,
        help="padding allowance of batched prefills (EngineConfig.prefill_max_padding)",
    )
    p.add_argument(
        "--no-graphs", action="store_true", help="eager decode forwards (EngineConfig.decode_graphs=False)"
    )
    p.add_argument(
        "--no-overlap",
        action="store_true",
        help="every step waits for its tokens (EngineConfig.overlap=False)",
    )
    p.add_argument(
        "--profile", type=int, default=None, metavar="B", help="then profile 8 decode steps at batch B"
    )
    p.add_argument("--trace", default=None, help="with --profile: write a Chrome trace here")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _batches(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--batch must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"--batch values must be >= 1, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    batches = _batches(args.batch)
    for name in ("prompt_len", "max_tokens", "num_pages", "max_batched_tokens", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else None
    on_cpu = device.type == "cpu" if device else not torch.cuda.is_available()
    num_pages = args.num_pages
    if num_pages is None and on_cpu:
        per_seq = -(-(args.prompt_len + args.max_tokens) // 64)
        num_pages = 2 * max(batches) * per_seq  # room for the warm-up's prefix-cached pages too
    sched = SchedulerConfig(
        max_running_seqs=max(*batches, args.profile or 0, 4),
        **({"max_batched_tokens": args.max_batched_tokens} if args.max_batched_tokens else {}),
    )
    config = EngineConfig(
        cache=CacheConfig(enable_prefix_caching=False),  # random prompts: no hits, no cached pages kept
        scheduler=sched,
        seed=args.seed,
        prefill_max_padding=args.prefill_max_padding,
        decode_graphs=False if args.no_graphs else None,
        overlap=not args.no_overlap,
    )
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(
        args.model, device=device, dtype=args.dtype, num_pages=num_pages, config=config
    )
    load_s = time.perf_counter() - t0
    cuda = engine.device.type == "cuda"
    rec = Recorder(engine)
    rng = random.Random(args.seed)
    vocab = 256 if args.model in PRESETS else engine.vocab_size  # presets: byte tokens
    run_batch(rec, random_prompts(rng, min(max(batches), 4), args.prompt_len, vocab), 3, "warmup")
    bytes_model = ByteModel.of(engine)
    bw = copy_bandwidth(engine.device) if cuda else None

    from .kernels import backend

    graphs = engine.runner.decode_graphs
    assert graphs is not None  # the engine always runs decodes on its persistent batch
    print(
        f"model {args.model} on {engine._device_name} ({engine.dtype}, kernel backend {backend()}, "
        f"{torch.get_num_threads()} CPU threads); load + graph capture {load_s:.1f} s"
    )
    print(
        f"decode: {'CUDA graphs, buckets ' + ','.join(map(str, graphs.buckets)) if graphs.use_graphs else 'eager'}; "
        f"{'overlapped' if engine.config.overlap else 'waiting'} steps; workload per row: B requests x "
        f"{'up to ' if args.varlen else ''}{args.prompt_len} prompt tokens, {args.max_tokens} output tokens, greedy, ignore_eos"
    )
    if bw is not None:
        print(f"copy bandwidth (same run): {bw / 1e9:.0f} GB/s")
    header = (
        "| B | decode step ms | GPU busy ms | decode tok/s | bound ms | of bound | TTFT p50 / p99 ms "
        "| ITL p50 / p99 ms | output tok/s | experts hit / step (expected; measured) |"
    )
    print(header)
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for b in batches:
        rec.decode_hits.clear()
        row = run_batch(
            rec, random_prompts(rng, b, args.prompt_len, vocab, args.varlen), args.max_tokens, f"b{b}"
        )
        if cuda:
            torch.cuda.synchronize(engine.device)
        steady = row.steady()
        if not steady:
            print(f"| {b} | (no steady decode step: raise --max-tokens) |")
            continue
        step_ms = 1e3 * sum(s.wall for s in steady) / len(steady)
        rows = sum(s.launched.rows for s in steady if s.launched) / len(steady)
        busy = (
            f"{sum(s.launched.start.elapsed_time(s.launched.end) for s in steady if s.launched) / len(steady):.2f}"
            if cuda
            else "-"
        )
        k = bytes_model.experts_per_token
        expected = rec.expected_expert_hits(round(rows), k) if k else 0.0
        measured = sum(rec.decode_hits) / len(rec.decode_hits) if rec.decode_hits else None
        kv = sum(s.launched.kv_tokens for s in steady if s.launched) / len(steady)
        bound_ms = 1e3 * bytes_model.step_bytes(round(rows), kv, expected) / bw if bw else None
        hits = f"{expected:.0f}" + (f"; {measured:.0f}" if measured is not None else "")
        print(
            f"| {b} | {step_ms:.2f} | {busy} | {1e3 * rows / step_ms:.0f} | "
            f"{f'{bound_ms:.2f}' if bound_ms else '-'} | {f'{bound_ms / step_ms:.2f}' if bound_ms else '-'} | "
            f"{1e3 * percentile(row.ttft, 50):.0f} / {1e3 * percentile(row.ttft, 99):.0f} | "
            f"{1e3 * percentile(row.itl, 50):.1f} / {1e3 * percentile(row.itl, 99):.1f} | "
            f"{row.output_tokens / row.wall:.0f} | {hits} |"
        )
        sys.stdout.flush()
    if args.profile:
        profile_batch(
            rec,
            random_prompts(rng, args.profile, args.prompt_len, vocab, args.varlen),
            args.max_tokens,
            8,
            args.trace,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
