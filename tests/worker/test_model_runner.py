"""ModelRunner: prefill packing, the one-buffer host -> device transfer, and left-padded prefill
batches against the same sequences run one per forward (tiny preset, CPU, float32)."""

from __future__ import annotations

import random

import pytest
import torch

from mlaserve.worker.attention_metadata import CacheWrite
from mlaserve.worker.config import PAGE_SIZE, CacheConfig, EngineConfig, SchedulerConfig
from mlaserve.worker.engine import Engine
from mlaserve.worker.kv_cache import KVCache
from mlaserve.worker.model import load_model
from mlaserve.worker.model_runner import ModelRunner, build_inputs, pack_prefills, to_device
from mlaserve.worker.scheduler import BatchPlan, ScheduledSeq
from mlaserve.worker.types import SamplingParams
from tests.worker.test_engine import assert_same_greedy, record_logits


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype=torch.float32)


def seq(
    rid: str, num_new: int, start: int = 0, pages: tuple[int, ...] = (), sample: bool = True
) -> ScheduledSeq:
    return ScheduledSeq(rid, tuple(range(num_new)), start, pages, sample)


@pytest.mark.parametrize("max_padding", [0.0, 0.25, 1.0, 10.0])
def test_pack_prefills_partitions_within_the_padding_allowance(seed: int, max_padding: float) -> None:
    rng = random.Random(seed)
    prefills = [seq(f"r{i}", rng.choice([2, 3, 5, 8, 9, 30, 31])) for i in range(rng.randint(1, 25))]
    groups = pack_prefills(prefills, max_padding)
    flat = [s.request_id for g in groups for s in g]
    assert sorted(flat) == sorted(s.request_id for s in prefills)  # each prefill exactly once
    for g in groups:
        longest = max(s.num_new for s in g)
        assert g[0].num_new == longest
        real = sum(s.num_new for s in g)
        assert len(g) * longest - real <= max_padding * real + 1e-9
    if max_padding == 0.0:  # exactly the groups of equal lengths
        lengths = {s.num_new for s in prefills}
        assert sorted(tuple(sorted(s.request_id for s in g)) for g in groups) == sorted(
            tuple(sorted(s.request_id for s in prefills if s.num_new == n)) for n in lengths
        )
    if max_padding >= 10.0:  # the longest is at most 11x any other one here: one forward
        assert len(groups) == 1


