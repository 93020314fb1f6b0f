"""The fused Triton kernels (worker/model/fused/) against the torch path and float64 oracles.

Without a GPU the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, which
tests/conftest.py sets before anything imports Triton) on small shapes; with one they run compiled on CUDA, and the `gpu` tests add
deepseek-v2-lite's real shapes. Fresh random inputs every run (the `seed` fixture).

Error bounds, relative to the float64 oracle's norm unless said otherwise:
- float32: <= 1e-5. Same arithmetic, summation order aside (fp32 eps 6e-8 times sqrt(K) terms).
- bf16 elementwise kernels (norm, RoPE): the fused kernel rounds the same float32 value the torch
  path rounds; they differ only where the last float32 bits (sum order, rsqrt) straddle a bf16
  rounding boundary: at most 1 bf16 ulp (2^-8 relative) in an element.
- bf16 MoE: 1e-2. Both paths round gate, up, silu, act and each expert's output to bf16 (2^-9
  relative each, a few roundings deep); the torch path measures at ~3e-3 on these shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and Triton's interpreter is off (TRITON_INTERPRET != 1)", allow_module_level=True)
pytest.importorskip("triton")

from mlaserve.worker.model import fused  # noqa: E402
from mlaserve.worker.model.config import MoEConfig, RopeConfig  # noqa: E402
from mlaserve.worker.model.fused import configs  # noqa: E402
from mlaserve.worker.model.fused.configs import GemmConfig, MoETiles  # noqa: E402
from mlaserve.worker.model.fused.mla_prep import mla_prep  # noqa: E402
from mlaserve.worker.model.fused.moe import fused_moe  # noqa: E402
from mlaserve.worker.model.fused.moe_align import align, max_blocks  # noqa: E402
from mlaserve.worker.model.fused.norm import rms_norm  # noqa: E402
from mlaserve.worker.model.fused.router import route  # noqa: E402
from mlaserve.worker.model.layers import DenseMLP, RMSNorm  # noqa: E402
from mlaserve.worker.model.moe import Experts, Router  # noqa: E402
from mlaserve.worker.model.rope import RotaryEmbedding  # noqa: E402

DEV = "cuda" if GPU else "cpu"
BF16_ULP = 2.0**-8
pytestmark = pytest.mark.triton


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * scale).to(DEV, dtype)


# ---------------------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 96])
def test_rms_norm_and_residual_add_match_the_module(dtype, n, seed):
    g = gen(seed)
    norm = RMSNorm(n, 1e-6, dtype=dtype).to(DEV)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(n, generator=g))
    x, r = randn(g, 3, 5, n, dtype=dtype), randn(g, 3, 5, n, scale=4.0, dtype=dtype)
    with fused.forced(False):
        ref, ref_sum = norm(x + r), x + r
        ref_plain = norm(x)
    out, total = rms_norm(x, norm.weight, 1e-6, r)
    plain = rms_norm(x, norm.weight, 1e-6)
    assert isinstance(plain, torch.Tensor) and out.dtype == dtype and out.shape == x.shape
    assert torch.equal(total, ref_sum)  # one float32 add of two dtype values, rounded once: exact
    if dtype == torch.float32:
        assert rel(out, ref) <= 1e-5 and rel(plain, ref_plain) <= 1e-5
    else:
        for got, want in ((out, ref), (plain, ref_plain)):
            assert ((got.float() - want.float()).abs() <= BF16_ULP * want.float().abs() + 1e-6).all()
    # A strided input (a column slice, as the torch path's c_kv view is) gives the same rows.
    wide = torch.cat((x, randn(g, 3, 5, 7, dtype=dtype)), dim=-1)[..., :n]
    assert torch.equal(rms_norm(wide, norm.weight, 1e-6), plain)


def test_rms_norm_module_takes_the_kernel_when_forced(seed):
    g = gen(seed)
    norm = RMSNorm(64, 1e-6).to(DEV)
    x, r = randn(g, 4, 64), randn(g, 4, 64)
    with fused.forced(True):
        out, total = norm.add(x, r)
    with fused.forced(False):
        ref, ref_total = norm.add(x, r)
        first, first_res = norm.add(x, None)  # layer 0: the residual stream starts at x
    assert torch.equal(total, ref_total) and rel(out, ref) <= 1e-5
    assert first_res is x and rel(first, norm(x)) == 0.0


def test_fused_switch(monkeypatch):
    cpu = torch.zeros(2, dtype=torch.bfloat16)
    assert not fused.use_fused(cpu)  # CPU tensors take the torch path unless forced
    with fused.forced(True):
        assert fused.use_fused(cpu)
        with fused.forced(False):
            assert not fused.use_fused(cpu)
        assert fused.use_fused(cpu)
    if GPU:
        on_gpu = cpu.cuda()
        assert fused.use_fused(on_gpu) and not fused.use_fused(on_gpu.float())
        monkeypatch.setenv("MLASERVE_FUSED", "0")
        assert not fused.use_fused(on_gpu)


# ---------------------------------------------------------------------------------------- MLA prep

YARN = RopeConfig(
    theta=10000.0,
    rope_type="yarn",
    factor=40.0,
    original_max_position_embeddings=4096,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=0.707,
    mscale_all_dim=0.707,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleave", [True, False])
def test_mla_prep_matches_norm_rope_and_cache_write(dtype, interleave, seed):
    g = gen(seed)
    t, h, nope, rank, rope, slots = 6, 3, 16, 512, 64, 40
    cfg = dataclasses.replace(YARN, interleave=interleave)
    rotary = RotaryEmbedding(cfg).to(DEV)
    norm = RMSNorm(rank, 1e-6, dtype=dtype).to(DEV)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(rank, generator=g))
    q = randn(g, t, h, nope + rope, dtype=dtype)
    kv = randn(g, t, rank + rope, dtype=dtype)
    positions = torch.randint(0, 100_000, (1, t), generator=g).to(DEV)
    cos, sin = rotary.cos_sin(positions)
    slot = torch.randperm(slots, generator=g)[:t]
    slot[1], slot[4] = -1, slots  # padding, and a slot past the cache: neither is written
    cache = torch.full((slots, rank + rope), float("nan"), dtype=dtype, device=DEV)
    q_out = torch.full((t, h, rank + rope), float("nan"), dtype=dtype, device=DEV)
    mla_prep(
        q, kv, cos[0], sin[0], norm.weight, 1e-6, slot.to(DEV), cache, q_out, nope=nope, interleave=interleave
    )
    with fused.forced(False):
        want_latent = norm(kv[:, :rank])  # [t, 512]
        want_kpe = rotary.apply(kv[None, :, rank:], cos, sin)[0]  # [t, 64]
        want_qpe = rotary.apply(q[None, :, :, nope:], cos, sin)[0]  # [t, h, 64]
    written = [i for i in range(t) if 0 <= slot[i] < slots]
    rows = cache[slot[written].to(DEV)]
    want_rows = torch.cat((want_latent, want_kpe), dim=-1)[written]
    if dtype == torch.float32:
        assert rel(rows, want_rows) <= 1e-5 and rel(q_out[..., rank:], want_qpe) <= 1e-5
    else:
        for got, want in ((rows, want_rows), (q_out[..., rank:], want_qpe)):
            assert ((got.float() - want.float()).abs() <= 2 * BF16_ULP * want.float().abs() + 1e-6).all()
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[slot[written]] = False
    assert torch.isnan(cache[untouched.to(DEV)]).all()  # no other row written
    assert torch.isnan(q_out[..., :rank]).all()  # the W_UK product's columns are left to it


# ---------------------------------------------------------------------------------------- router

ROUTERS = {
    "v2-lite-greedy-softmax": MoEConfig(64, 2, 6, 32),
    "v2-group-limited": MoEConfig(
        16, 1, 4, 32, topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0
    ),
    "v3-noaux-tc": MoEConfig(
        32,
        1,
        8,
        32,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        n_group=8,
        topk_group=4,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        scale_after_norm=True,
    ),
    "v3-noaux-unnormalised-odd-groups": MoEConfig(
        12, 1, 3, 32, topk_method="noaux_tc", scoring_func="sigmoid", n_group=3, topk_group=3
    ),
    "v2-greedy-k1-normalised": MoEConfig(8, 1, 1, 32, norm_topk_prob=True, routed_scaling_factor=2.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(ROUTERS))
def test_router_matches_the_module(case, dtype, seed):
    moe, hidden = ROUTERS[case], 96
    g = gen(seed)
    router = Router(moe, hidden, dtype=dtype).to(DEV)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g) * hidden**-0.5)
        if router.e_score_correction_bias is not None:
            router.e_score_correction_bias.copy_(torch.randn(moe.n_routed_experts, generator=g) * 0.1)
    for t in (1, 21):
        x = randn(g, t, hidden, dtype=dtype)
        weights, ids = route(x, router.weight, moe, router.e_score_correction_bias)
        with fused.forced(False):
            ref_w, ref_ids = router(x)
        assert ids.dtype == torch.int32 and weights.dtype == torch.float32
        order, ref_order = ids.argsort(dim=-1), ref_ids.argsort(dim=-1)
        assert torch.equal(ids.gather(1, order).long(), ref_ids.gather(1, ref_order))  # as sets
        assert rel(weights.gather(1, order), ref_w.gather(1, ref_order)) <= 1e-5


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the interpreter's NaN lanes
def test_router_gives_valid_ids_for_non_finite_rows(seed):
    moe = ROUTERS["v2-lite-greedy-softmax"]
    g = gen(seed)
    w = randn(g, 64, 32, scale=0.2)
    x = randn(g, 3, 32)
    x[1, 5] = float("nan")
    x[2, 0] = float("inf")
    _, ids = route(x, w, moe)
    assert ((ids >= 0) & (ids < 64)).all()
    assert len(set(ids[1].tolist())) == moe.num_experts_per_tok  # still k distinct experts


# ---------------------------------------------------------------------------------------- alignment


def align_oracle(ids: torch.Tensor, e: int, bm: int, ns: int) -> tuple[list[int], list[int], list[list[int]]]:
    """Block experts, block row counts and each block's pairs, by a plain counting sort."""
    t, k = ids.shape
    ex = torch.cat((ids.long().cpu().clamp(0, e - 1), (e + torch.arange(ns)).expand(t, ns)), dim=1).reshape(
        -1
    )
    experts, rows, pairs = [], [], []
    for expert in range(e + ns):
        ps = (ex == expert).nonzero().flatten().tolist()
        for b in range(0, len(ps), bm):
            experts.append(expert)
            rows.append(len(ps[b : b + bm]))
            pairs.append(ps[b : b + bm])
    return experts, rows, pairs


