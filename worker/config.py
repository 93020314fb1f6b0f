"""Engine configuration: frozen dataclasses built once and passed down (no torch here).

Values measured at run time (how many pages fit in free device memory) are returned as new
objects by the code that measures them; nothing here is ever written back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PAGE_SIZE = 64  # tokens per page of the latent cache (fixed by the kernel)


@dataclass(frozen=True)
class CacheConfig:
    """How big the paged latent cache is and how it is shared.

    num_pages: an explicit page count; None sizes the cache from free device memory on CUDA
    (memory_fraction of the card's total, after the weights and activation_reserve_bytes) and
    uses cpu_default_pages on the CPU.
    """

    num_pages: int | None = None
    memory_fraction: float = 0.90
    activation_reserve_bytes: int = 2 << 30
    cpu_default_pages: int = 256
    enable_prefix_caching: bool = True
    poison_unused: bool = False  # fill the fresh cache with NaN (tests: unused slots must never be read)

    def __post_init__(self) -> None:
        if self.num_pages is not None and (not isinstance(self.num_pages, int) or self.num_pages < 1):
            raise ValueError(f"num_pages must be an integer >= 1 or None, got {self.num_pages!r}")
        if not (0.0 < self.memory_fraction <= 1.0):
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction!r}")
        if self.activation_reserve_bytes < 0:
            raise ValueError(f"activation_reserve_bytes must be >= 0, got {self.activation_reserve_bytes!r}")
        if self.cpu_default_pages < 1:
            raise ValueError(f"cpu_default_pages must be >= 1, got {self.cpu_default_pages!r}")

    @property
    def page_size(self) -> int:
        return PAGE_SIZE


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching limits of one engine step.

    max_running_seqs: requests decoded together at most.
    max_batched_tokens: tokens computed in one step (each decode counts 1, prefills their new
    tokens); a prompt longer than what is left is prefilled in chunks over several steps.
    max_waiting: requests queued for admission at most (None: unbounded).
    watermark_pages: pages kept free when admitting new prompts, so running decodes can grow
    without preempting at once.
    """

    max_running_seqs: int = 256
    max_batched_tokens: int = 4096
    max_waiting: int | None = None
    watermark_pages: int = 0

    def __post_init__(self) -> None:
        if self.max_running_seqs < 1:
            raise ValueError(f"max_running_seqs must be >= 1, got {self.max_running_seqs!r}")
        if self.max_batched_tokens < 1:
            raise ValueError(f"max_batched_tokens must be >= 1, got {self.max_batched_tokens!r}")
        if self.max_waiting is not None and self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0 or None, got {self.max_waiting!r}")
        if self.watermark_pages < 0:
            raise ValueError(f"watermark_pages must be >= 0, got {self.watermark_pages!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything an Engine is built from besides the model.

    max_model_len: caps the model's context (None: the model's max_position_embeddings).
    seed: seeds the generators of sampled requests that carry no seed of their own.
    prefill_group_equal_lengths: run prefills together in left-padded batches (False: one
    forward per prefill).
    prefill_max_padding: a prefill joins a batch while the batch's padding tokens stay within this
    multiple of its real tokens (0: only prefills with the same number of new tokens share one).
    decode_graphs: decode forwards run on the persistent decode batch (worker/decode_batch.py) and
    are replayed as CUDA graphs, one per batch bucket, all captured when the engine starts
    (worker/decode_graphs.py). None (default): on CUDA devices; False: eager forwards on the same
    buffers (the CPU always runs eagerly; True there is an error).
    overlap: step() launches step N + 1 before it reads step N's tokens (the default; see
    worker/engine.py). False: every step() waits for its own tokens.
    """

    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_model_len: int | None = None
    seed: int = 0
    prefill_group_equal_lengths: bool = True
    prefill_max_padding: float = 0.0
    decode_graphs: bool | None = None
    overlap: bool = True
    throughput_window_s: float = 10.0  # tokens/s in load() is measured over this window

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1 or None, got {self.max_model_len!r}")
        if not self.prefill_max_padding >= 0:
            raise ValueError(f"prefill_max_padding must be >= 0, got {self.prefill_max_padding!r}")
        if self.throughput_window_s <= 0:
            raise ValueError(f"throughput_window_s must be > 0, got {self.throughput_window_s!r}")

    def use_decode_graphs(self, device: Any) -> bool:
        """Whether decode forwards replay CUDA graphs on `device` (a torch.device)."""
        cuda = getattr(device, "type", None) == "cuda"
        if self.decode_graphs and not cuda:
            raise ValueError(f"decode_graphs=True needs a CUDA device, the engine runs on {device}")
        return cuda if self.decode_graphs is None else self.decode_graphs
