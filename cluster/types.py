"""Typed messages between the gRPC gateway, the pool and the batch runner (no Ray, no gRPC, no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from mlaserve.worker.load import WorkerLoad
from mlaserve.worker.types import RequestDelta, SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    """One client request as the cluster sees it. Exactly one of prompt / prompt_token_ids is set.
    resume_token_ids: output tokens the client already has (a failover from another gateway): the
    stream continues after them (cluster/resume.py)."""

    request_id: str
    sampling: SamplingParams
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    resume_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ClusterDelta:
    """A RequestDelta as it leaves the pool: which worker produced it."""

    delta: RequestDelta
    worker_id: str


@dataclass(frozen=True)
class WorkerStatus:
    """One row of GetClusterStatus / `mlaserve status`."""

    worker_id: str
    load: WorkerLoad
    alive: bool
    restarts: int = 0