def distinct(g: torch.Generator, t: int, e: int, k: int) -> torch.Tensor:
    return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])


ALIGN_CASES = {
    "decode-64-tokens-k6-of-64-shared2": lambda g: (distinct(g, 64, 64, 6), 64, 16, 2),
    "one-token": lambda g: (distinct(g, 1, 64, 6), 64, 16, 2),
    "256-tokens": lambda g: (distinct(g, 256, 64, 6), 64, 32, 2),
    "all-to-one-expert": lambda g: (torch.full((40, 1), 3), 8, 16, 0),
    "most-experts-empty": lambda g: (torch.randint(0, 2, (30, 2), generator=g), 32, 16, 1),
    "block-of-4-int32": lambda g: (distinct(g, 50, 8, 3).int(), 8, 4, 1),
    "256-experts-k8": lambda g: (distinct(g, 33, 256, 8), 256, 16, 1),
    "ids-out-of-range-are-clamped": lambda g: (torch.tensor([[-5, 2], [9, 100]]), 8, 16, 0),
}


@pytest.mark.parametrize("case", sorted(ALIGN_CASES))
def test_alignment_matches_a_counting_sort(case, seed):
    ids, e, bm, ns = ALIGN_CASES[case](gen(seed))
    al = align(ids.to(DEV), e, bm, ns)
    experts, rows, pairs = align_oracle(ids, e, bm, ns)
    nb = len(experts)
    t, k = ids.shape
    assert al.max_blocks == max_blocks(t * (k + ns), e + ns, bm) >= nb
    assert al.block_expert[:nb].tolist() == experts and (al.block_expert[nb:] == -1).all()
    assert al.block_rows[:nb].tolist() == rows and (al.block_rows[nb:] == 0).all()
    got = al.sorted_pairs.cpu()
    for b, ps in enumerate(pairs):
        assert got[b * bm : b * bm + len(ps)].tolist() == ps


