"""Model pieces against transformers' DeepSeek pieces on fresh random inputs: RoPE layouts, routers, experts."""

from __future__ import annotations

import pytest
import torch
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf3

from mlaserve.worker.model import ModelConfig, fused
from mlaserve.worker.model.moe import Experts, Router
from mlaserve.worker.model.rope import RotaryEmbedding
from tests.worker.hf_checkpoints import hf_written, tiny_v2_config, tiny_v3_config

YARN = {
    "type": "yarn",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "original_max_position_embeddings": 128,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.9,
    "mscale_all_dim": 0.8,
}


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_matches_transformers_v3(interleave, seed):
    torch.manual_seed(seed)
    hf_cfg = tiny_v3_config(rope_scaling=YARN, rope_interleave=interleave)
    ours = RotaryEmbedding(ModelConfig.from_dict(hf_written(hf_cfg)).rope)
    positions = torch.randint(0, 1024, (2, 7))
    q, k = torch.randn(2, 4, 7, 64), torch.randn(2, 1, 7, 64)  # HF layout [b, heads, s, 64]
    cos, sin = hf3.DeepseekV3RotaryEmbedding(hf_cfg)(q, positions)
    apply = hf3.apply_rotary_pos_emb_interleave if interleave else hf3.apply_rotary_pos_emb
    hf_q, hf_k = apply(q, k, cos, sin)
    c, s = ours.cos_sin(positions)
    our_q = ours.apply(q.transpose(1, 2), c, s).transpose(1, 2)  # ours: [b, s, heads, 64]
    our_k = ours.apply(k[:, 0], c, s)
    # Layouts may differ (HF de-interleaves); what attention sees, q.k, must not.
    torch.testing.assert_close(
        our_q @ our_k[:, None].transpose(-1, -2), hf_q @ hf_k.transpose(-1, -2), rtol=1e-5, atol=1e-5
    )
    if not interleave:
        torch.testing.assert_close(our_q, hf_q, rtol=1e-6, atol=1e-6)


def test_rope_matches_transformers_v2_complex_form(seed):
    torch.manual_seed(seed)
    hf_cfg = tiny_v2_config(rope_scaling=YARN)
    ours = RotaryEmbedding(ModelConfig.from_dict(hf_written(hf_cfg)).rope)
    positions = torch.randint(0, 1024, (3, 5))
    q, k = torch.randn(3, 4, 5, 64), torch.randn(3, 1, 5, 64)
    freqs_cis = hf2.DeepseekV2RotaryEmbedding(hf_cfg)(q, positions)
    hf_q, hf_k = hf2.apply_rotary_emb(q, k, freqs_cis)
    c, s = ours.cos_sin(positions)
    torch.testing.assert_close(
        ours.apply(q.transpose(1, 2), c, s).transpose(1, 2), hf_q, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(ours.apply(k[:, 0], c, s), hf_k[:, 0], rtol=1e-5, atol=1e-5)


ROUTERS = {
    "v2-greedy-k1": (tiny_v2_config, dict(num_experts_per_tok=1, routed_scaling_factor=2.0)),
    "v2-group-limited": (
        tiny_v2_config,
        dict(
            topk_method="group_limited_greedy",
            n_routed_experts=16,
            n_group=4,
            topk_group=2,
            num_experts_per_tok=4,
            routed_scaling_factor=16.0,
        ),
    ),
    "v3-noaux": (tiny_v3_config, dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)),
    "v3-noaux-unnormalised": (
        tiny_v3_config,
        dict(n_routed_experts=12, n_group=3, topk_group=3, num_experts_per_tok=3, norm_topk_prob=False),
    ),
}


@pytest.mark.parametrize("case", sorted(ROUTERS))
def test_router_matches_transformers(case, seed):
    make, overrides = ROUTERS[case]
    hf_cfg = make(**overrides)
    torch.manual_seed(seed)
    is_v3 = hf_cfg.model_type == "deepseek_v3"
    hf_router = (hf3.DeepseekV3TopkRouter if is_v3 else hf2.DeepseekV2TopkRouter)(hf_cfg)
    with torch.no_grad():
        hf_router.weight.normal_(0, hf_cfg.hidden_size**-0.5)
        if is_v3:
            hf_router.e_score_correction_bias.normal_(0, 0.1)
    cfg = ModelConfig.from_dict(hf_written(hf_cfg))
    ours = Router(cfg.moe, cfg.hidden_size)
    ours.load_state_dict(hf_router.state_dict())
    x = torch.randn(128, cfg.hidden_size)
    _, hf_w, hf_ids = hf_router(x)
    w, ids = ours(x)
    hf_order, order = hf_ids.argsort(dim=-1), ids.argsort(dim=-1)
    assert torch.equal(hf_ids.gather(1, hf_order), ids.gather(1, order))
    torch.testing.assert_close(w.gather(1, order), hf_w.gather(1, hf_order), rtol=1e-6, atol=1e-7)


def test_experts_match_transformers(seed):
    hf_cfg = tiny_v3_config(n_routed_experts=8, num_experts_per_tok=3, n_group=1, topk_group=1)
    torch.manual_seed(seed)
    hf_experts = hf3.DeepseekV3Experts(hf_cfg)
    with torch.no_grad():
        for p in hf_experts.parameters():
            p.normal_(0, 0.2)
    cfg = ModelConfig.from_dict(hf_written(hf_cfg))
    ours = Experts(cfg.moe, cfg.hidden_size)
    ours.load_state_dict(hf_experts.state_dict())
    x = torch.randn(50, cfg.hidden_size)
    ids = torch.stack([torch.randperm(8)[:3] for _ in range(50)])  # distinct experts per token
    ids[:10] = torch.tensor([0, 1, 2])  # a popular trio, and experts 6/7 rarely or never hit
    weights = torch.rand(50, 3)
    torch.testing.assert_close(ours(x, ids, weights), hf_experts(x, ids, weights), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("fused_path", [True, False])
def test_grouped_gemm_experts_on_gpu_match_the_loop(seed, fused_path):
    """bf16 on CUDA takes the fused Triton kernels (or, with them off, the grouped-GEMM path); the
    float32 CPU loop is the oracle of both."""
    cfg = ModelConfig.from_dict(
        hf_written(
            tiny_v3_config(
                n_routed_experts=16, n_group=1, topk_group=1, num_experts_per_tok=4, hidden_size=128
            )
        )
    )
    gen = torch.Generator().manual_seed(seed)
    ours = Experts(cfg.moe, cfg.hidden_size)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    x = torch.randn(40, cfg.hidden_size, generator=gen)
    ids = torch.stack([torch.randperm(16, generator=gen)[:4] for _ in range(40)])
    ids[:, 0] = 3  # one expert everyone uses; several never used
    weights = torch.rand(40, 4, generator=gen)
    gpu = Experts(cfg.moe, cfg.hidden_size).to("cuda", torch.bfloat16)
    gpu.load_state_dict(ours.state_dict())
    with fused.forced(fused_path):
        got = gpu(x.to("cuda", torch.bfloat16), ids.cuda(), weights.cuda()).float().cpu()
    ref = ours(x.to(torch.bfloat16).float(), ids, weights)
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
