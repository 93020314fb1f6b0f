"""Engine on the tiny preset (CPU, float32, reference kernel): batching invariance under preemption
and prefix caching, streaming, stop rules, abort, validation and load reports."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
import torch

from mlaserve.worker.config import CacheConfig, EngineConfig, SchedulerConfig
from mlaserve.worker.engine import Engine
from mlaserve.worker.errors import RequestError
from mlaserve.worker.model import load_model
from mlaserve.worker.page_allocator import prefix_page_hashes
from mlaserve.worker.types import FinishReason, RequestOutput, SamplingParams

BYTE_TOKENS = 256  # the tiny preset's byte tokenizer: ids < 256 are bytes


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype=torch.float32)


def make_engine(
    loaded,
    *,
    num_pages: int = 64,
    prefix: bool = True,
    max_batched_tokens: int = 512,
    overlap: bool = True,
    **kw,
) -> Engine:
    config = EngineConfig(
        cache=CacheConfig(num_pages=num_pages, poison_unused=True, enable_prefix_caching=prefix),
        scheduler=SchedulerConfig(max_batched_tokens=max_batched_tokens, **kw),
        overlap=overlap,
    )
    return Engine(
        loaded.model,
        loaded.config,
        loaded.tokenizer,
        device=torch.device("cpu"),
        dtype=torch.float32,
        config=config,
    )


def record_logits(engine: Engine) -> dict[str, list[torch.Tensor]]:
    """Wraps the engine's sampler: request id -> the logits row of each token it sampled."""
    rows: dict[str, list[torch.Tensor]] = defaultdict(list)
    sample = engine.sampler.sample

    def recording(logits, states, request_ids=()):
        for request_id, row in zip(request_ids, logits):
            rows[request_id].append(row.clone())
        return sample(logits, states, request_ids)

    engine.sampler.sample = recording  # type: ignore[method-assign]
    return rows


def assert_same_greedy(ref_tokens, ref_logits: list[torch.Tensor], tokens, what: str) -> None:
    """Greedy outputs must be equal; a divergence is accepted only at an exact-arithmetic near-tie
    of the reference (top-2 logits within 1e-5 of the logit scale), after which nothing is compared."""
    ref_tokens, tokens = list(ref_tokens), list(tokens)
    for k, (a, b) in enumerate(zip(ref_tokens, tokens)):
        if a != b:
            top2 = ref_logits[k].topk(2).values
            margin = float(top2[0] - top2[1])
            scale = float(ref_logits[k].abs().max())
            assert margin <= 1e-5 * scale, (
                f"{what}: token {k} differs ({b} vs {a}), top-2 margin {margin:.3g}"
            )
            return
    assert len(ref_tokens) == len(tokens), f"{what}: {len(tokens)} tokens vs {len(ref_tokens)}"


def random_prompts(rng: random.Random, n: int, lo: int = 1, hi: int = 60) -> list[list[int]]:
    """Every third prompt starts with a shared prefix of at least one full page; the rest of each
    prompt has lo..hi-1 random byte tokens."""
    shared = [rng.randrange(BYTE_TOKENS) for _ in range(rng.randrange(64, 100))]
    prompts = []
    for i in range(n):
        head = list(shared) if i % 3 == 0 else []
        prompts.append(head + [rng.randrange(BYTE_TOKENS) for _ in range(rng.randrange(lo, hi))])
    return prompts