def test_max_blocks_bounds_every_routing():
    # The worst case puts one pair on each of min(E, P) experts and the rest on one of them.
    for p, e, bm in ((8, 66, 16), (384, 66, 16), (1536, 66, 32), (5, 3, 4), (1, 1, 16)):
        used = min(e, p)
        worst = (used - 1) + -(-(p - used + 1) // bm)
        assert max_blocks(p, e, bm) >= worst


# ---------------------------------------------------------------------------------------- MoE


def moe_oracle(x, ids, w, w13, w2, shared) -> torch.Tensor:
    """sum_j w[t, j] · down(silu(gate x) · up x) over the token's experts, + the shared MLP, in float64."""
    x, w13, w2 = x.double().cpu(), w13.double().cpu(), w2.double().cpu()
    i = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t].tolist()):
            gu = w13[e] @ x[t]
            out[t] += float(w[t, j]) * (w2[e] @ (torch.nn.functional.silu(gu[:i]) * gu[i:]))
    if shared is not None:
        wg, wu, wd = (s.double().cpu() for s in shared)
        out += (torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)) @ wd.T
    return out


def make_moe(g, e, k, ns, hidden, inter, dtype):
    moe = MoEConfig(e, ns, k, inter)
    experts = Experts(moe, hidden, dtype=dtype).to(DEV)
    mlp = DenseMLP(hidden, inter * ns, dtype=dtype).to(DEV) if ns else None
    params = list(experts.parameters()) + (list(mlp.parameters()) if mlp is not None else [])
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    shared = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight) if mlp is not None else None
    return experts, mlp, shared


