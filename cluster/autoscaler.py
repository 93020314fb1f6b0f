"""Autoscaling policy: worker snapshots -> add workers / drain one (pure; the pool acts on it).

Scale-up needs sustained pressure (mean occupancy or queue depth over its threshold for
``up_sustain_s``) and is not stacked while a worker is still starting (on a Ray cluster with an
autoscaler, a pending GPU actor is what brings up its node). Scale-down drains one worker that has
been idle for ``down_idle_s`` while the cluster's occupancy is low; the newest such worker goes
first. Actions are at least ``cooldown_s`` apart; min_workers is restored at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .pool_config import AutoscaleConfig


@dataclass(frozen=True)
class WorkerSnapshot:
    worker_id: str
    state: str  # "starting" | "ready" | "draining"
    occupancy: float = 0.0  # predicted occupancy (used + promised pages) / total
    waiting: int = 0  # requests queued on the worker (reported + routed since)
    idle: bool = False  # nothing running, waiting or in flight


@dataclass(frozen=True)
class ScaleDecision:
    add: int = 0
    drain: tuple[str, ...] = ()
    reason: str = ""

    @property
    def noop(self) -> bool:
        return self.add == 0 and not self.drain


class Autoscaler:
    """Stateful (pressure and idle timers); call ``decide`` periodically with a monotonic clock."""

    def __init__(self, config: AutoscaleConfig, min_workers: int, max_workers: int) -> None:
        if not 0 <= min_workers <= max_workers:
            raise ValueError(f"need 0 <= min_workers <= max_workers, got {min_workers}, {max_workers}")
        self.config = config
        self.min_workers = min_workers
        self.max_workers = max_workers
        self._pressure_since: float | None = None
        self._idle_since: dict[str, float] = {}
        self._last_action = -float("inf")

    def decide(self, now: float, workers: Sequence[WorkerSnapshot]) -> ScaleDecision:
        cfg = self.config
        ready = [w for w in workers if w.state == "ready"]
        starting = [w for w in workers if w.state == "starting"]
        capacity = len(ready) + len(starting)
        for w in ready:
            if w.idle:
                self._idle_since.setdefault(w.worker_id, now)
            else:
                self._idle_since.pop(w.worker_id, None)
        live = {w.worker_id for w in ready}
        for wid in [w for w in self._idle_since if w not in live]:
            del self._idle_since[wid]

        if capacity < self.min_workers:
            return self._act(now, ScaleDecision(add=self.min_workers - capacity, reason="below min_workers"))

        occupancy = sum(w.occupancy for w in ready) / len(ready) if ready else 0.0
        queue = sum(w.waiting for w in ready) / len(ready) if ready else 0.0
        pressure = bool(ready) and (occupancy >= cfg.up_occupancy or queue >= cfg.up_queue_per_worker)
        if not pressure:
            self._pressure_since = None
        elif self._pressure_since is None:
            self._pressure_since = now
        cooled = now - self._last_action >= cfg.cooldown_s

        if (
            pressure
            and self._pressure_since is not None
            and now - self._pressure_since >= cfg.up_sustain_s
            and not starting
            and capacity < self.max_workers
            and cooled
        ):
            self._pressure_since = None
            return self._act(
                now, ScaleDecision(add=1, reason=f"occupancy {occupancy:.0%}, {queue:.1f} queued per worker")
            )

        if (
            not pressure
            and not starting
            and capacity > self.min_workers
            and cooled
            and occupancy <= cfg.down_occupancy
        ):
            idle = [wid for wid, since in self._idle_since.items() if now - since >= cfg.down_idle_s]
            if idle:
                victim = max(idle, key=lambda wid: (len(wid), wid))  # the newest of w0, w1, ...
                del self._idle_since[victim]
                return self._act(
                    now, ScaleDecision(drain=(victim,), reason=f"{victim} idle, occupancy {occupancy:.0%}")
                )
        return ScaleDecision()

    def _act(self, now: float, decision: ScaleDecision) -> ScaleDecision:
        self._last_action = now
        return decision
