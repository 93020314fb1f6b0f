"""Request errors the cluster raises; the gRPC edge maps each to one status code."""

from __future__ import annotations

from mlaserve.worker.errors import RequestError


class ClusterError(Exception):
    """Base of the errors a request can end with."""


class InvalidRequest(RequestError, ClusterError):
    """Bad input (-> INVALID_ARGUMENT). `field` names the offending request field; the engine's
    RequestError with the cluster's base class, so either side's handler catches it."""


class QueueFull(ClusterError):
    """Admission queues are full (-> RESOURCE_EXHAUSTED)."""


class Draining(ClusterError):
    """The cluster is draining or has no live worker (-> UNAVAILABLE)."""


class SuspectedPoison(ClusterError):
    """The request is the suspected cause of repeated worker deaths (cluster/poison.py): it failed
    and is not retried (-> INTERNAL, with the message naming the workers)."""