# Few programs (the interpreter runs each in Python) but several K steps, so the loops are exercised.
SMALL_TILES = MoETiles(16, GemmConfig(32, 32, 4, 2), GemmConfig(64, 16, 4, 2))
SPLIT_TILES = MoETiles(16, GemmConfig(16, 64, 4, 2), GemmConfig(64, 16, 4, 2, split_k=2))

MOE_CASES = {
    # name: (tokens, experts, k, shared, routing, tiles)
    "decode-k3-of-8-shared2": (12, 8, 3, 2, "distinct", SMALL_TILES),
    "one-token": (1, 8, 3, 1, "distinct", SMALL_TILES),
    "all-tokens-to-one-expert": (20, 8, 1, 0, "one", SMALL_TILES),
    "one-popular-expert-and-empty-ones": (18, 16, 2, 1, "popular", SMALL_TILES),
    "split-k": (5, 8, 2, 1, "distinct", SPLIT_TILES),
    "default-tiles": (7, 8, 3, 2, "distinct", None),
}


def routing(g, kind, t, e, k):
    if kind == "one":
        return torch.full((t, k), 5)
    ids = distinct(g, t, e, k)
    if kind == "popular":
        ids = distinct(g, t, 4, k)  # experts 4.. never hit
        ids[:, 0] = 2
        ids[:, 1] = torch.where(ids[:, 1] == 2, 3, ids[:, 1])
    return ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_fused_moe_matches_the_modules_and_float64(case, dtype, seed):
    t, e, k, ns, kind, tiles = MOE_CASES[case]
    hidden, inter = 64, 32
    g = gen(seed)
    experts, mlp, shared = make_moe(g, e, k, ns, hidden, inter, dtype)
    x = randn(g, t, hidden, dtype=dtype)
    ids = routing(g, kind, t, e, k)
    w = torch.rand(t, k, generator=g) + 0.1
    got = fused_moe(x, ids.to(DEV), w.to(DEV), experts.gate_up_proj, experts.down_proj, shared, tiles=tiles)
    assert got.dtype == dtype and got.shape == (t, hidden)
    oracle = moe_oracle(x, ids, w, experts.gate_up_proj, experts.down_proj, shared)
    with fused.forced(False):
        torch_path = experts(x, ids.to(DEV), w.to(DEV)) + (mlp(x) if mlp is not None else 0)
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(got, oracle) <= bound
    assert rel(torch_path, oracle) <= bound  # the oracle is the modules' function
    if ns:  # without the shared experts: the routed sum alone
        routed = fused_moe(
            x, ids.to(DEV), w.to(DEV), experts.gate_up_proj, experts.down_proj, None, tiles=tiles
        )
        assert rel(routed, moe_oracle(x, ids, w, experts.gate_up_proj, experts.down_proj, None)) <= bound