def run_alone(loaded, prompts, params) -> tuple[list[RequestOutput], dict[str, list[torch.Tensor]]]:
    """Each prompt by itself on a roomy engine without prefix caching (the oracle)."""
    engine = make_engine(loaded, num_pages=64, prefix=False)
    rows = record_logits(engine)
    outs = [engine.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    return outs, rows


def test_from_pretrained_tiny_generates_text() -> None:
    engine = Engine.from_pretrained("tiny", num_pages=32)
    assert engine.device.type == "cpu" and engine.dtype == torch.float32
    assert engine.num_pages == 32 and engine.max_model_len == 4096
    (out,) = engine.generate(["Hello, MLA!"], SamplingParams(max_tokens=12, temperature=0.0))
    assert out.prompt_token_ids == tuple(engine.tokenizer.encode("Hello, MLA!"))
    assert 1 <= len(out.token_ids) <= 12 and out.usage.completion_tokens == len(out.token_ids)
    assert out.usage.prompt_tokens == len(out.prompt_token_ids)
    assert out.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert isinstance(out.text, str)


def test_greedy_alone_equals_batch_under_preemption_and_prefix_cache(tiny, seed: int) -> None:
    rng = random.Random(seed)
    # Prompts of 40-63 (+ shared) tokens that generate 26-32: each crosses a page boundary while decoding.
    prompts = random_prompts(rng, 18, lo=40, hi=64)
    params = [
        SamplingParams(max_tokens=rng.randrange(26, 33), temperature=0.0, ignore_eos=True) for _ in prompts
    ]
    ref, ref_rows = run_alone(tiny, prompts, params)

    # 8 pages (512 tokens) for ~18 requests needing ~2 pages each: preemption must happen.
    engine = make_engine(tiny, num_pages=8, max_batched_tokens=256)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    outs = engine.generate([prompts[i] for i in order], [params[i] for i in order])
    assert engine.num_preemptions > 0, "the small cache should have forced preemption"
    assert sum(o.extra["num_preemptions"] for o in outs) == engine.num_preemptions
    for o, i in zip(outs, order):
        assert_same_greedy(ref[i].token_ids, ref_rows[ref[i].request_id], o.token_ids, f"prompt {i}")
        assert o.finish_reason is FinishReason.LENGTH and o.usage.completion_tokens == params[i].max_tokens
        assert o.usage.prompt_tokens == len(prompts[i])
    assert sum(o.usage.cached_tokens for o in outs) > 0, "shared prefixes should have hit the prefix cache"
    engine.scheduler.check_integrity()
    assert engine.allocator.num_used == 0

    # Again on the warm cache: every prompt with a full page now hits it, and nothing changes.
    again = engine.generate(prompts, params)
    for i, o in enumerate(again):
        assert_same_greedy(
            ref[i].token_ids, ref_rows[ref[i].request_id], o.token_ids, f"prompt {i} (warm cache)"
        )
        full_pages = (len(prompts[i]) - 1) // 64
        assert o.usage.cached_tokens <= full_pages * 64
    assert any(o.usage.cached_tokens > 0 for o in again)


def test_seeded_sampling_alone_equals_batch_under_preemption(tiny, seed: int) -> None:
    rng = random.Random(seed)
    prompts = random_prompts(rng, 10, lo=40, hi=64)
    params = [
        SamplingParams(
            max_tokens=rng.randrange(26, 33),
            temperature=0.8,
            top_p=0.9,
            top_k=rng.choice([0, 20]),
            seed=rng.randrange(2**31),
            ignore_eos=True,
        )
        for _ in prompts
    ]
    ref, _ = run_alone(tiny, prompts, params)
    engine = make_engine(tiny, num_pages=6, max_batched_tokens=128)
    outs = engine.generate(prompts, params)
    assert engine.num_preemptions > 0
    # Sampling from nearly equal logits with the same random stream picks the same token unless
    # a draw lands within float rounding of a boundary; exact equality is the expected outcome.
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]


def test_streaming_deltas_add_up_to_the_output(tiny, seed: int) -> None:
    rng = random.Random(seed)
    engine = make_engine(tiny, num_pages=16)
    prompts = {
        f"r{i}": "".join(rng.choice("abcdefgh ") for _ in range(rng.randrange(1, 80))) for i in range(5)
    }
    maxes = {rid: rng.randrange(1, 20) for rid in prompts}
    tokens: dict[str, list[int]] = defaultdict(list)
    text: dict[str, str] = defaultdict(str)
    finals = {}
    pending = dict(prompts)
    while engine.has_unfinished() or pending:
        if pending:  # requests join while others decode
            rid = next(iter(pending))
            engine.add_request(
                rid, pending.pop(rid), SamplingParams(max_tokens=maxes[rid], temperature=0.0, ignore_eos=True)
            )
        for d in engine.step():
            assert d.request_id not in finals, "a delta after the final one"
            tokens[d.request_id] += d.token_ids
            text[d.request_id] += d.text
            if d.finished:
                finals[d.request_id] = d
    for rid in prompts:
        d = finals[rid]
        assert d.finish_reason is FinishReason.LENGTH and len(tokens[rid]) == maxes[rid]
        assert d.usage.completion_tokens == maxes[rid]
        assert d.usage.prompt_tokens == len(engine.tokenizer.encode(prompts[rid]))
        assert text[rid] == engine.tokenizer.decode(tokens[rid])


