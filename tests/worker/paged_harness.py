"""A minimal paged latent cache for model tests: NaN-poisoned pages handed out in a random order.

Each sequence gets physical pages from a shuffled free list (so page tables are permutations), the
unused tail of every page table points at random pages (poison the kernel must never read), and a
forward over several sequences is left-padded to a common s_q with slot -1 (not written).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from mlaserve.worker.attention_metadata import AttentionMetadata
from mlaserve.worker.kernels import get_mla_metadata

PAGE = 64


@dataclass
class Sequence:
    tokens: list[int] = field(default_factory=list)  # every token whose latent is in the cache
    pages: list[int] = field(default_factory=list)


class PagedCache:
    def __init__(
        self, num_layers: int, num_pages: int, *, seed: int, dtype=torch.float32, device="cpu"
    ) -> None:
        self.rng = random.Random(seed)
        self.num_pages = num_pages
        self.device = torch.device(device)
        self.caches = [
            torch.full((num_pages, PAGE, 1, 576), float("nan"), dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
        self.free = list(range(num_pages))
        self.rng.shuffle(self.free)

    def _reserve(self, seq: Sequence, length: int) -> None:
        while len(seq.pages) * PAGE < length:
            seq.pages.append(self.free.pop())

    def forward(
        self, model, seqs: list[Sequence], new_tokens: list[list[int]], *, num_heads: int
    ) -> list[torch.Tensor]:
        """Runs one model forward appending new_tokens[i] to seqs[i]; returns each sequence's logits
        for its new tokens ([n_i, vocab] float32)."""
        s_q = max(len(t) for t in new_tokens)
        b = len(seqs)
        ids = torch.zeros(b, s_q, dtype=torch.int64)
        positions = torch.zeros(b, s_q, dtype=torch.int64)
        slots = torch.full((b, s_q), -1, dtype=torch.int64)
        for i, (seq, new) in enumerate(zip(seqs, new_tokens)):
            start, pad = len(seq.tokens), s_q - len(new)
            self._reserve(seq, start + len(new))
            for j, tok in enumerate(new):
                pos = start + j
                ids[i, pad + j] = tok
                positions[i, pad + j] = pos
                slots[i, pad + j] = seq.pages[pos // PAGE] * PAGE + pos % PAGE
            seq.tokens.extend(new)
        max_pages = max(len(s.pages) for s in seqs) + 2
        table = torch.tensor(
            [
                s.pages + [self.rng.randrange(self.num_pages) for _ in range(max_pages - len(s.pages))]
                for s in seqs
            ],
            dtype=torch.int32,
        )
        seqlens = torch.tensor([len(s.tokens) for s in seqs], dtype=torch.int32)
        dev = self.device
        tile_md, num_splits = get_mla_metadata(seqlens.to(dev), s_q * num_heads, 1)
        meta = AttentionMetadata(
            block_table=table.to(dev),
            cache_seqlens=seqlens.to(dev),
            slot_mapping=slots.to(dev),
            tile_scheduler_metadata=tile_md,
            num_splits=num_splits,
        )
        logits = model(ids.to(dev), positions.to(dev), self.caches, meta)  # [b, s_q, vocab]
        return [logits[i, s_q - len(new) :].cpu() for i, new in enumerate(new_tokens)]
