"""DecodeGraphs: decode forwards on the persistent decode batch, padded to a bucket (CUDA graphs on a GPU).

On the CPU the same path runs eagerly (with padded buckets passed in, to exercise padding rows); it
must give the plain runner's logits for the real rows, write the same cache rows, touch nothing but
the scratch page for its padding rows, and let padding rows use no expert of their own. The `gpu`
tests check graph replay against the eager forward on the H200.
"""

from __future__ import annotations

import random

import pytest
import torch

from mlaserve.worker.config import PAGE_SIZE, CacheConfig, EngineConfig, SchedulerConfig
from mlaserve.worker.decode_graphs import DecodeGraphs, bucket_sizes
from mlaserve.worker.engine import Engine
from mlaserve.worker.kernels import backend
from mlaserve.worker.kv_cache import KVCache
from mlaserve.worker.model import load_model
from mlaserve.worker.model_runner import ModelRunner
from mlaserve.worker.scheduler import BatchPlan, ScheduledSeq
from mlaserve.worker.types import SamplingParams
from tests.worker.test_engine import assert_same_greedy, record_logits

NUM_PAGES = 24


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype=torch.float32)


def _engine(loaded, config: EngineConfig, device: str, dtype: torch.dtype) -> Engine:
    return Engine(
        loaded.model, loaded.config, loaded.tokenizer, device=torch.device(device), dtype=dtype, config=config
    )


