"""The compiled sm_90a kernels against the float32 reference (marker gpu: needs a Hopper GPU).

Fresh random inputs every run (seed printed), NaN in every unused cache slot and unused page,
permuted page tables, zero-length requests, causal s_q > 1, h_q from 1 to 128 with h_kv > 1 too.
Criteria: ||out - ref|| / ||ref|| <= 1e-2 per request, |lse - ref| <= 1e-3 where finite, the same
+inf where a row sees no key, and no NaN anywhere.
"""

from __future__ import annotations

import math

import pytest
import torch

from mlaserve.worker.kernels import reference

sm90 = pytest.importorskip("mlaserve.worker.kernels.sm90")

pytestmark = pytest.mark.gpu

PAGE = 64
D = 576


def make_inputs(seqlens, s_q, h_q, h_kv, gen, device="cuda", spare_pages=5):
    """Random paged inputs built on the GPU: permuted page table, NaN everywhere a request's keys aren't."""
    b = len(seqlens)
    pages = [(n + PAGE - 1) // PAGE for n in seqlens]
    max_pages = max(1, max(pages))
    num_pages = sum(pages) + spare_pages
    perm = torch.randperm(num_pages, generator=gen).to(device)
    k_cache = torch.full((num_pages, PAGE, h_kv, D), float("nan"), dtype=torch.bfloat16, device=device)
    # unused page-table entries point at NaN pages
    block_table = perm[torch.randint(0, num_pages, (b, max_pages), generator=gen).to(device)].to(torch.int32)
    cursor = 0
    for i, n in enumerate(seqlens):
        if n == 0:
            continue
        ids = perm[cursor : cursor + pages[i]]
        cursor += pages[i]
        block_table[i, : pages[i]] = ids.to(torch.int32)
        keys = torch.randn(n, h_kv, D, generator=gen).to(device=device, dtype=torch.bfloat16)
        full = pages[i] * PAGE
        padded = torch.full((full, h_kv, D), float("nan"), dtype=torch.bfloat16, device=device)
        padded[:n] = keys
        k_cache[ids.long()] = padded.view(pages[i], PAGE, h_kv, D)
    q = torch.randn(b, s_q, h_q, D, generator=gen).to(device=device, dtype=torch.bfloat16)
    seq = torch.tensor(seqlens, dtype=torch.int32, device=device)
    return q, k_cache, block_table, seq


def run_sm90(q, k_cache, block_table, seq, causal, scale=None, **kw):
    s_q, h_q, h_kv = q.shape[1], q.shape[2], k_cache.shape[2]
    meta, splits = sm90.get_mla_metadata(seq, s_q * h_q // h_kv, h_kv)
    return sm90.flash_mla_with_kvcache(
        q, k_cache, block_table, seq, 512, meta, splits, softmax_scale=scale, causal=causal, **kw
    )


def check_against_reference(q, k_cache, block_table, seq, causal, out, lse, scale=None):
    ref_out, ref_lse = reference.flash_mla_with_kvcache(
        q, k_cache, block_table, seq, 512, softmax_scale=scale, causal=causal
    )
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert not torch.isnan(out).any(), "NaN in out"
    assert not torch.isnan(lse).any(), "NaN in lse"
    o, r = out.float(), ref_out.float()
    for i in range(q.shape[0]):
        denom = r[i].norm().item()
        err = (o[i] - r[i]).norm().item()
        if denom == 0:
            assert err == 0, f"request {i}: expected zeros, got norm {err}"
        else:
            assert err / denom <= 1e-2, f"request {i} (len {int(seq[i])}): relative error {err / denom:.3e}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse finiteness differs from the reference"
    assert torch.all(lse[~finite] == math.inf), "rows without keys must get lse = +inf"
    if finite.any():
        diff = (lse[finite] - ref_lse[finite]).abs().max().item()
        assert diff <= 1e-3, f"lse max abs diff {diff:.3e}"


def _lens(gen, b, lo, hi):
    return [int(x) for x in torch.randint(lo, hi + 1, (b,), generator=gen)]


GRID = [
    # (seqlens spec, s_q, h_q, h_kv)
    ("edge", 1, 16, 1),
    ("edge", 2, 16, 1),
    ("edge", 4, 128, 1),
    ("small", 1, 1, 1),
    ("small", 3, 7, 1),
    ("small", 2, 24, 2),
    ("small", 1, 64, 1),
    ("small", 4, 32, 1),
    ("small", 2, 128, 1),
    ("small", 1, 96, 3),
    ("mid", 1, 16, 1),
    ("mid", 2, 64, 1),
    ("mid", 1, 128, 1),
    ("long1", 2, 128, 1),
    ("long1", 1, 16, 1),
    ("varlen16k", 1, 64, 1),
    ("fixed4k", 1, 16, 1),
    ("fixed4k", 2, 128, 1),
]


def seqlens_for(spec, gen):
    if spec == "edge":
        return [0, 1, 2, 3, 63, 64, 65, 127, 128, 129, 0, 4095]
    if spec == "small":
        return [0] + _lens(gen, 9, 1, 700)
    if spec == "mid":
        return _lens(gen, 24, 0, 3000)
    if spec == "long1":
        return [16384 - int(torch.randint(0, 64, (1,), generator=gen))]
    if spec == "varlen16k":
        return _lens(gen, 32, 1, 16384)
    if spec == "fixed4k":
        return [4096] * 128
    raise ValueError(spec)


@pytest.mark.parametrize("spec,s_q,h_q,h_kv", GRID)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("consumer", ["solo", "trio"])
def test_matches_reference(seed, monkeypatch, consumer, spec, s_q, h_q, h_kv, causal):
    """Both consumer schedules (MLASERVE_MLA_CONSUMER forces one on every shape) against the reference."""
    monkeypatch.setenv("MLASERVE_MLA_CONSUMER", consumer)
    gen = torch.Generator().manual_seed(seed)
    seqlens = seqlens_for(spec, gen)
    q, k_cache, block_table, seq = make_inputs(seqlens, s_q, h_q, h_kv, gen)
    scale = None if spec != "small" else 0.05 + float(torch.rand(1, generator=gen)) * 0.1
    out, lse = run_sm90(q, k_cache, block_table, seq, causal, scale)
    torch.cuda.synchronize()
    check_against_reference(q, k_cache, block_table, seq, causal, out, lse, scale)


def test_batch_128_varlen_all_heads(seed):
    gen = torch.Generator().manual_seed(seed)
    seqlens = [max(1, int(x)) for x in (torch.randn(128, generator=gen) * 1024 + 2048).clamp(0, 8192)]
    for s_q, h_q in ((1, 16), (2, 64), (1, 128)):
        q, k_cache, block_table, seq = make_inputs(seqlens, s_q, h_q, 1, gen)
        out, lse = run_sm90(q, k_cache, block_table, seq, True)
        torch.cuda.synchronize()
        check_against_reference(q, k_cache, block_table, seq, True, out, lse)


@pytest.mark.parametrize("consumer", ["solo", "trio"])
@pytest.mark.parametrize("per_page", [12.0, 1.5, -12.0])
def test_rescale_when_the_row_max_moves(seed, monkeypatch, consumer, per_page):
    """Scores that climb (or fall) steadily over the keys, by about `per_page` log2 units per page: with 12
    or 1.5 every row max moves on every page (O rescaled each page), with -12 it stays on the first page
    (every later rescale skipped: all factors exactly 1). Both schedules against the float32 reference."""
    monkeypatch.setenv("MLASERVE_MLA_CONSUMER", consumer)
    gen = torch.Generator().manual_seed(seed)
    seqlens = [600, 640, 65, 300]  # at most 10 pages: scores stay within ~120 log2 units
    q, k_cache, block_table, seq = make_inputs(seqlens, 1, 128, 1, gen)
    # q gets 8 u and key t gets c t / 64 u (u a unit direction): the scaled score of every row moves by
    # 8 c / 24 natural units = 0.48 c log2 units per page (default scale 1/24)
    u = torch.randn(D, generator=gen).to("cuda")
    u = u / u.norm()
    q = (q.float() + 8.0 * u).to(torch.bfloat16)
    c = per_page / (8.0 / 24.0 * math.log2(math.e))
    pages = block_table.long()
    for i, n in enumerate(seqlens):
        ids = pages[i, : (n + PAGE - 1) // PAGE]
        t = torch.arange(n, device="cuda", dtype=torch.float32)
        keys = k_cache[ids].float().reshape(-1, D)
        keys[:n] += (c * t / PAGE).view(-1, 1) * u
        k_cache[ids] = keys.reshape(ids.numel(), PAGE, 1, D).to(torch.bfloat16)
    out, lse = run_sm90(q, k_cache, block_table, seq, False)
    torch.cuda.synchronize()
    check_against_reference(q, k_cache, block_table, seq, False, out, lse)


def test_all_empty_and_tiny_batches(seed):
    gen = torch.Generator().manual_seed(seed)
    for seqlens in ([0], [0, 0, 0], [1], [0, 1]):
        q, k_cache, block_table, seq = make_inputs(seqlens, 2, 16, 1, gen)
        out, lse = run_sm90(q, k_cache, block_table, seq, True)
        torch.cuda.synchronize()
        check_against_reference(q, k_cache, block_table, seq, True, out, lse)


def test_preallocated_out_and_lse(seed):
    gen = torch.Generator().manual_seed(seed)
    q, k_cache, block_table, seq = make_inputs(_lens(gen, 8, 0, 1000), 1, 32, 1, gen)
    out = torch.full((8, 1, 32, 512), float("nan"), dtype=torch.bfloat16, device="cuda")
    lse = torch.full((8, 32, 1), float("nan"), dtype=torch.float32, device="cuda")
    got_out, got_lse = run_sm90(q, k_cache, block_table, seq, False, out=out, lse=lse)
    assert got_out.data_ptr() == out.data_ptr() and got_lse.data_ptr() == lse.data_ptr()
    torch.cuda.synchronize()
    check_against_reference(q, k_cache, block_table, seq, False, out, lse)


def test_metadata_plan_is_consistent(seed):
    gen = torch.Generator().manual_seed(seed)
    seqlens = [0] + _lens(gen, 50, 0, 5000)
    seq = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
    meta, splits = sm90.get_mla_metadata(seq, 64, 1)
    meta, splits = meta.cpu().tolist(), splits.cpu().tolist()
    assert splits[0] == 0 and all(b >= a for a, b in zip(splits, splits[1:]))
    pages = [(n + 63) // 64 for n in seqlens]
    covered = [[] for _ in seqlens]
    for p, (rs, ps, re_, pe, split, *_rest) in enumerate(meta):
        for r in range(rs, re_ + 1):
            lo = ps if r == rs else 0
            hi = min(pe, pages[r]) if r == re_ else pages[r]
            if lo < hi:
                covered[r].append((lo, hi, split if r == rs else 0, p))
    for i, n in enumerate(pages):
        got = covered[i]
        assert len(got) == splits[i + 1] - splits[i] if n else splits[i + 1] == splits[i]
        assert sorted(x[2] for x in got) == list(range(len(got)))
        pos = 0
        for lo, hi, _s, _p in sorted(got):
            assert lo == pos
            pos = hi
        assert pos == n


def test_cuda_graph_replay_equals_eager(seed):
    gen = torch.Generator().manual_seed(seed)
    seqlens = _lens(gen, 16, 0, 3000)
    q, k_cache, block_table, seq = make_inputs(seqlens, 2, 64, 1, gen)
    eager_out, eager_lse = run_sm90(q, k_cache, block_table, seq, True)
    out = torch.empty_like(eager_out)
    lse = torch.empty_like(eager_lse)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run_sm90(q, k_cache, block_table, seq, True, out=out, lse=lse)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_sm90(q, k_cache, block_table, seq, True, out=out, lse=lse)
    out.fill_(float("nan"))
    lse.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse)
    # new lengths and queries through the same graph (metadata recomputed inside it)
    new = torch.tensor(_lens(gen, 16, 0, 3000), dtype=torch.int32, device="cuda")
    seq.copy_(torch.minimum(seq, new))  # each request's pages still cover its new length
    q.copy_(torch.randn(q.shape, generator=gen).to(device="cuda", dtype=torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    check_against_reference(q, k_cache, block_table, seq, True, out, lse)


def test_argument_errors_name_the_argument(seed):
    gen = torch.Generator().manual_seed(seed)
    q, k_cache, block_table, seq = make_inputs([100, 200], 1, 16, 1, gen)
    meta, splits = sm90.get_mla_metadata(seq, 16, 1)

    def call(**kw):
        args = dict(
            q=q,
            k_cache=k_cache,
            block_table=block_table,
            cache_seqlens=seq,
            head_dim_v=512,
            tile_scheduler_metadata=meta,
            num_splits=splits,
        )
        args.update(kw)
        return sm90.flash_mla_with_kvcache(**args)

    with pytest.raises(TypeError, match="q"):
        call(q=q.float())
    with pytest.raises(TypeError, match="block_table"):
        call(block_table=block_table.long())
    with pytest.raises(TypeError, match="cache_seqlens"):
        call(cache_seqlens=seq.long())
    with pytest.raises(ValueError, match="page size"):
        call(k_cache=k_cache.view(-1, 32, 1, 576))
    with pytest.raises(ValueError, match="head_dim_v"):
        call(head_dim_v=256)
    with pytest.raises(ValueError, match="head dim"):
        call(q=q[..., :512])
    with pytest.raises(ValueError, match="q"):
        call(q=torch.empty(2, 1, 16, 2 * 576, dtype=torch.bfloat16, device="cuda")[..., ::2])
    with pytest.raises(ValueError, match="q"):
        call(q=q.cpu())
    with pytest.raises(ValueError, match="num_splits"):
        call(num_splits=splits[:-1])
    with pytest.raises(TypeError, match="tile_scheduler_metadata"):
        call(tile_scheduler_metadata=meta.long())
    with pytest.raises(ValueError, match="out"):
        call(out=torch.empty(2, 1, 16, 256, dtype=torch.bfloat16, device="cuda"))
    with pytest.raises(TypeError, match="cache_seqlens"):
        sm90.get_mla_metadata(seq.long(), 16, 1)


@pytest.mark.parametrize("pdl", ["1", "0"])
@pytest.mark.parametrize("sched", ["even", "pack", "auto"])
@pytest.mark.parametrize("consumer", ["solo", "trio"])
def test_scheduler_and_pdl_variants(seed, monkeypatch, consumer, sched, pdl):
    """Both consumer schedules are exact under every split plan (MLASERVE_MLA_SCHED), with the combine
    launched with and without programmatic dependent launch (MLASERVE_MLA_PDL)."""
    monkeypatch.setenv("MLASERVE_MLA_CONSUMER", consumer)
    monkeypatch.setenv("MLASERVE_MLA_SCHED", sched)
    monkeypatch.setenv("MLASERVE_MLA_PDL", pdl)
    gen = torch.Generator().manual_seed(seed)
    for seqlens, s_q, h_q, h_kv in (
        ([0] + _lens(gen, 40, 1, 4000), 2, 64, 1),
        ([5000, 1, 0, 70], 3, 40, 2),
        ([16384], 1, 128, 1),
    ):
        q, k_cache, block_table, seq = make_inputs(seqlens, s_q, h_q, h_kv, gen)
        out, lse = run_sm90(q, k_cache, block_table, seq, True)
        torch.cuda.synchronize()
        check_against_reference(q, k_cache, block_table, seq, True, out, lse)