def test_fused_moe_rejects_mismatched_weights(seed):
    g = gen(seed)
    experts, _, shared = make_moe(g, 8, 2, 1, 64, 32, torch.float32)
    x, ids, w = (
        randn(g, 3, 64),
        torch.zeros(3, 2, dtype=torch.int64, device=DEV),
        torch.ones(3, 2, device=DEV),
    )
    with pytest.raises(ValueError, match="down_proj"):
        fused_moe(x, ids, w, experts.gate_up_proj, experts.down_proj[:, :, :16], shared)
    with pytest.raises(ValueError, match="shared MLP"):
        fused_moe(x, ids, w, experts.gate_up_proj, experts.down_proj, (shared[0][:16], shared[1], shared[2]))
    with pytest.raises(ValueError, match="ids and weights"):
        fused_moe(x, ids[:, :1], w, experts.gate_up_proj, experts.down_proj, shared)


def test_tile_table_lookup_and_json_override(tmp_path, monkeypatch):
    assert configs.config_for(1) == configs.DEFAULT_TABLE[1]
    assert configs.config_for(17) == configs.DEFAULT_TABLE[64]
    assert configs.config_for(10**6) == configs.DEFAULT_TABLE[1 << 30]
    custom = MoETiles(16, GemmConfig(128, 256, 8, 5), GemmConfig(16, 64, 2, 3, split_k=4))
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps({"8": custom.to_dict()}))
    monkeypatch.setenv(configs.ENV_CONFIG, str(path))
    assert configs.config_for(3) == custom and configs.config_for(9) == configs.DEFAULT_TABLE[1 << 30]
    with pytest.raises(ValueError, match="block_n"):
        GemmConfig(24, 64)


