"""Request errors the cluster raises; the gRPC edge maps each to one status code."""

from __future__ import annotations


class ClusterError(Exception):
    """Base of the errors a request can end with."""


class InvalidRequest(ClusterError):
    """Bad input (-> INVALID_ARGUMENT). `field` names the offending request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # survive pickling (Ray ships exceptions between processes)
        return (type(self), (self.field, self.message))


class QueueFull(ClusterError):
    """Admission queues are full (-> RESOURCE_EXHAUSTED)."""


class Draining(ClusterError):
    """The cluster is draining or has no live worker (-> UNAVAILABLE)."""
