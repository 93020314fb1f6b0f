"""Engine step benchmark: where one decode step's time goes, and how far it is from the roofline.

    python -m mlaserve.worker.bench --model tiny --batch 32 --prompt-len 128 --max-tokens 32
    python -m mlaserve.worker.bench --model deepseek-v2-lite --batch 64 --breakdown   # on a GPU

Runs `--batch` random prompts of `--prompt-len` tokens, greedy with ignore_eos, for `--max-tokens`
tokens each (after a short warm-up on other prompts), and prints the prefill steps, the decode
steps and the mean decode step split into schedule / prepare (the runner around the model) /
forward (the model) / sample / postprocess (scheduler update, stop rules, text).

Phases are timed by wrapping the engine's parts from outside (nothing in the engine changes). On
CUDA the phases are host times unless `--breakdown` synchronises the device around each one
(which itself slows the step): without it, launched GPU work surfaces at the first host sync, in
sample. On CUDA the bound of a decode step is (weight bytes read + latent-cache bytes read) /
the bandwidth of a large device-to-device copy measured in the same run; weight bytes count the
routed experts each MoE layer actually used in that step (recorded from the routers).
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

from . import kernels
from .config import CacheConfig, EngineConfig, SchedulerConfig
from .engine import Engine
from .kv_cache import HEAD_DIM, NUM_KV_HEADS
from .model.presets import PRESETS
from .types import SamplingParams

PHASES = ("schedule", "prepare", "forward", "attention", "sample", "postprocess")  # attention: inside forward


@dataclass
class StepRecord:
    """One engine step: its phases (seconds), wall time and what it computed."""

    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    wall: float = 0.0
    prefill: bool = False
    batch: int = 0  # sequences computed
    tokens: int = 0  # tokens sampled
    kv_tokens: int = 0  # cached latents attention read (every sequence's length after the step)


class Instrument:
    """Wraps the engine's scheduler, runner, model and sampler (instance attributes) to time them."""

    def __init__(self, engine: Engine, sync: Callable[[], None] | None) -> None:
        self.engine = engine
        self.sync = sync
        self.current = StepRecord()
        self.runner_time = 0.0
        self.routed: list[torch.Tensor] = []  # expert ids [T, k] of every MoE layer of the current step
        self._active: set[str] = set()  # phases being timed (a nested call of the same phase is not)
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(engine.runner, "compute_logits", "runner")
        self._wrap(engine.runner.model, "forward", "forward")
        if engine.runner.decode_graphs is not None:  # a replayed graph calls no model.forward
            self._wrap(engine.runner.decode_graphs, "forward", "forward")
        self._wrap(engine.sampler, "sample", "sample")
        self._wrap(kernels, "flash_mla_with_kvcache", "attention")  # the model calls it through the module
        for module in engine.runner.model.modules():
            if type(module).__name__ == "Router":
                module.register_forward_hook(self._record_routing)

    def _record_routing(self, module: Any, inputs: Any, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.routed.append(output[1])

    def _wrap(self, obj: Any, method: str, phase: str) -> None:
        fn = getattr(obj, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if phase in self._active:  # e.g. model.forward inside a graph capture
                return fn(*args, **kwargs)
            self._active.add(phase)
            try:
                return timed_call(*args, **kwargs)
            finally:
                self._active.discard(phase)

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            if self.sync is not None:
                self.sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.sync is not None:
                self.sync()
            elapsed = time.perf_counter() - t0
            if phase == "runner":
                self.runner_time += elapsed
            else:
                self.current.phases[phase] += elapsed
            if phase == "schedule":
                plan = out
                self.current.prefill = bool(plan.prefills)
                self.current.batch = len(plan.seqs)
                self.current.kv_tokens = sum(s.seqlen for s in plan.seqs)
            return out

        setattr(obj, method, timed)

    def step(self) -> StepRecord:
        """Runs engine.step() once and returns its record."""
        self.current = StepRecord()
        self.runner_time = 0.0
        self.routed = []
        if self.sync is not None:
            self.sync()
        t0 = time.perf_counter()
        deltas = self.engine.step()
        if self.sync is not None:
            self.sync()
        rec = self.current
        rec.wall = time.perf_counter() - t0
        rec.tokens = sum(len(d.token_ids) for d in deltas)
        p = rec.phases
        p["prepare"] = self.runner_time - p["forward"]
        p["postprocess"] = rec.wall - p["schedule"] - self.runner_time - p["sample"]
        return rec


@dataclass(frozen=True)
class ByteModel:
    """Bytes a forward reads from device memory, from the model's parameters."""

    dense_bytes: int  # every parameter but the routed experts and the embedding table
    embed_row_bytes: int  # one row of the embedding table (one per computed token)
    expert_bytes: int  # one routed expert (gate_up + down)
    kv_token_bytes: int  # one cached latent across all layers

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
        return cls(
            dense_bytes=dense,
            embed_row_bytes=embed.shape[1] * embed.element_size(),
            expert_bytes=expert // max(num_moe, 1),
            kv_token_bytes=kv,
        )

    def step_bytes(self, rec: StepRecord, routed: Sequence[torch.Tensor]) -> int:
        experts_hit = sum(int(ids.unique().numel()) for ids in routed)
        return (
            self.dense_bytes
            + rec.batch * self.embed_row_bytes
            + experts_hit * self.expert_bytes
            + rec.kv_tokens * self.kv_token_bytes
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


def run_workload(
    inst: Instrument,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    tag: str,
    on_step: Callable[[StepRecord], None] | None = None,
) -> list[StepRecord]:
    """Adds every prompt (greedy, ignore_eos) and steps the engine until all are done."""
    engine = inst.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
    records = []
    while engine.has_unfinished():
        rec = inst.step()
        records.append(rec)
        if on_step is not None:
            on_step(rec)
    return records


@dataclass(frozen=True)
class Summary:
    prefill_steps: int
    prefill_s: float
    decode_steps: int
    decode_s: float
    mean_decode_batch: float
    phases_ms: dict[str, float]  # mean per decode step
    output_tokens: int
    total_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.total_s if self.total_s else 0.0

    @property
    def decode_step_ms(self) -> float:
        return 1e3 * self.decode_s / self.decode_steps if self.decode_steps else 0.0


def summarize(records: Sequence[StepRecord]) -> Summary:
    prefills = [r for r in records if r.prefill]
    decodes = [r for r in records if not r.prefill and r.batch]
    n = max(len(decodes), 1)
    return Summary(
        prefill_steps=len(prefills),
        prefill_s=sum(r.wall for r in prefills),
        decode_steps=len(decodes),
        decode_s=sum(r.wall for r in decodes),
        mean_decode_batch=sum(r.batch for r in decodes) / n,
        phases_ms={k: 1e3 * sum(r.phases[k] for r in decodes) / n for k in PHASES},
        output_tokens=sum(r.tokens for r in records),
        total_s=sum(r.wall for r in records),
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlaserve.worker.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="preset name or checkpoint directory (default tiny)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: CUDA when available)")
    p.add_argument("--dtype", default=None, help="default: bf16 on CUDA, float32 on the CPU")
    p.add_argument("--batch", type=int, default=32, help="requests, all added at once")
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
        "--decode-graphs",
        action="store_true",
        help="decode forwards on static batch buckets, CUDA graphs on a GPU (EngineConfig.decode_graphs)",
    )
    p.add_argument("--breakdown", action="store_true", help="CUDA: synchronise around each phase")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _positive(args, "batch", "prompt_len", "max_tokens", "num_pages", "max_batched_tokens", "threads")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else None
    num_pages = args.num_pages
    if num_pages is None and (
        device is None and not torch.cuda.is_available() or device and device.type == "cpu"
    ):
        per_seq = -(-(args.prompt_len + args.max_tokens) // 64)
        num_pages = 2 * args.batch * per_seq  # room for the warm-up's prefix-cached pages too
    sched = SchedulerConfig(
        max_running_seqs=max(args.batch, SchedulerConfig.max_running_seqs),
        **({"max_batched_tokens": args.max_batched_tokens} if args.max_batched_tokens else {}),
    )
    config = EngineConfig(
        cache=CacheConfig(),
        scheduler=sched,
        seed=args.seed,
        prefill_max_padding=args.prefill_max_padding,
        decode_graphs=args.decode_graphs,
    )
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(
        args.model, device=device, dtype=args.dtype, num_pages=num_pages, config=config
    )
    load_s = time.perf_counter() - t0
    cuda = engine.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(engine.device)) if cuda and args.breakdown else None
    inst = Instrument(engine, sync)
    rng = random.Random(args.seed)
    vocab = 256 if args.model in PRESETS else engine.vocab_size  # presets: byte tokens
    run_workload(inst, random_prompts(rng, min(args.batch, 4), args.prompt_len, vocab), 2, "warmup")
    bytes_model = ByteModel.of(engine)
    step_bytes: list[int] = []
    decode_wall: list[float] = []

    def account(rec: StepRecord) -> None:
        if not rec.prefill and rec.batch:
            step_bytes.append(bytes_model.step_bytes(rec, inst.routed))
            decode_wall.append(rec.wall)

    prompts = random_prompts(rng, args.batch, args.prompt_len, vocab, args.varlen)
    forwards_before = engine.runner.num_forwards
    engine_records = run_workload(inst, prompts, args.max_tokens, "bench", account)
    s = summarize(engine_records)

    from .kernels import backend

    print(
        f"model {args.model} on {engine._device_name} ({engine.dtype}, kernel backend {backend()}, "
        f"{torch.get_num_threads()} CPU threads); load {load_s:.1f} s"
    )
    print(
        f"workload: {args.batch} requests x {'up to ' if args.varlen else ''}{args.prompt_len} prompt tokens, {args.max_tokens} output tokens, "
        f"greedy, ignore_eos; {engine.runner.num_forwards - forwards_before} model forwards"
    )
    mode = "synchronised" if sync else ("host times, no sync" if cuda else "CPU")
    rows = [
        ("prefill steps", f"{s.prefill_steps}"),
        ("prefill time (s)", f"{s.prefill_s:.3f}"),
        ("decode steps", f"{s.decode_steps} (mean batch {s.mean_decode_batch:.1f})"),
        ("decode step (ms)", f"{s.decode_step_ms:.2f}"),
    ]
    rows += [(f"  {k} (ms, {mode})", f"{v:.2f}") for k, v in s.phases_ms.items()]
    rows += [
        ("output tokens", f"{s.output_tokens}"),
        ("output tokens/s (prefill + decode)", f"{s.tokens_per_s:.1f}"),
        ("decode tokens/s", f"{1e3 * s.mean_decode_batch / s.decode_step_ms:.1f}" if s.decode_steps else "-"),
    ]
    graphs = engine.runner.decode_graphs is not None
    if graphs:  # the routers' choices are not observable inside a replayed graph
        rows.append(
            ("decode step bound", "run without --decode-graphs (routing is not observable in graphs)")
        )
    if step_bytes and not graphs:
        rows.append(("bytes read per decode step (MB)", f"{sum(step_bytes) / len(step_bytes) / 1e6:.1f}"))
    if cuda and step_bytes and not graphs:
        bw = copy_bandwidth(engine.device)
        bound = [b / bw for b in step_bytes]
        mean_bound = sum(bound) / len(bound)
        rows += [
            ("copy bandwidth (GB/s)", f"{bw / 1e9:.0f}"),
            ("decode step bound (ms)", f"{1e3 * mean_bound:.2f}"),
            ("fraction of bound achieved", f"{sum(bound) / sum(decode_wall):.3f}"),
        ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