# ---------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("preset", ["tiny", "deepseek-v3-tiny"])
def test_model_forward_fused_equals_torch_path(preset, seed):
    """Prefill then decode of three sequences through the whole model, fused vs torch path (float32):
    the logits and every cache row written agree; padding and unused cache rows stay untouched."""
    from mlaserve.worker.model import load_model
    from tests.worker.paged_harness import PagedCache, Sequence

    loaded = load_model(preset, device=DEV, dtype=torch.float32)
    cfg = loaded.config
    g = gen(seed)
    prompts = [torch.randint(0, 258, (n,), generator=g).tolist() for n in (5, 2, 4)]
    nxt = [[int(v)] for v in torch.randint(0, 258, (3,), generator=g)]
    results = {}
    for on in (False, True):
        cache = PagedCache(cfg.num_hidden_layers, 4, seed=seed, device=DEV)
        seqs = [Sequence() for _ in prompts]
        with fused.forced(on):
            first = cache.forward(loaded.model, seqs, prompts, num_heads=cfg.num_attention_heads)
            second = cache.forward(loaded.model, seqs, nxt, num_heads=cfg.num_attention_heads)
        results[on] = (torch.cat(first), torch.cat(second), cache.caches)
    (p0, d0, c0), (p1, d1, c1) = results[False], results[True]
    assert rel(p1, p0) <= 1e-5 and rel(d1, d0) <= 1e-5
    for a, b in zip(c0, c1):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        assert rel(b.nan_to_num(), a.nan_to_num()) <= 1e-5


# ---------------------------------------------------------------------------------------- GPU, real shapes

