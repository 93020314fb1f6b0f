"""PoolConfig: how the worker pool is built, monitored and scaled (frozen; no Ray, no torch)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .router import POLICIES


@dataclass(frozen=True)
class AutoscaleConfig:
    """When the pool adds or removes workers (between PoolConfig.min_workers and max_workers).

    Scale up when, for ``up_sustain_s``, the mean predicted occupancy of the ready workers is at
    least ``up_occupancy`` or they hold at least ``up_queue_per_worker`` waiting requests each.
    Scale down one worker when the cluster's occupancy is at most ``down_occupancy`` and some
    worker has had nothing to do for ``down_idle_s``: it is drained first, then stopped. No two
    scaling actions come closer than ``cooldown_s``.
    """

    up_occupancy: float = 0.85
    up_queue_per_worker: float = 4.0
    up_sustain_s: float = 10.0
    down_occupancy: float = 0.25
    down_idle_s: float = 120.0
    cooldown_s: float = 30.0
    interval_s: float = 1.0  # how often the policy looks

    def __post_init__(self) -> None:
        if not (0.0 < self.up_occupancy <= 1.0):
            raise ValueError(f"up_occupancy must be in (0, 1], got {self.up_occupancy!r}")
        if not (0.0 <= self.down_occupancy < self.up_occupancy):
            raise ValueError(f"down_occupancy must be in [0, up_occupancy), got {self.down_occupancy!r}")
        if self.up_queue_per_worker <= 0:
            raise ValueError(f"up_queue_per_worker must be > 0, got {self.up_queue_per_worker!r}")
        for name in ("up_sustain_s", "down_idle_s", "cooldown_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s!r}")


@dataclass(frozen=True)
class PoolConfig:
    """Everything WorkerPool is built from.

    num_workers None: one per GPU in the Ray cluster, or 2 on a cluster without GPUs.
    min_workers / max_workers None: num_workers (no autoscaling unless they differ).
    num_gpus_per_worker None: 1 when the Ray cluster has GPUs, else 0 (the CPU reference backend,
    with num_cpus_per_worker CPUs). engine_kwargs go to Engine.from_pretrained (num_pages, dtype,
    device, config); ``device="cpu"`` is added for workers without a GPU.
    """

    model: str = "tiny"
    num_workers: int | None = None
    min_workers: int | None = None
    max_workers: int | None = None
    policy: str = "occupancy"
    engine_kwargs: Mapping[str, Any] = field(default_factory=dict)
    num_gpus_per_worker: float | None = None
    num_cpus_per_worker: float = 1.0
    resources_per_worker: Mapping[str, float] = field(default_factory=dict)
    load_poll_interval_s: float = 0.25
    health_check_interval_s: float = 2.0
    health_timeout_s: float = 30.0  # a worker silent this long is killed and replaced
    startup_timeout_s: float = 600.0  # start() waits this long for the first workers (then goes on)
    autoscale: AutoscaleConfig = field(default_factory=AutoscaleConfig)
    max_queued_per_worker: int = 256
    # Worker deaths never fail a request by their number: its stream resumes on another worker
    # (cluster/resume.py) unless it is the suspected cause (cluster/poison.py).
    poison_strikes: int = 3  # deaths during a suspect's trials after which it fails (SuspectedPoison)
    retry_patience_s: float = 300.0  # how long a request that lost its worker waits for another one
    max_retries: int = 2  # times one request may move on after an error that left its worker alive
    output_fraction: float = 0.5  # router: expected output as a fraction of max_tokens
    seed: int = 0  # router seed (power_of_two)
    ray_address: str | None = None  # ray.init(address=...) when Ray is not initialised yet

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a checkpoint directory or a preset name, got {self.model!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for name in ("num_workers", "min_workers", "max_workers"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < (0 if name == "min_workers" else 1)):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        lo, hi = self.min_workers, self.max_workers
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"min_workers ({lo}) must be <= max_workers ({hi})")
        if self.num_gpus_per_worker is not None and self.num_gpus_per_worker < 0:
            raise ValueError(f"num_gpus_per_worker must be >= 0 or None, got {self.num_gpus_per_worker!r}")
        if self.num_cpus_per_worker < 0:
            raise ValueError(f"num_cpus_per_worker must be >= 0, got {self.num_cpus_per_worker!r}")
        for name in (
            "load_poll_interval_s",
            "health_check_interval_s",
            "health_timeout_s",
            "startup_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_queued_per_worker < 1:
            raise ValueError(f"max_queued_per_worker must be >= 1, got {self.max_queued_per_worker!r}")
        if not isinstance(self.poison_strikes, int) or self.poison_strikes < 1:
            raise ValueError(f"poison_strikes must be an integer >= 1, got {self.poison_strikes!r}")
        if not self.retry_patience_s > 0:
            raise ValueError(f"retry_patience_s must be > 0, got {self.retry_patience_s!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries!r}")
        if not (0.0 <= self.output_fraction <= 1.0):
            raise ValueError(f"output_fraction must be in [0, 1], got {self.output_fraction!r}")
        # Private copies: a caller's later edits to its dicts cannot reach the config.
        object.__setattr__(self, "engine_kwargs", dict(self.engine_kwargs))
        object.__setattr__(self, "resources_per_worker", dict(self.resources_per_worker))

    def worker_counts(self, num_gpus_in_cluster: int) -> tuple[int, int, int]:
        """(initial, min, max) workers, the defaults resolved against the cluster's GPUs."""
        n = self.num_workers if self.num_workers is not None else (num_gpus_in_cluster or 2)
        lo = self.min_workers if self.min_workers is not None else min(n, self.max_workers or n)
        hi = self.max_workers if self.max_workers is not None else max(n, lo)
        return min(max(n, lo), hi), lo, hi
