"""WorkerLoad: what a worker reports to the router (no torch, no Ray)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkerLoad:
    worker_id: str
    seq: int  # monotonic per worker: the router keeps the newest report
    total_pages: int
    free_pages: int  # pages on the free list (cached-but-unreferenced pages count as free)
    reserved_pages: int  # pages promised to admitted requests' future tokens
    running: int  # requests in the running batch
    waiting: int  # requests queued for admission
    queued_prompt_tokens: int  # prompt tokens of waiting requests
    tokens_per_s: float  # recent decode throughput
    healthy: bool = True
    draining: bool = False
    device: str = "cpu"  # e.g. "cuda:0 NVIDIA H200" or "cpu"
    page_size: int = 64
    cached_page_hashes: frozenset[int] = field(
        default_factory=frozenset
    )  # full prompt pages held in the prefix cache

    @property
    def used_pages(self) -> int:
        return self.total_pages - self.free_pages

    @property
    def occupancy(self) -> float:
        return self.used_pages / self.total_pages if self.total_pages else 1.0
