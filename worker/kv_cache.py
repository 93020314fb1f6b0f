"""The paged latent cache of one worker: one [num_pages, 64, 1, 576] tensor per layer.

MLA caches one latent per token (512 compressed KV + 64 RoPE key values) shared by all heads, so
h_kv = 1. The page allocator owns which physical page holds what; this module owns the memory and
turns per-sequence page tables into the int32 tensors the kernel reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import PAGE_SIZE, CacheConfig

HEAD_DIM = 576  # 512 latent + 64 RoPE
NUM_KV_HEADS = 1


def bytes_per_page(num_layers: int, dtype: torch.dtype) -> int:
    """Device bytes one page occupies across all layers."""
    return num_layers * PAGE_SIZE * NUM_KV_HEADS * HEAD_DIM * torch.empty((), dtype=dtype).element_size()


def num_pages_to_allocate(
    config: CacheConfig, num_layers: int, dtype: torch.dtype, device: torch.device
) -> int:
    """The page count `config` asks for: explicit, or measured from free device memory.

    On CUDA: memory_fraction of the card's total memory, minus what is already in use (the
    weights), minus activation_reserve_bytes, divided by the bytes of a page. On the CPU:
    cpu_default_pages.
    """
    if config.num_pages is not None:
        return config.num_pages
    if device.type != "cuda":
        return config.cpu_default_pages
    free, total = torch.cuda.mem_get_info(device)
    budget = int(total * config.memory_fraction) - (total - free) - config.activation_reserve_bytes
    pages = budget // bytes_per_page(num_layers, dtype)
    if pages < 1:
        raise RuntimeError(
            f"no room for the latent cache on {device}: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB, "
            f"memory_fraction={config.memory_fraction}, activation reserve "
            f"{config.activation_reserve_bytes / 2**30:.1f} GiB; lower the reserve or set num_pages"
        )
    return int(pages)


class KVCache:
    """Latent tensors of every layer. Unused slots are never read (the kernel stops at each
    sequence's length), which `poison=True` makes checkable: fresh pages then hold NaN."""

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        dtype: torch.dtype,
        device: torch.device | str,
        poison: bool = False,
        scratch_page: bool = False,
    ) -> None:
        if num_layers < 1 or num_pages < 1:
            raise ValueError(f"num_layers and num_pages must be >= 1, got {num_layers}, {num_pages}")
        self.num_layers = num_layers
        self.num_pages = num_pages  # pages the allocator hands out: 0 .. num_pages - 1
        # one more physical page, in no page table: where padding rows of a static decode batch
        # write their latents (worker/decode_graphs.py)
        self.scratch_page: int | None = num_pages if scratch_page else None
        self.dtype = dtype
        self.device = torch.device(device)
        fill = float("nan") if poison else 0.0
        physical = num_pages + (1 if scratch_page else 0)
        self.layers: list[torch.Tensor] = [  # each [num_pages (+ 1 scratch), 64, 1, 576]
            torch.full((physical, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM), fill, dtype=dtype, device=self.device)
            for _ in range(num_layers)
        ]

    @classmethod
    def from_config(
        cls,
        config: CacheConfig,
        num_layers: int,
        dtype: torch.dtype,
        device: torch.device | str,
        scratch_page: bool = False,
    ) -> KVCache:
        device = torch.device(device)
        pages = num_pages_to_allocate(config, num_layers, dtype, device)
        return cls(num_layers, pages, dtype, device, poison=config.poison_unused, scratch_page=scratch_page)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)


def block_table(
    page_tables: Sequence[Sequence[int]], device: torch.device | str, width: int | None = None
) -> torch.Tensor:  # [b, max_pages] int32
    """Page tables as one int32 tensor, right-padded with page 0 (never read past a sequence's length)."""
    width = max((len(t) for t in page_tables), default=0) if width is None else width
    rows = [list(t) + [0] * (width - len(t)) for t in page_tables]
    return torch.tensor(rows, dtype=torch.int32).reshape(len(page_tables), width).to(device)


def slot_mapping(
    page_tables: Sequence[Sequence[int]], starts: Sequence[int], num_new: int, device: torch.device | str
) -> torch.Tensor:  # [b, num_new] int64
    """Physical slot (page * 64 + offset) of each new token at positions start..start+num_new-1."""
    rows = []
    for table, start in zip(page_tables, starts, strict=True):
        rows.append(
            [table[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE for p in range(start, start + num_new)]
        )
    return torch.tensor(rows, dtype=torch.int64).reshape(len(page_tables), num_new).to(device)