def test_stop_string_stop_token_and_eos(tiny, seed: int) -> None:
    rng = random.Random(seed)
    engine = make_engine(tiny, num_pages=16)
    prompt = [rng.randrange(BYTE_TOKENS) for _ in range(rng.randrange(5, 40))]
    (ref,) = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    ids = list(ref.token_ids)

    # A stop token id: output ends with its first occurrence (kept in token_ids, not in the text).
    k = rng.randrange(len(ids))
    first = ids.index(ids[k])
    (out,) = engine.generate(
        [prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=(ids[k],))
    )
    assert out.finish_reason is FinishReason.STOP and list(out.token_ids) == ids[: first + 1]
    assert out.text == engine.tokenizer.decode(ids[:first])

    # EOS (the model's EOS id, set here to a token the model emits), and ignore_eos.
    engine.eos_token_id = ids[k]
    (out,) = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0))
    assert out.finish_reason is FinishReason.STOP and list(out.token_ids) == ids[: first + 1]
    (out,) = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    assert list(out.token_ids) == ids

    # A stop string taken from the reference text: the text ends right before its first occurrence.
    full = ref.text
    starts = [i for i in range(len(full) - 1) if "\ufffd" not in full[i : i + 2]]
    if starts:
        stop = full[(s := rng.choice(starts)) : s + 2]
        (out,) = engine.generate(
            [prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=(stop,))
        )
        assert out.finish_reason is FinishReason.STOP
        assert out.text == full[: full.index(stop)]
        assert list(out.token_ids) == ids[: len(out.token_ids)]


def test_abort_frees_pages_and_reports_once(tiny, seed: int) -> None:
    rng = random.Random(seed)
    engine = make_engine(tiny, num_pages=16)
    for i in range(3):
        prompt = [rng.randrange(BYTE_TOKENS) for _ in range(rng.randrange(70, 120))]
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    seen = defaultdict(int)
    for _ in range(3):
        for d in engine.step():
            seen[d.request_id] += len(d.token_ids)
    used = engine.allocator.num_used
    held = len(engine.scheduler.get("r1").page_table)
    assert engine.abort("r1")
    assert engine.allocator.num_used == used - held  # freed at once (its full prompt page may stay cached)
    engine.scheduler.check_integrity()
    assert not engine.abort("r1") and not engine.abort("nope")
    finals = [d for d in engine.step() if d.finished]
    (aborted,) = [d for d in finals if d.request_id == "r1"]
    assert aborted.finish_reason is FinishReason.ABORT and aborted.token_ids == ()
    # three steps: two have been read back (overlap), a third is in flight and dropped by the abort
    assert aborted.usage.completion_tokens == seen["r1"] == 2
    while engine.has_unfinished():
        for d in engine.step():
            assert d.request_id != "r1"
    assert engine.allocator.num_used == 0


