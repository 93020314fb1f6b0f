"""Errors the engine raises for bad requests (no torch: the cluster may import and match them)."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine refuses. `field` names the offending request field
    ("request_id", "prompt", "max_tokens", "sampling"); str(e) reads "field: message"."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # survive pickling (Ray ships exceptions between processes)
        return (type(self), (self.field, self.message))


class QueueFullError(RuntimeError):
    """The engine's waiting queue already holds SchedulerConfig.max_waiting requests."""
