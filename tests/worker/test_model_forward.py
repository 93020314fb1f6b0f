"""The model's forward contract: argument checks that name the field, padding slots, only_last."""

from __future__ import annotations

import pytest
import torch

from mlaserve.worker.attention_metadata import AttentionMetadata
from mlaserve.worker.kernels import get_mla_metadata
from mlaserve.worker.model import load_model
from tests.worker.paged_harness import PagedCache, Sequence


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype=torch.float32)


def make_meta(
    seqlens: list[int], slots: torch.Tensor, heads: int, pages_per_seq: int = 2
) -> AttentionMetadata:
    b, s_q = slots.shape
    lens = torch.tensor(seqlens, dtype=torch.int32)
    md, splits = get_mla_metadata(lens, s_q * heads, 1)
    table = torch.arange(b * pages_per_seq, dtype=torch.int32).view(b, pages_per_seq)
    return AttentionMetadata(table, lens, slots, md, splits)


def test_bad_arguments_are_named(tiny):
    layers, heads = tiny.config.num_hidden_layers, tiny.config.num_attention_heads
    caches = [torch.zeros(4, 64, 1, 576) for _ in range(layers)]
    ids = torch.zeros(1, 3, dtype=torch.int64)
    pos = torch.arange(3)[None]
    meta = make_meta([3], torch.arange(3)[None], heads)
    with pytest.raises(ValueError, match="kv_caches"):
        tiny.model(ids, pos, caches[:-1], meta)
    with pytest.raises(ValueError, match="positions"):
        tiny.model(ids, pos[:, :2], caches, meta)
    with pytest.raises(ValueError, match="input_ids"):
        tiny.model(ids[0], pos[0], caches, meta)
    with pytest.raises(ValueError, match="kv_cache"):
        tiny.model(ids, pos, [torch.zeros(4, 32, 1, 576)] * layers, meta)
    with pytest.raises(ValueError, match="slot_mapping"):
        tiny.model(ids, pos, caches, make_meta([3], torch.tensor([[0, 1, 4 * 64]]), heads))


def test_padding_slots_are_not_written_and_only_last_matches(tiny, seed):
    gen = torch.Generator().manual_seed(seed)
    cfg = tiny.config
    tokens = torch.randint(0, 258, (5,), generator=gen).tolist()
    full = PagedCache(cfg.num_hidden_layers, 4, seed=seed)
    (ref,) = full.forward(tiny.model, [Sequence()], [tokens], num_heads=cfg.num_attention_heads)
    # The same 5 tokens left-padded to 8: padding rows carry slot -1 and garbage ids/positions.
    caches = [torch.full((4, 64, 1, 576), float("nan")) for _ in range(cfg.num_hidden_layers)]
    ids = torch.tensor([[7, 7, 7, *tokens]])
    pos = torch.tensor([[99, 99, 99, 0, 1, 2, 3, 4]])
    slots = torch.tensor([[-1, -1, -1, 0, 1, 2, 3, 4]])
    meta = make_meta([5], slots, cfg.num_attention_heads)  # page table [0, 1]: tokens live in page 0
    logits = tiny.model(ids, pos, caches, meta)
    assert (logits[0, 3:] - ref).abs().max() <= 1e-5 * ref.abs().max()
    last = tiny.model(ids, pos, [torch.full_like(c, float("nan")) for c in caches], meta, only_last=True)
    assert last.shape == (1, 1, cfg.vocab_size) and torch.allclose(last[0, 0], ref[-1], rtol=1e-5, atol=1e-5)
    for c in caches:  # page 0 holds exactly the 5 real rows; nothing else was written
        assert torch.isfinite(c[0, :5]).all() and torch.isnan(c[0, 5:]).all() and torch.isnan(c[1:]).all()
