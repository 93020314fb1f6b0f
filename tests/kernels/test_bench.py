"""The side-by-side kernel bench (worker/kernels/bench.py, sidebyside.py).

CPU: the grids and FlashMLA's varlen draws (against the formula run on Python's global `random`), the
paged cache's NaN poisoning, detection of both forms of FlashMLA's API (fake modules over the float32
reference), the no-split plan (against an independent coverage check and a brute-force makespan), the
agreement measure, variant parsing and the summary arithmetic. GPU (marker gpu): one row measured side
by side with our own kernel as the peer, in the current API form, and the no-split plan through the
real kernel against the reference; and the command line end to end with --json.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import types

import pytest
import torch

from mlaserve.worker.kernels import bench, reference, sidebyside
from mlaserve.worker.kernels.sidebyside import CURRENT, ORIGINAL, Agreement, Impl


# ---- a module with FlashMLA's current API form, over any original-form module -------------------
class SchedMeta:
    def __init__(self):
        self.tile_scheduler_metadata = None
        self.num_splits = None
        self.fills = 0


def current_form(inner) -> types.ModuleType:
    """get_mla_metadata() returns an empty object; the first flash_mla_with_kvcache call fills it."""
    mod = types.ModuleType("fake_current_flashmla")
    mod.metas = []

    def get_mla_metadata(*_args, **_kwargs):
        mod.metas.append(SchedMeta())
        return mod.metas[-1], None

    def flash_mla_with_kvcache(
        q,
        k_cache,
        block_table,
        cache_seqlens,
        head_dim_v,
        tile_scheduler_metadata,
        num_splits=None,
        softmax_scale=None,
        causal=False,
    ):
        meta = tile_scheduler_metadata
        assert num_splits is None
        if meta.tile_scheduler_metadata is None:
            h_kv = k_cache.shape[2]
            meta.tile_scheduler_metadata, meta.num_splits = inner.get_mla_metadata(
                cache_seqlens, q.shape[1] * q.shape[2] // h_kv, h_kv
            )
            meta.fills += 1
        out, lse = inner.flash_mla_with_kvcache(
            q,
            k_cache,
            block_table,
            cache_seqlens,
            head_dim_v,
            meta.tile_scheduler_metadata,
            meta.num_splits,
            softmax_scale=softmax_scale,
            causal=causal,
        )
        return out, lse.transpose(1, 2).contiguous()  # [b, s_q, h_q]: the bench accepts either layout

    mod.get_mla_metadata = get_mla_metadata
    mod.flash_mla_with_kvcache = flash_mla_with_kvcache
    return mod


# ---- lengths and grids --------------------------------------------------------------------------
@pytest.mark.parametrize("s_k,s_q", [(4096, 1), (8192, 2), (16384, 1)])
def test_varlen_draws_are_flashmlas(s_k, s_q):
    state = random.getstate()
    try:
        random.seed(0)
        expected = [max(int(random.normalvariate(s_k, s_k / 2)), s_q) for _ in range(128)]
        random.seed(12345)
        before = random.random()
        random.seed(12345)
        got = sidebyside.flashmla_varlen(s_k, s_q, 128)
        assert random.random() == before, "the global random stream must not be touched"
    finally:
        random.setstate(state)
    assert got == expected
    assert min(got) >= s_q


def test_varlen_4k_total_matches_the_profiled_row():
    # the Nsight reports of 2026-12-01 (1/64/4k varlen) imply 8301 pages: FlashMLA's tensor-pipe share
    # there is exactly these FLOPs over its duration
    lens = sidebyside.flashmla_varlen(4096, 1, 128)
    assert sum(lens) == 526961 and sum((n + 63) // 64 for n in lens) == 8301


def test_serving_lengths():
    for mix in sidebyside.SERVING_MIXES:
        lens = sidebyside.serving_lengths(mix, 4096)
        assert all(256 <= n <= 4096 for n in lens)
        assert lens[:16] == sidebyside.serving_lengths(mix, 16)  # same seed, same prefix
    c600 = sidebyside.serving_lengths("c600", 4096)
    assert 550 < sum(c600) / len(c600) < 700
    u4k = sidebyside.serving_lengths("u4k", 4096)
    assert 2000 < sum(u4k) / len(u4k) < 2350 and max(u4k) > 4000 and min(u4k) < 300
    with pytest.raises(ValueError, match="c700"):
        sidebyside.serving_lengths("c700", 4)


def test_grids():
    rows = bench.standard_rows()
    assert len(rows) == 48 and len({(r.s_q, r.h_q, r.ctx) for r in rows}) == 48
    assert all(r.b == 128 for r in rows)
    assert sum(r.compute_bound for r in rows) == 18  # s_q*h_q in {128, 256}
    assert all(r.compute_bound == (r.s_q * r.h_q >= 128) for r in rows)
    quick = bench.standard_rows(quick=True)
    assert len(quick) == 8 and set(quick) <= set(rows)
    serving = bench.serving_rows()
    assert len(serving) == 32
    assert {r.b for r in serving} == {1, 16, 64, 256} and {r.ctx for r in serving} == {"c600", "u4k"}
    row = bench.Row("standard", 2, 64, "x", (100, 28))
    assert row.nbytes == (128 * 576 + 2 * 2 * 64 * 1088) * 2
    assert row.flops == 2 * 2 * 64 * 128 * 1088


# ---- the paged cache --------------------------------------------------------------------------
def test_cache_is_nan_exactly_where_no_request_reads():
    lengths = [1, 64, 65, 130, 0, 200]
    cache = sidebyside.build_cache(lengths, h_kv=2, device="cpu", seed=3)
    k, bt = cache.k_cache, cache.block_table
    nan_page = torch.isnan(k.float()).flatten(2).any(-1)  # [pages, 64]
    used = torch.zeros_like(nan_page)
    for i, n in enumerate(lengths):
        for p in range((n + 63) // 64):
            used[int(bt[i, p]), : min(64, n - 64 * p)] = True
    assert not nan_page[used].any(), "a slot a request reads holds NaN"
    assert nan_page[~used].all(), "an unused slot is not NaN"
    # every used page appears once; entries past a request's pages point at all-NaN pages
    ids = [int(bt[i, p]) for i, n in enumerate(lengths) for p in range((n + 63) // 64)]
    assert len(ids) == len(set(ids))
    for i, n in enumerate(lengths):
        for p in range((n + 63) // 64, bt.shape[1]):
            assert nan_page[int(bt[i, p])].all()
    assert cache.seqlens.tolist() == lengths


# ---- FlashMLA's API forms -------------------------------------------------------------------
def test_api_form_detection():
    assert sidebyside.api_form(current_form(reference)) == CURRENT
    assert sidebyside.api_form(reference) == ORIGINAL
    from mlaserve.worker.kernels import sm90

    assert sidebyside.api_form(sm90) == ORIGINAL
    # *args only, but it needs them: told apart by calling it
    odd = types.ModuleType("odd")

    def needs_args(*args):
        if not args:
            raise TypeError("cache_seqlens is required")
        return reference.get_mla_metadata(*args)

    odd.get_mla_metadata = needs_args
    odd.flash_mla_with_kvcache = reference.flash_mla_with_kvcache
    assert sidebyside.api_form(odd) == ORIGINAL
    with pytest.raises(ValueError, match="flash_mla_with_kvcache"):
        sidebyside.api_form(types.SimpleNamespace(__name__="half", get_mla_metadata=needs_args))
    liar = types.ModuleType("liar")
    liar.get_mla_metadata = lambda *a: (
        torch.zeros(1, 8, dtype=torch.int32),
        torch.zeros(2, dtype=torch.int32),
    )
    liar.flash_mla_with_kvcache = reference.flash_mla_with_kvcache
    with pytest.raises(ValueError, match="tensors"):
        sidebyside.api_form(liar)


def test_both_forms_compute_the_same_row_and_the_metadata_is_filled_once():
    gen = torch.Generator().manual_seed(0)
    lengths = [70, 2, 300, 129]
    cache = sidebyside.build_cache(lengths, device="cpu", seed=1)
    q = torch.randn(len(lengths), 2, 16, 576, generator=gen).to(torch.bfloat16)
    fake = current_form(reference)
    cur = Impl("cur", fake, CURRENT)
    orig = Impl("orig", reference, ORIGINAL)
    call_c, splits_c = cur.prepare(cache, q)
    call_o, splits_o = orig.prepare(cache, q)
    assert splits_c is None and splits_o.tolist() == list(range(len(lengths) + 1))
    out_c, lse_c = call_c()
    out_o, lse_o = call_o()
    call_c()
    assert len(fake.metas) == 1 and fake.metas[0].fills == 1  # filled by prepare's call, then reused
    a = sidebyside.agreement(out_c, lse_c, out_o, lse_o)
    assert a.ok and a.out_rel == 0.0 and a.lse_abs == 0.0
    # no NaN reached the outputs although every unused slot holds NaN
    assert not torch.isnan(out_o.float()).any() and torch.isfinite(lse_o).all()


def test_knob_env_restores(monkeypatch):
    monkeypatch.setenv("MLASERVE_MLA_PDL", "1")
    monkeypatch.delenv("MLASERVE_MLA_SCHED", raising=False)
    with sidebyside.knob_env({"MLASERVE_MLA_PDL": "0", "MLASERVE_MLA_SCHED": "even"}):
        assert os.environ["MLASERVE_MLA_PDL"] == "0" and os.environ["MLASERVE_MLA_SCHED"] == "even"
    assert os.environ["MLASERVE_MLA_PDL"] == "1" and "MLASERVE_MLA_SCHED" not in os.environ


# ---- the no-split plan ----------------------------------------------------------------------
def check_plan(lengths, rows, splits, num_parts):
    """Independent reading of the metadata format (csrc/tile_scheduler.h): every request's pages are
    covered once, in one piece, and num_splits counts one split per non-empty request."""
    pages = [(n + 63) // 64 for n in lengths]
    assert len(rows) == num_parts and all(len(r) == 8 for r in rows)
    covered = [[] for _ in lengths]
    for first, first_page, last, end_page, split, *rest in rows:
        assert rest == [0, 0, 0]
        for r in range(first, last + 1):
            lo = first_page if r == first else 0
            hi = min(end_page, pages[r]) if r == last else pages[r]
            if lo < hi:
                covered[r].append((lo, hi, split if r == first else 0))
    for i, n in enumerate(pages):
        assert covered[i] == ([(0, n, 0)] if n else []), f"request {i}"
    assert splits == [0, *itertools.accumulate(1 if p else 0 for p in pages)]


def brute_makespan(cost, parts):
    best = math.inf
    n = len(cost)
    for k in range(1, min(parts, n) + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            bounds = [0, *cuts, n]
            best = min(best, max(sum(cost[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_no_split_plan(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([0, 1, 64, 65, rng.randint(1, 3000)]) for _ in range(rng.randint(1, 8))]
    parts = rng.randint(1, 5)
    rows, splits = sidebyside.no_split_plan(lengths, parts)
    check_plan(lengths, rows, splits, parts)
    cost = [(n + 63) // 64 + 2 if n else 0 for n in lengths]
    loads = [sum(cost[r[0] : r[2] + 1]) for r in rows if r[2] >= 0]
    assert max(loads, default=0) == brute_makespan(cost, parts)


def test_no_split_plan_edges():
    rows, splits = sidebyside.no_split_plan([0, 0], 3)
    check_plan([0, 0], rows, splits, 3)
    rows, splits = sidebyside.no_split_plan([5000], 132)
    check_plan([5000], rows, splits, 132)
    assert sum(r[2] >= 0 for r in rows) == 1
    with pytest.raises(ValueError, match="num_parts"):
        sidebyside.no_split_plan([1], 0)


# ---- agreement, variants, summaries ---------------------------------------------------------
def test_agreement():
    out = torch.ones(2, 1, 4, 8)
    lse = torch.zeros(2, 4, 1)
    assert sidebyside.agreement(out, lse, out, lse) == Agreement(0.0, 0.0)
    off = out.clone()
    off[1] *= 1.5  # request 1: ||0.5 x|| / ||x|| = 0.5
    a = sidebyside.agreement(off, lse + 2e-3, out, lse)
    assert a.out_rel == pytest.approx(0.5) and a.lse_abs == pytest.approx(2e-3) and not a.ok
    assert sidebyside.agreement(out, lse.transpose(1, 2), out, lse).ok  # [b, s_q, h_q] accepted
    nan = out.clone()
    nan[0, 0, 0, 0] = math.nan
    assert not sidebyside.agreement(nan, lse, out, lse).ok
    inf = lse.clone()
    inf[0, 0, 0] = math.inf
    assert sidebyside.agreement(out, inf, out, lse).lse_abs == math.inf


def test_parse_variant():
    knobs = ("MLASERVE_MLA_SCHED", "MLASERVE_MLA_PDL")
    assert bench.parse_variant("pdl0", knobs) == ("pdl0", {"MLASERVE_MLA_PDL": "0"}, None)
    assert bench.parse_variant("nosplit", knobs) == ("nosplit", {}, "nosplit")
    assert bench.parse_variant("p:MLASERVE_MLA_SCHED=pack,MLASERVE_MLA_PDL=0", knobs) == (
        "p",
        {"MLASERVE_MLA_SCHED": "pack", "MLASERVE_MLA_PDL": "0"},
        None,
    )
    with pytest.raises(ValueError, match="MLASERVE_MLA_KERNEL is not a kernel knob"):
        bench.parse_variant("seesaw:MLASERVE_MLA_KERNEL=seesaw", knobs)
    with pytest.raises(ValueError, match="unknown variant 'seesaw'"):
        bench.parse_variant("seesaw", knobs)
    with pytest.raises(ValueError, match="VAR=VALUE"):
        bench.parse_variant("x:MLASERVE_MLA_PDL", knobs)


def test_command_line_rejects_bad_variants_before_any_gpu_work(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--variants", "seesaw:MLASERVE_MLA_KERNEL=seesaw"])
    assert "MLASERVE_MLA_KERNEL is not a kernel knob" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--variants", "ours", "ours"])
    assert "distinct" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot import"):
        bench.main(["--against", "no_such_flashmla_module"])


def fake_result(s_q, h_q, ours_us, peer_us, ok=True):
    r = bench.RowResult(bench.Row("standard", s_q, h_q, "4096 fixed", (4096,) * 128))
    r.times = {"ours": ours_us, "peer": peer_us}
    r.split = 3
    r.checks = {"ours~peer": Agreement(1e-3 if ok else 0.5, 1e-5)}
    return r


def test_summary_and_tables():
    results = [
        fake_result(1, 16, [100.0, 90.0], [95.0, 99.0]),  # best 90 vs 95: 1.056
        fake_result(1, 64, [100.0, 101.0], [98.0, 97.0]),  # 0.97
        fake_result(1, 128, [200.0, 210.0], [220.0, 230.0], ok=False),  # 1.10
    ]
    lines = bench.summary(results, "ours", "peer")
    geo = math.sqrt(95 / 90 * 97 / 100)
    assert f"2 rows, peer/ours 0.97-1.06, geomean {geo:.2f}, 1 >= 1.00; 1 below 1.00" in lines[0]
    assert "1 rows, peer/ours 1.10-1.10" in lines[1] and "1 >= 1.05" in lines[1]
    assert "DISAGREEMENT" in lines[2] and "h_q=128" in lines[2]
    ceil = bench.Ceilings(copy_gbps=4000.0, gemm_tflops=700.0)
    table = bench.final_table(results, ceil, ["ours"], "peer")
    assert len(table) == 2 + 3
    assert "| 128 | 1 | 16 | 4096 fixed | 90.0 | 95.0 | 1.06 |" in table[2]
    row = results[0].row
    assert f"{100 * row.nbytes / 90e-6 / 1e9 / 4000:.1f}% copy" in table[2]
    assert "% gemm" in table[4] and "BAD" in table[4]


def test_measure_row_on_cpu_with_the_reference():
    """measure_row's bookkeeping with the float32 reference on both sides (original and current form) and a
    timer that records the order of the calls: every pair checked, pass p in the order rotated by p."""
    lengths = (130, 64, 1000)
    row = bench.Row("serving", 2, 16, "x", lengths)
    cache = sidebyside.build_cache(list(lengths), device="cpu")
    ours = [Impl("ours", reference, ORIGINAL), Impl("v2", reference, ORIGINAL, {"MLASERVE_MLA_PDL": "0"})]
    peer = Impl("peer", current_form(reference), CURRENT)
    order = []

    def timer(fn):
        order.append(os.environ.get("MLASERVE_MLA_PDL"))
        fn()
        return 10.0 + len(order)

    r = bench.measure_row(row, cache, ours, peer, timer, passes=3, ref_requests=2, with_kernel_times=False)
    assert r.ok(), r.bad()
    assert set(r.checks) == {"ours~ref", "v2~ref", "peer~ref", "ours~peer", "v2~peer"}
    assert r.checks["ours~peer"].out_rel == 0.0 and r.split == 0
    # an untimed pass (calls 1-3), then (ours, v2, peer), (v2, peer, ours), (peer, ours, v2): every
    # implementation in every slot once
    assert r.times == {"ours": [14.0, 19.0, 21.0], "v2": [15.0, 17.0, 22.0], "peer": [16.0, 18.0, 20.0]}
    assert bench.passes_for(None, 4) == 4 and bench.passes_for(None, 1) == 2 and bench.passes_for(3, 5) == 3
    assert order[1] == "0" and order[0] != "0"  # the variant ran under its knob, the others not
    line = bench.row_line(r, bench.Ceilings(4000.0, 700.0), ["ours", "v2"], "peer")
    assert "ours     14.0 peer     16.0  1.14x v2     15.0" in line and line.endswith("OK")


def test_row_line_names_the_schedule_each_variant_ran(monkeypatch):
    """A variant module that reports its schedule (sm90.schedule_for) has it recorded per variant, under that
    variant's own knobs, and printed in the row line; the reference (no schedule_for) adds nothing."""
    knob = "MLASERVE_MLA_CONSUMER"
    monkeypatch.delenv(knob, raising=False)
    mod = types.ModuleType("fake_sm90")
    mod.get_mla_metadata = reference.get_mla_metadata
    mod.flash_mla_with_kvcache = reference.flash_mla_with_kvcache
    mod.schedule_for = lambda s_q, h_q, h_kv: f"{os.environ.get(knob, 'auto')}:{s_q * h_q // h_kv}"
    lengths = (70, 200)
    row = bench.Row("serving", 2, 16, "x", lengths)
    cache = sidebyside.build_cache(list(lengths), device="cpu")
    ours = [Impl("ours", mod, ORIGINAL), Impl("forced", mod, ORIGINAL, {knob: "trio"})]
    r = bench.measure_row(
        row, cache, ours, None, lambda fn: fn() and 1.0, passes=1, ref_requests=1, with_kernel_times=False
    )
    assert r.schedules == {"ours": "auto:32", "forced": "trio:32"}
    assert "| sched ours=auto:32 forced=trio:32 |" in bench.row_line(
        r, bench.Ceilings(4000.0, 700.0), ["ours", "forced"], None
    )
    plain = bench.measure_row(
        row,
        cache,
        [Impl("ours", reference, ORIGINAL)],
        None,
        lambda fn: fn() and 1.0,
        passes=1,
        ref_requests=1,
        with_kernel_times=False,
    )
    assert plain.schedules == {} and "sched" not in bench.row_line(
        plain, bench.Ceilings(4000.0, 700.0), ["ours"], None
    )