def test_nan_logits_abort_only_that_request(tiny) -> None:
    engine = make_engine(tiny, num_pages=16)
    compute = engine.runner.compute_logits

    def poisoned(plan):
        ids, logits = compute(plan)
        logits = logits.clone()  # out of inference mode, so it can be edited
        if "bad" in ids:
            logits[ids.index("bad"), 3] = float("nan")
        return ids, logits

    engine.runner.compute_logits = poisoned  # type: ignore[method-assign]
    engine.add_request("good", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    engine.add_request("bad", [4, 5, 6], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    finals = {}
    while engine.has_unfinished():
        finals.update({d.request_id: d for d in engine.step() if d.finished})
    assert finals["bad"].finish_reason is FinishReason.ABORT
    assert finals["good"].finish_reason is FinishReason.LENGTH and finals["good"].usage.completion_tokens == 4
    engine.scheduler.check_integrity()


def test_add_request_validation_names_the_field(tiny) -> None:
    engine = make_engine(tiny, num_pages=4)  # 256 tokens of cache; the model's context is 4096
    ok = SamplingParams(max_tokens=4)
    cases = [
        ("", "hi", ok, "request_id"),
        ("a", "", ok, "prompt"),
        ("a", [], ok, "prompt"),
        ("a", [1, 2, tiny.config.vocab_size], ok, "prompt"),
        ("a", [1, -1], ok, "prompt"),
        ("a", [1] * 4000, SamplingParams(max_tokens=200), "max_tokens"),  # beyond the model's context
        ("a", [1] * 200, SamplingParams(max_tokens=100), "max_tokens"),  # beyond the whole cache
        ("a", "hi", {"max_tokens": 4}, "sampling"),
    ]
    for request_id, prompt, params, field in cases:
        with pytest.raises(ValueError) as e:
            engine.add_request(request_id, prompt, params)
        assert isinstance(e.value, RequestError) and e.value.field == field, (prompt, e.value)
        assert str(e.value).startswith(field)
    engine.add_request("a", "hi", ok)
    with pytest.raises(RequestError) as e:
        engine.add_request("a", "hi", ok)
    assert e.value.field == "request_id"
    assert not engine.scheduler.waiting_ids()[1:]  # nothing half-added
    with pytest.raises(RequestError) as e:
        engine.generate(["x"], [ok, ok])
    assert e.value.field == "sampling"


def test_load_report(tiny, seed: int) -> None:
    rng = random.Random(seed)
    engine = make_engine(tiny, num_pages=16)
    load = engine.load("w1", 7)
    assert (load.worker_id, load.seq, load.total_pages, load.free_pages) == ("w1", 7, 16, 16)
    assert load.running == load.waiting == 0 and load.tokens_per_s == 0.0
    prompt = [rng.randrange(BYTE_TOKENS) for _ in range(150)]
    engine.add_request("a", prompt, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    engine.add_request("b", [1, 2], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    load = engine.load()
    assert load.waiting == 2 and load.queued_prompt_tokens == 152 and load.free_pages == 16
    engine.step()
    load = engine.load()
    assert load.running == 2 and load.waiting == 0 and load.free_pages == 16 - 3 - 1
    assert load.reserved_pages == 0  # 155 tokens fit the 3 pages a already holds; b's 7 fit its page
    while engine.has_unfinished():
        engine.step()
    load = engine.load()
    assert load.free_pages == 16 and load.tokens_per_s > 0
    assert load.cached_page_hashes == frozenset(prefix_page_hashes(prompt)[:2])


@pytest.mark.gpu
def test_gpu_bf16_greedy_and_seeded_alone_equal_batch_under_preemption(seed: int) -> None:
    """On the Hopper kernel in bf16: batching, preemption and prefix hits change no output."""
    loaded = load_model("tiny", device="cuda", dtype=torch.bfloat16)

    def engine(num_pages: int, prefix: bool) -> Engine:
        config = EngineConfig(
            cache=CacheConfig(num_pages=num_pages, enable_prefix_caching=prefix),
            scheduler=SchedulerConfig(max_batched_tokens=256),
        )
        return Engine(
            loaded.model,
            loaded.config,
            loaded.tokenizer,
            device=torch.device("cuda"),
            dtype=torch.bfloat16,
            config=config,
        )

    rng = random.Random(seed)
    prompts = random_prompts(rng, 18, lo=40, hi=64)
    greedy = [
        SamplingParams(max_tokens=rng.randrange(26, 33), temperature=0.0, ignore_eos=True) for _ in prompts
    ]
    sampled = [
        SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True)
        for i in range(len(prompts))
    ]
    alone = engine(64, prefix=False)
    batched = engine(8, prefix=True)
    for params in (greedy, sampled):
        ref = [alone.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
        assert [o.token_ids for o in batched.generate(prompts, params)] == ref
    assert batched.num_preemptions > 0
    batched.scheduler.check_integrity()
