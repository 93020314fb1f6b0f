"""The overlapped engine (step N + 1 launched before step N's tokens are read) against the engine that
waits for every step, on the tiny preset (CPU, float32, reference kernel), and the host cost of a
decode step at batch 256 with a 2,560-page table (a stubbed model: the Python around it)."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from mlaserve.worker.config import CacheConfig, EngineConfig, SchedulerConfig
from mlaserve.worker.engine import Engine
from mlaserve.worker.model import load_model
from mlaserve.worker.model_runner import LaunchedStep
from mlaserve.worker.types import FinishReason, SamplingParams
from tests.worker.test_engine import BYTE_TOKENS, assert_same_greedy, random_prompts, record_logits
from tests.worker.test_engine import make_engine as make_tiny_engine


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype=torch.float32)


def make_engine(loaded, *, overlap: bool, num_pages: int) -> Engine:
    return make_tiny_engine(
        loaded, overlap=overlap, num_pages=num_pages, max_batched_tokens=256, max_running_seqs=12
    )


def workload(rng: random.Random, eos_of_ref: list[tuple[int, ...]] | None = None):
    """Prompts (every third shares a prefix page) with a mix of greedy and seeded sampling, stop
    strings and stop token ids."""
    prompts = random_prompts(rng, 14, lo=30, hi=64)
    params = []
    for i in range(len(prompts)):
        kind = i % 4
        if kind == 0:
            params.append(SamplingParams(max_tokens=rng.randrange(8, 30), temperature=0.0, ignore_eos=True))
        elif kind == 1:
            params.append(
                SamplingParams(
                    max_tokens=rng.randrange(8, 30),
                    temperature=0.9,
                    top_p=0.9,
                    seed=rng.randrange(2**31),
                    ignore_eos=True,
                )
            )
        elif kind == 2:  # a stop token id that greedy decoding of byte tokens is likely to meet
            params.append(
                SamplingParams(
                    max_tokens=30, temperature=0.0, stop_token_ids=tuple(rng.sample(range(256), 40))
                )
            )
        else:
            params.append(SamplingParams(max_tokens=30, temperature=0.0, stop=("a", "e", " ")))
    return prompts, params


def run_stream(engine: Engine, prompts, params, abort_after: dict[str, int]) -> dict[str, dict]:
    """Adds the requests two at a time while others decode; aborts a request once its stream has
    shown abort_after[id] tokens. Returns each request's tokens, text and final delta."""
    out: dict[str, dict] = defaultdict(lambda: {"tokens": [], "text": "", "final": None})
    queue = [(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    while queue or engine.has_unfinished():
        for rid, p, sp in queue[:2]:
            engine.add_request(rid, p, sp)
        queue = queue[2:]
        for d in engine.step():
            o = out[d.request_id]
            assert o["final"] is None, f"{d.request_id}: a delta after the final one"
            o["tokens"] += d.token_ids
            o["text"] += d.text
            if d.finished:
                o["final"] = d
            elif abort_after.get(d.request_id) == len(o["tokens"]):
                assert engine.abort(d.request_id)
    engine.scheduler.check_integrity()
    engine.runner.decode_graphs.batch.check_integrity()
    assert engine.allocator.num_used == 0 and engine.scheduler.num_pending == 0
    return out


def test_overlap_equals_waiting_engine(tiny, seed: int) -> None:
    """Greedy, seeded, stop tokens, stop strings, prefix hits, preemption and mid-stream aborts:
    the overlapped engine streams what the waiting one streams."""
    rng = random.Random(seed)
    # About 4 in 10 workloads finish without a preemption on 10 pages: draw again (same rng) until the
    # waiting engine has preempted, so that every seed tests preemption.
    for _ in range(10):
        prompts, params = workload(rng)
        abort_after = {f"r{i}": rng.randrange(1, 6) for i in rng.sample(range(len(prompts)), 3)}
        waiting = make_engine(tiny, overlap=False, num_pages=10)
        rows = record_logits(waiting)
        ref = run_stream(waiting, prompts, params, abort_after)
        if waiting.num_preemptions > 0:
            break
    overlapped = make_engine(tiny, overlap=True, num_pages=10)
    got = run_stream(overlapped, prompts, params, abort_after)
    # Which requests are preempted, and which prefix pages are still cached when a request (re)starts, depend
    # on when pages are freed, which the overlapped engine does a step later: both are asserted to happen,
    # not to match (fresh seeds found both counts differing, with equal tokens).
    assert waiting.num_preemptions > 0, "the small cache must preempt"
    assert sum(o["final"].usage.cached_tokens for o in got.values()) > 0, "no prefix hit"
    reasons = {o["final"].finish_reason for o in ref.values()}
    assert {FinishReason.STOP, FinishReason.LENGTH, FinishReason.ABORT} <= reasons
    for i, sp in enumerate(params):
        rid = f"r{i}"
        r, g = ref[rid], got[rid]
        if sp.greedy:
            assert_same_greedy(r["tokens"], rows[rid], g["tokens"], rid)
            if g["tokens"] != r["tokens"]:
                continue  # a near-tie of the reference: nothing after it is comparable
        else:  # the same counter-based draws: the same tokens
            assert g["tokens"] == r["tokens"], rid
        assert g["text"] == r["text"], rid
        assert g["final"].finish_reason == r["final"].finish_reason, rid
        assert g["final"].usage.prompt_tokens == r["final"].usage.prompt_tokens, rid
        assert g["final"].usage.completion_tokens == r["final"].usage.completion_tokens, rid


def test_steps_overlap_and_a_stopped_row_is_dropped(tiny) -> None:
    """step() launches step N + 1 before it reads step N's tokens; a request that stops at step N
    was also in step N + 1 (one wasted row), whose token never reaches its stream."""
    (ref,) = make_engine(tiny, overlap=False, num_pages=16).generate(
        [[8, 9]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    )
    engine = make_engine(tiny, overlap=True, num_pages=16)
    events: list[str] = []
    launch, results = engine.runner.launch, LaunchedStep.results

    def logged_launch(*args, **kwargs):
        step = launch(*args, **kwargs)
        events.append(f"launch {len(step.seqs)}")
        return step

    def logged_results(self):
        events.append("read")
        return results(self)

    engine.runner.launch = logged_launch  # type: ignore[method-assign]
    LaunchedStep.results = logged_results  # type: ignore[method-assign]
    try:
        engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        engine.add_request("b", [8, 9], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        first = engine.step()
        assert first == [] and events == ["launch 2"]  # nothing read yet
        tokens: dict[str, list[int]] = defaultdict(list)
        while engine.has_unfinished():
            for d in engine.step():
                tokens[d.request_id] += d.token_ids
        assert tokens["b"] == list(ref.token_ids)
        assert len(tokens["a"]) == 3
        # every read follows the next launch, except when nothing was left to launch
        for i, e in enumerate(events):
            if e == "read" and i + 1 < len(events):
                assert events[i - 1].startswith("launch"), events
    finally:
        LaunchedStep.results = results  # type: ignore[method-assign]


def test_nan_row_aborts_one_request_one_step_late(tiny) -> None:
    engine = make_engine(tiny, overlap=True, num_pages=16)
    compute = engine.runner.compute_logits
    calls = {"n": 0}

    def poisoned(plan):
        ids, logits = compute(plan)
        calls["n"] += 1
        if "bad" in ids and calls["n"] == 3:
            logits = logits.clone()
            logits[ids.index("bad"), 3] = float("nan")
        return ids, logits

    engine.runner.compute_logits = poisoned  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine.add_request("good", [1, 2, 3], params)
    engine.add_request("bad", [4, 5, 6], params)
    finals, counts = {}, defaultdict(int)
    while engine.has_unfinished():
        for d in engine.step():
            counts[d.request_id] += len(d.token_ids)
            if d.finished:
                finals[d.request_id] = d
    assert finals["bad"].finish_reason is FinishReason.ABORT and counts["bad"] == 2
    assert finals["good"].finish_reason is FinishReason.LENGTH and counts["good"] == 6
    engine.scheduler.check_integrity()
    assert engine.allocator.num_used == 0


# ---- host cost -------------------------------------------------------------------------------------
class StubModel(torch.nn.Module):
    """forward() returns logits that make every row emit (position % 200): no model math at all."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, positions, kv_caches, meta, *, only_last=False):
        b, s = input_ids.shape
        logits = torch.zeros(b, 1, self.vocab)
        logits[torch.arange(b), 0, (positions[:, -1] % 200)] = 1.0
        return logits


class ByteTokenizer:
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")


def test_host_cost_of_a_decode_step_at_batch_256_with_a_2560_page_table() -> None:
    """The engine's Python per decode step (schedule, input patches, sampling, postprocessing) at
    b = 256 and deepseek-v2-lite's 2,560-page table width, with the model stubbed out. Rebuilding the
    block table from Python lists every step cost ~70 ms here; the persistent batch sends only what
    changed. Printed as a benchmark number, asserted loosely (a return of the rebuild fails)."""
    b, vocab = 256, 256
    cfg = SimpleNamespace(
        vocab_size=vocab,
        max_position_embeddings=2560 * 64,
        num_hidden_layers=1,
        num_attention_heads=16,
        eos_token_id=None,
    )
    config = EngineConfig(
        cache=CacheConfig(num_pages=b * 4, enable_prefix_caching=True),
        scheduler=SchedulerConfig(max_running_seqs=b, max_batched_tokens=b * 64),
    )
    engine = Engine(
        StubModel(vocab), cfg, ByteTokenizer(), device=torch.device("cpu"), dtype=torch.float32, config=config
    )
    assert engine.runner.decode_graphs.max_pages == 2560
    rng = random.Random(0)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for i in range(b):
        engine.add_request(
            f"r{i}", [rng.randrange(BYTE_TOKENS) for _ in range(rng.randint(100, 180))], params
        )
    for _ in range(4):  # prefill, then the batch decodes
        engine.step()
    assert engine.scheduler.num_running == b
    sent_before = engine.runner.decode_graphs.batch.pages_sent
    times = []
    for _ in range(24):
        t0 = time.perf_counter()
        deltas = engine.step()
        times.append(time.perf_counter() - t0)
        assert len(deltas) == b
    per_step_ms = 1e3 * sorted(times)[len(times) // 2]
    pages = engine.runner.decode_graphs.batch.pages_sent - sent_before
    print(
        f"host time per decode step at b={b}, 2560-page table, stubbed model: {per_step_ms:.2f} ms (median)"
    )
    assert pages <= b * 2, f"{pages} page ids sent in 24 steady decode steps: only new pages should travel"
    assert per_step_ms < 50.0, f"{per_step_ms:.1f} ms of host time per decode step"
