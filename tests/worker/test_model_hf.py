"""Parity with transformers: our paged, weight-absorbed MLA model vs the HF DeepSeek classes' forward.

Checkpoints are written by transformers' own classes (save_pretrained) and read back by load_model;
the oracle is the in-memory HF model that wrote them, run on the full token sequence at every step.
Prefill is batched (left padding) and chunked, decode steps are batched; page tables are permuted
and unused pages NaN-poisoned.
"""

from __future__ import annotations

import random

import pytest
import torch

from mlaserve.worker.model import load_model
from tests.worker.hf_checkpoints import EOS, tiny_v2_config, tiny_v3_config, write_hf_checkpoint
from tests.worker.paged_harness import PagedCache, Sequence

YARN_V2 = {
    "type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}

VARIANTS = {
    "v2-greedy": lambda: tiny_v2_config(),
    "v2-group-limited-yarn": lambda: tiny_v2_config(
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.5,
        rope_scaling=YARN_V2,
        max_position_embeddings=2560,  # 40 x 64: YaRN's factor agrees with the context ratio
    ),
    "v3-noaux-yarn-bias": lambda: tiny_v3_config(attention_bias=True),
    "v3-halves-rope-no-qlora": lambda: tiny_v3_config(
        rope_interleave=False, q_lora_rank=None, n_group=2, topk_group=1, norm_topk_prob=False
    ),
}


@torch.no_grad()
def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:  # [len(tokens), vocab]
    return hf_model(input_ids=torch.tensor([tokens])).logits[0].float()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * scale, f"{what}: max abs diff {err:.3g} > 1e-4 x logit scale {scale:.3g}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefill_and_decode_match_transformers(variant, tmp_path, seed):
    rng = random.Random(seed)
    ckpt = write_hf_checkpoint(VARIANTS[variant](), tmp_path / variant, seed=seed)
    loaded = load_model(str(ckpt.path), device="cpu", dtype=torch.float32)
    cfg = loaded.config
    cache = PagedCache(cfg.num_hidden_layers, num_pages=12, seed=seed)
    heads = cfg.num_attention_heads

    def prompt(n: int) -> list[int]:
        return [rng.randrange(EOS + 1) for _ in range(n)]

    a, b = Sequence(), Sequence()
    prompt_a, prompt_b = prompt(rng.randint(65, 100)), prompt(rng.randint(20, 60))
    split = rng.randint(5, len(prompt_b) - 5)
    # Prefill 1: all of A with the first chunk of B, left-padded into one batch.
    out_a, out_b = cache.forward(loaded.model, [a, b], [prompt_a, prompt_b[:split]], num_heads=heads)
    assert_close(out_a, hf_logits(ckpt.model, prompt_a), f"{variant} prefill A")
    assert_close(out_b, hf_logits(ckpt.model, prompt_b[:split]), f"{variant} prefill B chunk 1")
    # Prefill 2: the rest of B, attending to its cached first chunk.
    (out_b,) = cache.forward(loaded.model, [b], [prompt_b[split:]], num_heads=heads)
    assert_close(out_b, hf_logits(ckpt.model, prompt_b)[split:], f"{variant} prefill B chunk 2")

    next_a, next_b = int(out_a[-1].argmax()), int(out_b[-1].argmax())
    for step in range(4):
        out_a, out_b = cache.forward(loaded.model, [a, b], [[next_a], [next_b]], num_heads=heads)
        ref_a, ref_b = hf_logits(ckpt.model, a.tokens)[-1:], hf_logits(ckpt.model, b.tokens)[-1:]
        assert_close(out_a, ref_a, f"{variant} decode step {step} A")
        assert_close(out_b, ref_b, f"{variant} decode step {step} B")
        next_a, next_b = int(out_a[-1].argmax()), int(out_b[-1].argmax())
    for c in cache.caches:  # the poison is still there: nothing wrote outside the sequences' slots
        assert torch.isnan(c).any()


GPU_VARIANTS = {
    # Dense (first_k_dense_replace = all layers): bf16 rounding then moves logits smoothly.
    "v2-dense": lambda: tiny_v2_config(first_k_dense_replace=3),
    "v3-dense-yarn": lambda: tiny_v3_config(first_k_dense_replace=3),
    # With MoE a bf16 rounding can flip a near-tie in routing and move one position's logits a lot.
    "v3-noaux-yarn-bias": VARIANTS["v3-noaux-yarn-bias"],
}


@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(GPU_VARIANTS))
def test_bf16_on_the_sm90_kernel_tracks_transformers(variant, tmp_path, seed):
    """The serving configuration: bf16 weights and cache on a Hopper GPU through the compiled kernel,
    against transformers in float32. bf16 rounding costs ~1-2% of the logit scale per position; for
    MoE models a few positions may route differently, so there only the median position is bounded."""
    rng = random.Random(seed)
    ckpt = write_hf_checkpoint(GPU_VARIANTS[variant](), tmp_path / variant, seed=seed)
    loaded = load_model(str(ckpt.path), device="cuda", dtype=torch.bfloat16)
    cfg = loaded.config
    moe = any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    cache = PagedCache(cfg.num_hidden_layers, num_pages=12, seed=seed, dtype=torch.bfloat16, device="cuda")
    heads = cfg.num_attention_heads
    a, b = Sequence(), Sequence()
    prompt_a = [rng.randrange(EOS + 1) for _ in range(rng.randint(65, 120))]
    prompt_b = [rng.randrange(EOS + 1) for _ in range(rng.randint(10, 60))]
    errors = []  # per position: max abs diff / logit scale
    outs = cache.forward(loaded.model, [a, b], [prompt_a, prompt_b], num_heads=heads)
    for _ in range(4):
        for seq, out in zip((a, b), outs):
            ref = hf_logits(ckpt.model, seq.tokens)[-len(out) :]
            errors.append((out - ref).abs().amax(dim=-1) / ref.abs().max())
        nxt = [int(o[-1].argmax()) for o in outs]
        outs = cache.forward(loaded.model, [a, b], [[nxt[0]], [nxt[1]]], num_heads=heads)
    err = torch.cat(errors)
    bound = err.median() if moe else err.max()
    assert bound <= 3e-2, f"{variant}: bf16 error {bound:.3g} of the logit scale (max {err.max():.3g})"