def test_to_device_round_trips_both_dtypes(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randint(-(2**62), 2**62, (int(torch.randint(1, 50, (1,), generator=gen)),), generator=gen)
    narrow = torch.randint(
        -(2**31), 2**31 - 1, (int(torch.randint(0, 50, (1,), generator=gen)),), generator=gen
    )
    w, n = to_device(wide, narrow.to(torch.int32), torch.device("cpu"))
    assert w.dtype == torch.int64 and n.dtype == torch.int32
    assert torch.equal(w, wide) and torch.equal(n, narrow.to(torch.int32))


def test_build_inputs_left_pads(seed: int) -> None:
    rng = random.Random(seed)
    group = []
    for i in range(4):
        start = rng.randrange(0, 130)
        n = rng.randint(1, 70)
        pages = tuple(rng.sample(range(100), -(-(start + n) // PAGE_SIZE)))
        group.append(ScheduledSeq(f"r{i}", tuple(rng.randrange(256) for _ in range(n)), start, pages, True))
    x = build_inputs(group, torch.device("cpu"), 100 * PAGE_SIZE)
    s_q = max(s.num_new for s in group)
    width = max(len(s.page_table) for s in group)
    assert x.input_ids.shape == x.positions.shape == x.slot_mapping.shape == (4, s_q)
    assert x.block_table.shape == (4, width) and x.cache_seqlens.tolist() == [s.seqlen for s in group]
    for i, s in enumerate(group):
        pad = s_q - s.num_new
        assert x.slot_mapping[i, :pad].tolist() == [-1] * pad
        assert x.input_ids[i, pad:].tolist() == list(s.token_ids)
        assert x.positions[i, pad:].tolist() == list(range(s.start, s.seqlen))
        expect = [s.page_table[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE for p in range(s.start, s.seqlen)]
        assert x.slot_mapping[i, pad:].tolist() == expect
        assert x.block_table[i].tolist() == list(s.page_table) + [0] * (width - len(s.page_table))
    # the host-checked cache write equals the one the model derives from slot_mapping on the device
    derived = CacheWrite.from_slot_mapping(x.slot_mapping, 100 * PAGE_SIZE)
    assert torch.equal(x.cache_write.slots, derived.slots)
    assert (x.cache_write.rows is None) == (derived.rows is None)
    if derived.rows is not None:
        assert torch.equal(x.cache_write.rows, derived.rows)
    with pytest.raises(ValueError, match="slot_mapping holds slot"):
        build_inputs(group, torch.device("cpu"), int(x.slot_mapping.max()))  # the top slot is one past


def test_build_inputs_without_padding_writes_every_row(seed: int) -> None:
    rng = random.Random(seed)
    group = [
        ScheduledSeq(f"r{i}", (rng.randrange(256),), 70, (rng.randrange(9), 9 + i), True) for i in range(3)
    ]
    x = build_inputs(group, torch.device("cpu"), 12 * PAGE_SIZE)
    assert x.cache_write.rows is None
    assert x.cache_write.slots.tolist() == [(9 + i) * PAGE_SIZE + 6 for i in range(3)]


def test_padded_prefill_batch_equals_one_forward_per_sequence(tiny, seed: int) -> None:
    """Prefills of different lengths (fresh prompts and second chunks over a cached first chunk)
    in one left-padded forward give the logits and cache rows of one forward per sequence."""
    rng = random.Random(seed)
    layers = tiny.config.num_hidden_layers
    heads = tiny.config.num_attention_heads
    caches = [KVCache(layers, 16, torch.float32, "cpu", poison=True) for _ in range(2)]
    batched = ModelRunner(tiny.model, heads, caches[0], max_padding=100.0)
    alone = ModelRunner(tiny.model, heads, caches[1], group_prefills=False)
    pages = list(range(16))
    rng.shuffle(pages)
    firsts, seconds = [], []
    for i in range(4):
        n1, n2 = rng.randint(2, 70), rng.randint(2, 40)
        tokens = [rng.randrange(256) for _ in range(n1 + n2)]
        table = tuple(pages.pop() for _ in range(-(-(n1 + n2) // PAGE_SIZE)))
        firsts.append(ScheduledSeq(f"r{i}", tuple(tokens[:n1]), 0, table, sample=i % 2 == 0))
        seconds.append(ScheduledSeq(f"r{i}", tuple(tokens[n1:]), n1, table, sample=True))
    for chunk in (firsts, seconds):
        plan = BatchPlan(decodes=(), prefills=tuple(chunk))
        ids_b, logits_b = batched.compute_logits(plan)
        ids_a, logits_a = alone.compute_logits(plan)
        assert sorted(ids_b) == sorted(ids_a) == sorted(s.request_id for s in chunk if s.sample)
        order = [ids_b.index(i) for i in ids_a]
        torch.testing.assert_close(
            logits_b[order], logits_a, rtol=1e-5, atol=1e-5 * float(logits_a.abs().max())
        )
    assert batched.num_forwards == 2 and alone.num_forwards == 8
    for a, b in zip(caches[0].layers, caches[1].layers):
        written = ~torch.isnan(b)
        assert torch.equal(written, ~torch.isnan(a)), "the padded batch wrote other slots"
        torch.testing.assert_close(a[written], b[written], rtol=1e-5, atol=1e-5)


def test_engine_greedy_with_padded_prefills_equals_alone(tiny, seed: int) -> None:
    rng = random.Random(seed)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(5, 90))] for _ in range(8)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    def engine(max_padding: float) -> Engine:
        config = EngineConfig(
            cache=CacheConfig(num_pages=32, poison_unused=True),
            scheduler=SchedulerConfig(max_batched_tokens=512),
            prefill_max_padding=max_padding,
        )
        return Engine(
            tiny.model,
            tiny.config,
            tiny.tokenizer,
            device=torch.device("cpu"),
            dtype=torch.float32,
            config=config,
        )

    alone = engine(0.0)
    rows = record_logits(alone)
    ref = [alone.generate([p], params)[0] for p in prompts]
    padded = engine(2.0)
    outs = padded.generate(prompts, params)
    assert padded.runner.num_forwards < len(prompts) + params.max_tokens  # prefills did share forwards
    for i, (o, r) in enumerate(zip(outs, ref)):
        assert_same_greedy(r.token_ids, rows[r.request_id], o.token_ids, f"prompt {i}")