def test_bucket_sizes():
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(5) == (1, 2, 4, 8)
    assert bucket_sizes(256) == (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
    sizes = bucket_sizes(256)
    for b in range(16, 257):  # from 16 rows on, padding stays within half the real rows
        assert next(x for x in sizes if x >= b) <= 1.5 * b, b
    with pytest.raises(ValueError, match="max_batch"):
        bucket_sizes(0)


def test_needs_a_scratch_page_and_takes_only_decodes(tiny):
    heads = tiny.config.num_attention_heads
    with pytest.raises(ValueError, match="scratch page"):
        DecodeGraphs(tiny.model, heads, KVCache(2, 4, torch.float32, "cpu"), max_batch=4, max_pages=2)
    cache = KVCache(tiny.config.num_hidden_layers, 4, torch.float32, "cpu", scratch_page=True)
    assert cache.scratch_page == 4 and cache.layers[0].shape[0] == 5 and cache.num_pages == 4
    graphs = DecodeGraphs(tiny.model, heads, cache, max_batch=3, max_pages=2, use_graphs=False)
    one = ScheduledSeq("a", (7,), 10, (1,), True, admission=0)
    assert graphs.buckets == (1, 2, 3) and not graphs.pads  # eager: exactly b rows
    assert graphs.supports([one] * 3)
    assert not graphs.supports([one] * 4)  # over max_batch
    assert not graphs.supports([ScheduledSeq("p", (1, 2), 0, (1,), True)])  # a prefill
    assert not graphs.supports([ScheduledSeq("l", (1,), 200, (0, 1, 2, 3), True)])  # 4 pages > 2
    assert not graphs.supports([])
    with pytest.raises(ValueError, match="decode group"):
        graphs.forward([ScheduledSeq("p", (1, 2), 0, (1,), True)])
    with pytest.raises(ValueError, match="outside the cache"):
        graphs.forward([ScheduledSeq("x", (1,), 0, (9,), True, admission=1)])  # page 9 of a 4-page cache
    with pytest.raises(ValueError, match="reach max_batch"):
        DecodeGraphs(tiny.model, heads, cache, max_batch=3, max_pages=2, use_graphs=False, buckets=(1, 2))
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs(tiny.model, heads, cache, max_batch=3, max_pages=2, use_graphs=True)


def _decode_groups(rng: random.Random, n: int) -> tuple[list[ScheduledSeq], list[ScheduledSeq]]:
    """Prefills of n sequences on disjoint pages, then the decode step that follows each."""
    pages = list(range(NUM_PAGES))
    rng.shuffle(pages)
    prefills, decodes = [], []
    for i in range(n):
        length = rng.randint(1, 150)
        table = tuple(pages.pop() for _ in range(length // PAGE_SIZE + 1))  # room for one more token
        prefills.append(
            ScheduledSeq(
                f"r{i}", tuple(rng.randrange(256) for _ in range(length)), 0, table, True, admission=i
            )
        )
        decodes.append(ScheduledSeq(f"r{i}", (rng.randrange(256),), length, table, True, admission=i))
    return prefills, decodes


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_static_bucket_decode_equals_the_plain_runner(tiny, seed: int, batch: int) -> None:
    rng = random.Random(seed)
    layers, heads = tiny.config.num_hidden_layers, tiny.config.num_attention_heads
    plain_cache = KVCache(layers, NUM_PAGES, torch.float32, "cpu", poison=True)
    static_cache = KVCache(layers, NUM_PAGES, torch.float32, "cpu", poison=True, scratch_page=True)
    plain = ModelRunner(tiny.model, heads, plain_cache)
    graphs = DecodeGraphs(
        tiny.model, heads, static_cache, max_batch=8, max_pages=4, use_graphs=False, buckets=bucket_sizes(8)
    )
    static = ModelRunner(tiny.model, heads, static_cache, decode_graphs=graphs)
    routed = record_routing(tiny.model)
    prefills, decodes = _decode_groups(rng, batch)
    for runner in (plain, static):
        runner.compute_logits(BatchPlan(decodes=(), prefills=tuple(prefills)))
    ids_p, logits_p = plain.compute_logits(BatchPlan(decodes=tuple(decodes), prefills=()))
    routed.clear()
    ids_s, logits_s = static.compute_logits(BatchPlan(decodes=tuple(decodes), prefills=()))
    assert sorted(ids_p) == sorted(ids_s) == sorted(s.request_id for s in decodes)
    logits_s = logits_s[[ids_s.index(i) for i in ids_p]]  # rows in the plain runner's order
    assert logits_s.shape == logits_p.shape == (batch, tiny.config.vocab_size)
    assert torch.isfinite(logits_s).all()
    torch.testing.assert_close(logits_s, logits_p, rtol=1e-5, atol=1e-5 * float(logits_p.abs().max()))
    bucket = next(b for b in graphs.buckets if b >= batch)
    for a, b in zip(plain_cache.layers, static_cache.layers):
        real = b[:NUM_PAGES]
        written = ~torch.isnan(a)
        assert torch.equal(written, ~torch.isnan(real)), "the static decode wrote slots the plain one did not"
        torch.testing.assert_close(real[written], a[written], rtol=1e-5, atol=1e-5)
        scratch_rows = (~torch.isnan(b[NUM_PAGES])).all(dim=-1).sum().item()
        assert scratch_rows == (1 if bucket > batch else 0), "padding rows write the scratch slot only"
    # padding rows route to experts the real rows use, and only those
    for ids in routed:  # [bucket, k] per MoE layer
        assert ids.shape[0] == bucket
        assert set(ids[batch:].flatten().tolist()) <= set(ids[:batch].flatten().tolist())


def record_routing(model) -> list[torch.Tensor]:
    """Expert ids [T, k] each MoE layer routes to, after the padding mask (appended per forward)."""
    from mlaserve.worker.model.moe import Experts

    seen: list[torch.Tensor] = []
    for module in model.modules():
        if isinstance(module, Experts):
            module.register_forward_hook(lambda mod, args, out: seen.append(args[1].clone()))
    return seen


def test_engine_greedy_on_padded_buckets_equals_exact_rows(tiny, seed: int) -> None:
    """Variable-length requests with preemption (small cache): the same greedy tokens whether the
    decode rows are padded to buckets or not (and whether the engine overlaps steps or not)."""
    rng = random.Random(seed)
    # six one-page prompts that all cross into a second page while decoding, on 8 pages: preemptions
    lengths = [rng.randint(56, 63) for _ in range(6)] + [rng.randint(3, 120)]
    prompts = [[rng.randrange(256) for _ in range(n)] for n in lengths]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def engine(padded: bool) -> Engine:
        config = EngineConfig(
            cache=CacheConfig(num_pages=8, poison_unused=True),
            scheduler=SchedulerConfig(max_batched_tokens=256, max_running_seqs=6),
            overlap=padded,
        )
        e = _engine(tiny, config, "cpu", torch.float32)
        if padded:  # the graph path's buckets, run eagerly
            e.runner.decode_graphs = DecodeGraphs(
                tiny.model,
                tiny.config.num_attention_heads,
                e.kv_cache,
                max_batch=6,
                max_pages=64,
                use_graphs=False,
                buckets=bucket_sizes(6),
            )
        return e

    plain = engine(False)
    rows = record_logits(plain)
    ref = plain.generate(prompts, params)
    padded = engine(True)
    outs = padded.generate(prompts, params)
    assert padded.runner.decode_graphs.buckets == (1, 2, 4, 8) and padded.num_preemptions > 0
    for i, (o, r) in enumerate(zip(outs, ref, strict=True)):
        assert_same_greedy(r.token_ids, rows[r.request_id], o.token_ids, f"prompt {i}")
        assert o.finish_reason == r.finish_reason


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and backend() == "sm90"


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs a Hopper GPU and the compiled sm90 kernel")
def test_gpu_graph_replay_equals_eager(seed: int) -> None:
    """bf16 tiny model on the H200: each bucket's replayed graph gives the eager static forward's logits
    (same kernels, same inputs), and the greedy tokens of the engine with graphs equal those without."""
    loaded = load_model("tiny", device="cuda", dtype=torch.bfloat16)
    rng = random.Random(seed)
    layers, heads = loaded.config.num_hidden_layers, loaded.config.num_attention_heads
    cache = KVCache(layers, NUM_PAGES, torch.bfloat16, "cuda", poison=True, scratch_page=True)
    graphs = DecodeGraphs(loaded.model, heads, cache, max_batch=8, max_pages=4, use_graphs=True)
    eager = DecodeGraphs(loaded.model, heads, cache, max_batch=8, max_pages=4, use_graphs=False)
    prefill_runner = ModelRunner(loaded.model, heads, cache)
    prefills, decodes = _decode_groups(rng, 5)
    prefill_runner.compute_logits(BatchPlan(decodes=(), prefills=tuple(prefills)))
    out = graphs.forward(decodes)  # captures bucket 8, then replays it
    replayed, greedy = out.logits.clone(), out.greedy.clone()
    assert graphs.captured == (8,)
    ref = eager.forward(decodes)  # rewrites the same latents, then the same attention
    assert [s.request_id for s in out.seqs] == [s.request_id for s in ref.seqs]
    reference = ref.logits
    assert torch.isfinite(replayed).all()
    assert torch.equal(greedy[0], replayed.argmax(dim=-1)) and not greedy[1].any()
    scale = float(reference.abs().max())  # (MoE index_add_ sums in a nondeterministic order)
    torch.testing.assert_close(replayed, reference, rtol=2e-2, atol=2e-2 * scale)

    prompts = [[rng.randrange(256) for _ in range(rng.randint(3, 120))] for _ in range(7)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outs, rows = {}, {}
    for use in (False, True):
        config = EngineConfig(cache=CacheConfig(num_pages=64), decode_graphs=use, overlap=use)
        engine = _engine(loaded, config, "cuda", torch.bfloat16)
        if not use:
            rows = record_logits(engine)
        outs[use] = engine.generate(prompts, params)
        if use:  # every bucket captured at start-up
            graphs_used = engine.runner.decode_graphs
            assert graphs_used is not None and graphs_used.captured == graphs_used.buckets
    for i, (o, r) in enumerate(zip(outs[True], outs[False], strict=True)):
        # bf16 with padded batch shapes: a divergence only at a near-tie of the reference
        for k, (a, b) in enumerate(zip(r.token_ids, o.token_ids, strict=True)):
            if a != b:
                top2 = rows[r.request_id][k].float().topk(2).values
                scale = float(rows[r.request_id][k].float().abs().max())
                assert float(top2[0] - top2[1]) <= 2e-2 * scale, f"prompt {i}: token {k} differs ({b} vs {a})"
                break
