"""Engine vs transformers: greedy generation of 32 tokens, token for token, and the logits of every
decode step, for tiny random V2-style and V3-style checkpoints written by transformers itself."""

from __future__ import annotations

import random

import pytest
import torch

from mlaserve.worker.engine import Engine
from mlaserve.worker.types import FinishReason, SamplingParams
from tests.worker.hf_checkpoints import EOS, write_v2_checkpoint, write_v3_checkpoint
from tests.worker.test_engine import assert_same_greedy, record_logits

WRITERS = {"v2": write_v2_checkpoint, "v3": write_v3_checkpoint}
NEW_TOKENS = 32


@torch.no_grad()
def hf_greedy(model, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' own greedy generate (float32): the new tokens and the raw logits of each step."""
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, len(prompt) :].tolist(), [row[0].float() for row in out.logits]


@pytest.mark.parametrize("variant", sorted(WRITERS))
def test_greedy_and_decode_logits_match_transformers(variant: str, tmp_path, seed: int) -> None:
    rng = random.Random(seed)
    ckpt = WRITERS[variant](tmp_path / variant, seed=seed)
    engine = Engine.from_pretrained(str(ckpt.path), device="cpu", dtype=torch.float32, num_pages=12)
    assert engine.max_model_len == ckpt.model.config.max_position_embeddings
    # Lengths on both sides of a page boundary; the last prompt shares the first one's first page.
    prompts = [[rng.randrange(EOS + 1) for _ in range(n)] for n in (rng.randint(65, 110), rng.randint(2, 40))]
    prompts.append(prompts[0][:64] + [rng.randrange(EOS + 1) for _ in range(rng.randint(1, 30))])
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=1, temperature=0.0))  # fills the prefix cache
    rows = record_logits(engine)
    outs = engine.generate(prompts, greedy)
    assert (
        outs[0].usage.cached_tokens >= 64
        and outs[2].usage.cached_tokens == 64
        and outs[1].usage.cached_tokens == 0
    )
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        ref_tokens, ref_logits = hf_greedy(ckpt.model, prompt)
        assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == NEW_TOKENS
        assert_same_greedy(ref_tokens, ref_logits, out.token_ids, f"{variant} prompt {i}")
        ours = rows[out.request_id]
        for k, (a, b) in enumerate(zip(ours, ref_logits)):
            if out.token_ids[:k] != tuple(ref_tokens[:k]):
                break  # past a (near-tie) divergence the two runs see different sequences
            scale = float(b.abs().max())
            err = float((a - b).abs().max())
            assert err <= 1e-4 * scale, (
                f"{variant} prompt {i} step {k}: logits differ by {err:.3g} (scale {scale:.3g})"
            )