V2_LITE = dict(e=64, k=6, ns=2, hidden=2048, inter=1408)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 64, 256])
def test_gpu_fused_moe_deepseek_v2_lite_shapes(tokens, seed):
    g = gen(seed)
    d = V2_LITE
    experts, mlp, shared = make_moe(g, d["e"], d["k"], d["ns"], d["hidden"], d["inter"], torch.bfloat16)
    x = randn(g, tokens, d["hidden"], dtype=torch.bfloat16)
    ids = distinct(g, tokens, d["e"], d["k"])
    if tokens >= 16:
        ids[: tokens // 2, 0] = 7  # one popular expert
    w = torch.rand(tokens, d["k"], generator=g)
    got = fused_moe(x, ids.cuda(), w.cuda(), experts.gate_up_proj, experts.down_proj, shared)
    with fused.forced(False):  # the grouped-GEMM torch path, also bf16
        ref = experts(x, ids.cuda(), w.cuda()) + mlp(x)
    sample = slice(0, min(tokens, 8))  # the float64 oracle on a few tokens (it is slow)
    oracle = moe_oracle(x[sample], ids[sample], w[sample], experts.gate_up_proj, experts.down_proj, shared)
    assert rel(got[sample], oracle) <= 1e-2 and rel(ref[sample], oracle) <= 1e-2
    assert rel(got, ref) <= 1.5e-2


@pytest.mark.gpu
def test_gpu_fused_layer_is_captured_in_a_cuda_graph(seed):
    """The fused MoE block (router + align + GEMMs + combine) replays from a CUDA graph: no host sync,
    grid sizes independent of the routing; new routings after capture give the eager result."""
    g = gen(seed)
    d = V2_LITE
    moe = MoEConfig(d["e"], d["ns"], d["k"], d["inter"])
    from mlaserve.worker.model.moe import MoE

    block = MoE(moe, d["hidden"], dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    static = randn(g, 64, d["hidden"], dtype=torch.bfloat16)
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            block(static)  # compiles the kernels outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = block(static)
        for _ in range(3):
            static.copy_(randn(g, 64, d["hidden"], dtype=torch.bfloat16))
            graph.replay()
            assert torch.equal(out, block(static))


@pytest.mark.gpu
def test_gpu_router_and_norm_real_shapes(seed):
    g = gen(seed)
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
        routed_scaling_factor=2.5,
        scale_after_norm=True,
    )
    for moe, hidden in ((ROUTERS["v2-lite-greedy-softmax"], 2048), (v3, 7168)):
        router = Router(moe, hidden, dtype=torch.bfloat16).cuda()
        with torch.no_grad():
            router.weight.copy_(torch.randn(router.weight.shape, generator=g) * hidden**-0.5)
            if router.e_score_correction_bias is not None:
                router.e_score_correction_bias.copy_(torch.randn(moe.n_routed_experts, generator=g) * 0.1)
        x = randn(g, 256, hidden, dtype=torch.bfloat16)
        w, ids = route(x, router.weight, moe, router.e_score_correction_bias)
        with fused.forced(False):
            ref_w, ref_ids = router(x)
        same = (ids.sort(dim=-1).values.long() == ref_ids.sort(dim=-1).values).all(dim=-1)
        assert same.float().mean() >= 0.98  # a near-tie may flip between summation orders
        assert rel(w.sort(-1).values[same], ref_w.sort(-1).values[same]) <= 1e-5
    norm = RMSNorm(2048, 1e-6, dtype=torch.bfloat16).cuda()
    x, r = randn(g, 256, 2048, dtype=torch.bfloat16), randn(g, 256, 2048, dtype=torch.bfloat16)
    out, total = rms_norm(x, norm.weight, 1e-6, r)
    with fused.forced(False):
        ref = norm(x + r)
    assert torch.equal(total, x + r)
    assert ((out.float() - ref.float()).abs() <= BF16_ULP * ref.float().abs() + 1e-6).all()


@pytest.mark.slow
@pytest.mark.skipif(GPU, reason="the smoke run is the CPU stand-in for the GPU benchmark")
def test_bench_fused_runs_every_mode_on_the_cpu(tmp_path, capsys):
    """The GPU microbenchmark's code paths (MoE block, norm/prep, tile sweep + JSON, one layer, kernel
    count) on tiny widths under the interpreter, so a device run does not die on a Python error."""
    from mlaserve.worker.model import bench_fused

    path = tmp_path / "tiles.json"
    assert bench_fused.main(["--smoke", "--tokens", "2", "--context", "10", "--write-config", str(path)]) == 0
    assert bench_fused.main(["--count", "--count-tokens", "3"]) == 0
    out = capsys.readouterr().out
    for section in ("MoE block", "RMSNorm", "Tile sweep", "decoder layer", "per MoE decoder layer"):
        assert section in out
    table = configs.load_table(str(path))
    assert 2 in table and table[2].block_m == 16


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills_and_stream_weights_by_cp_async():
    """Every kernel and default tile config compiles for sm_90a (ptxas runs here, no GPU needed); none
    spills, and the GEMMs' weight loads are cp.async pipelines. (A lost 16-byte alignment hint once
    turned the down GEMM's loads into unpipelined 2-byte loads; only this compile shows it.)"""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import json, dataclasses\n"
        "from mlaserve.worker.model.fused.compile_check import compile_all\n"
        "print(json.dumps([dataclasses.asdict(r) for r in compile_all()]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    names = {r["kernel"] for r in results}
    assert names == {
        "_rms_norm_kernel", "_mla_prep_kernel", "_router_kernel", "_moe_align_kernel",
        "_gate_up_kernel", "_down_kernel", "_combine_kernel",
    }  # fmt: skip
    for r in results:
        assert r["spill_stack"] <= 16, r  # the router's top-k may keep a word or two on the stack
        if r["kernel"] in ("_gate_up_kernel", "_down_kernel", "_router_kernel"):
            assert r["cp_async"] > 0, r


def test_compile_fused_kernels_runs_each_tile_bucket(monkeypatch):
    from mlaserve.worker.model import load_model
    from mlaserve.worker.model import moe as moe_module

    model = load_model("tiny", device=DEV, dtype=torch.float32).model
    assert model.compile_fused_kernels() == 0  # float32: the fused path is off
    monkeypatch.setattr(
        moe_module, "FUSED_MAX_TOKENS", 16
    )  # the buckets 1 and 16 (interpreter: keep it small)
    seen = []
    real = moe_module.MoE.forward
    monkeypatch.setattr(moe_module.MoE, "forward", lambda self, x: seen.append(x.shape[0]) or real(self, x))
    with fused.forced(True):
        assert model.compile_fused_kernels() == 2
    assert seen == [1, 16]
