"""Random paged-cache inputs for kernel tests: permuted page tables, NaN in every unused slot."""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAGE = 64
D_QK = 576


@dataclass
class PagedCase:
    q: torch.Tensor  # [b, s_q, h_q, 576]
    k_cache: torch.Tensor  # [num_pages, 64, h_kv, 576], NaN outside the sequences
    block_table: torch.Tensor  # [b, max_pages] int32, a random permutation of physical pages
    cache_seqlens: torch.Tensor  # [b] int32
    dense_keys: list[torch.Tensor]  # per sequence [L, h_kv, 576]: the same latents, contiguous


def make_paged_case(
    seqlens: list[int],
    s_q: int,
    h_q: int,
    h_kv: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    device: str = "cpu",
    spare_pages: int = 3,
) -> PagedCase:
    b = len(seqlens)
    pages_per_seq = [(n + PAGE - 1) // PAGE for n in seqlens]
    max_pages = max(1, max(pages_per_seq))
    num_pages = sum(pages_per_seq) + spare_pages
    perm = torch.randperm(num_pages, generator=generator)
    k_cache = torch.full((num_pages, PAGE, h_kv, D_QK), float("nan"), dtype=dtype)
    # Unused page-table entries point at real (NaN-filled) pages, so a kernel that reads past a
    # sequence's end picks up NaN instead of failing quietly.
    block_table = perm[torch.randint(0, num_pages, (b, max_pages), generator=generator)].to(torch.int32)
    dense_keys = []
    cursor = 0
    for i, n in enumerate(seqlens):
        keys = torch.randn(n, h_kv, D_QK, generator=generator).to(dtype)
        dense_keys.append(keys)
        for p in range(pages_per_seq[i]):
            phys = int(perm[cursor])
            cursor += 1
            block_table[i, p] = phys
            chunk = keys[p * PAGE : (p + 1) * PAGE]
            k_cache[phys, : chunk.shape[0]] = chunk
    q = torch.randn(b, s_q, h_q, D_QK, generator=generator).to(dtype)
    return PagedCase(
        q=q.to(device),
        k_cache=k_cache.to(device),
        block_table=block_table.to(device),
        cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=device),
        dense_keys=dense_keys,
    )