# ---- on the GPU -------------------------------------------------------------------------------
def _gpu():
    from mlaserve.worker.kernels import sm90

    if not sm90.is_supported():
        pytest.skip("needs a Hopper GPU and the compiled extension")
    return sm90


@pytest.mark.gpu
def test_side_by_side_row_on_gpu():
    """One serving-like row: ours (default, PDL off, no-split plan) against our own kernel behind the
    current API form; every pair agrees, both sides were timed in every pass, the split count is our
    plan's, and the kernel durations come back."""
    sm90 = _gpu()
    lengths = tuple(sidebyside.serving_lengths("u4k", 16))
    row = bench.Row("serving", 2, 128, "u4k", lengths)
    cache = sidebyside.build_cache(list(lengths))
    ours = [
        Impl("ours", sm90, ORIGINAL),
        Impl("pdl0", sm90, ORIGINAL, {"MLASERVE_MLA_PDL": "0"}),
        Impl("nosplit", sm90, ORIGINAL, plan="nosplit"),
    ]
    peer = Impl("peer", current_form(sm90), CURRENT)
    timer = bench.Timer(warmup_ms=1, rep_ms=3)
    r = bench.measure_row(row, cache, ours, peer, timer, passes=2, ref_requests=3, with_kernel_times=True)
    assert r.ok(), r.bad()
    assert set(r.checks) == {
        "ours~ref",
        "pdl0~ref",
        "nosplit~ref",
        "peer~ref",
        "ours~peer",
        "pdl0~peer",
        "nosplit~peer",
    }
    assert r.checks["ours~peer"].out_rel == 0.0  # the same kernel on the same plan: bit-identical
    assert all(len(t) == 2 and min(t) > 0 for t in r.times.values())
    g = bench.measure_row(
        row, cache, ours[:1], peer, timer, passes=2, ref_requests=1, with_kernel_times=False, graph=True
    )
    assert g.ok(), g.bad()
    assert set(g.times) == {"ours", "peer"} and all(len(t) == 2 and min(t) > 0 for t in g.times.values())
    meta, splits = sm90.get_mla_metadata(cache.seqlens, 2 * 128, 1)
    assert r.split == sidebyside.split_requests(splits)
    for name in ("ours", "ours PDL off", "peer"):
        kt = r.kernels[name]
        assert kt is None or kt["main"] > 0


@pytest.mark.gpu
def test_command_line_end_to_end(tmp_path, capsys):
    _gpu()
    out = tmp_path / "bench.json"
    bench.main(
        [
            "--against",
            "mlaserve.worker.kernels.sm90",
            "--s-q",
            "1",
            "--h-q",
            "16",
            "64",
            "--s-k",
            "4096",
            "--mode",
            "varlen",
            "--batch",
            "32",
            "--warmup-ms",
            "1",
            "--rep-ms",
            "3",
            "--json",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert "copy" in text and "GEMM" in text and "every row agrees" in text
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 2 and data["peer"] == "mlaserve.worker.kernels.sm90"
    for row in data["rows"]:
        assert row["checks"]["ours~peer"][0] == 0.0
        assert 0.5 < min(row["us"]["peer"]) / min(row["us"]["ours"]) < 2.0
