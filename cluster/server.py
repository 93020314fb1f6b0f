"""The gRPC gateway process: a grpc.aio server in front of a WorkerPool.

One `GatewayServer` serves `mlaserve.v1.Decoder` (cluster/service.py), the standard
`grpc.health.v1.Health` service (SERVING; NOT_SERVING once draining) and server reflection, with
limits on message size and concurrent RPCs, and Prometheus metrics on an HTTP port. With
`ServerConfig.http` set it also serves the OpenAI-compatible HTTP API (cluster/openai_http.py)
over the same core: same pool, router, auth, draining and metrics. It does not own the pool:
whoever made the pool starts it before and shuts it down after the server.

With `ServerConfig.tls` (cluster/tls.py) every service, health and reflection included, is served
over TLS only, and with a client CA only to clients holding a certificate it signed (mutual TLS).
The bearer token guards the Decoder RPCs; health and reflection need none. A gateway bound beyond
loopback without TLS, or without any client authentication, logs a warning at start naming the
flag to set. The HTTP API has no TLS of its own (terminate TLS in a proxy in front of it): it
warns when reachable beyond loopback, and refuses to start there with mutual TLS but no bearer
token, since it cannot check client certificates.

    server = GatewayServer(pool, ServerConfig(port=50051, metrics_port=9090))
    await server.start()
    ...
    await server.drain()   # health NOT_SERVING, new requests UNAVAILABLE, in-flight ones finish
    await server.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mlaserve.cluster.metrics import GatewayMetrics
from mlaserve.cluster.openai_http import HttpConfig, OpenAIHttpServer, http_exposure_warnings
from mlaserve.cluster.service import SERVICE_NAME, DecoderService, Pool, ServiceLimits, pool_counters
from mlaserve.cluster.tls import TLSConfig, exposure_warnings, is_loopback
from mlaserve.protos import decoder_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

HEALTH_SERVICE_NAME = health.SERVICE_NAME  # "grpc.health.v1.Health"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051  # 0: any free port (GatewayServer.port says which)
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    metrics_host: str = "0.0.0.0"
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    max_message_bytes: int = 4 << 20  # per received / sent message
    max_concurrent_rpcs: int | None = 4096  # beyond it new RPCs get RESOURCE_EXHAUSTED
    status_interval_s: float = 2.0  # how often the metrics' cluster snapshot is refreshed
    drain_timeout_s: float = 60.0  # how long drain() waits for in-flight requests
    stop_grace_s: float = 5.0  # grace given to RPCs still open when the server stops
    auth_token: str | None = field(default=None, repr=False)  # Decoder RPCs need "authorization: Bearer <it>"
    tls: TLSConfig | None = None  # None: plaintext; set: TLS (mutual with tls.client_ca_file)
    http: HttpConfig | None = None  # the OpenAI HTTP API beside gRPC (same token); None: off

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not (0 <= value <= 65535):
                raise ValueError(f"ServerConfig.{name} must be in [0, 65535], got {value}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"ServerConfig.max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ValueError(f"ServerConfig.max_concurrent_rpcs must be >= 1, got {self.max_concurrent_rpcs}")
        for name in ("status_interval_s", "drain_timeout_s", "stop_grace_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"ServerConfig.{name} must be >= 0, got {getattr(self, name)}")
        http_host = (self.http.host or self.host) if self.http is not None else None
        mutual_only = self.tls is not None and self.tls.mutual and not self.auth_token
        if http_host is not None and mutual_only and not is_loopback(http_host):
            raise ValueError(
                "the OpenAI HTTP API (--http-port) has no TLS and cannot check client certificates: "
                "with --tls-client-ca and no --auth-token it would be open to anyone who reaches it; "
                "set --auth-token, or bind the HTTP API to loopback"
            )


class GatewayServer:
    """Decoder + health + reflection on one grpc.aio server, metrics on HTTP."""

    def __init__(self, pool: Pool, config: ServerConfig | None = None, metrics: GatewayMetrics | None = None):
        self.config = config or ServerConfig()
        self.pool = pool
        self.metrics = metrics or GatewayMetrics()
        self.service = DecoderService(pool, self.config.limits, self.metrics, self.config.auth_token)
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._poller: asyncio.Task | None = None
        self.port: int | None = None
        self.http: OpenAIHttpServer | None = None

    @property
    def address(self) -> str:
        """host:port clients dial (127.0.0.1 when bound to every interface)."""
        if self.port is None:
            raise RuntimeError("the server has not started")
        host = self.config.host
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.http_port

    @property
    def http_port(self) -> int | None:
        """The OpenAI HTTP API's port (None: not serving it)."""
        return self.http.port if self.http is not None else None

    async def start(self) -> int:
        """Bind, start serving, mark SERVING; return the gRPC port."""
        if self._server is not None:
            raise RuntimeError("the server is already started")
        cfg = self.config
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
            ],
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        )
        pb_grpc.add_DecoderServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        bind = f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"
        try:
            if cfg.tls is None:
                port = server.add_insecure_port(bind)
            else:
                port = server.add_secure_port(bind, cfg.tls.server_credentials())
        except RuntimeError as e:
            raise OSError(f"cannot bind the gRPC server to {bind}: {e}") from e
        if port == 0:
            raise OSError(f"cannot bind the gRPC server to {bind}")
        await server.start()
        self._server, self.port = server, port
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        try:
            if cfg.http is not None:
                http = OpenAIHttpServer(self.service.core, cfg.http, host=cfg.host)
                await http.start()
                self.http = http
            if cfg.metrics_port is not None:
                self.metrics.start_http(cfg.metrics_port, cfg.metrics_host)
        except BaseException:
            await self.stop(grace=0)
            raise
        self._poller = asyncio.create_task(self._poll_status(), name="mlaserve-status-poller")
        log.info(
            "gRPC gateway on %s:%d, %s%s (HTTP API: %s, metrics: %s)",
            cfg.host,
            port,
            cfg.tls.describe() if cfg.tls else "plaintext",
            ", bearer token required" if cfg.auth_token else "",
            self.http.base_url if self.http else None,
            self.metrics_port,
        )
        for warning in exposure_warnings(cfg.host, cfg.tls, cfg.auth_token):
            log.warning("%s", warning)
        if self.http is not None:
            for warning in http_exposure_warnings(self.http.host, self.http.port or 0, cfg.auth_token):
                log.warning("%s", warning)
        return port

    async def refresh_metrics(self) -> None:
        """Read the pool's status and counters into the metrics now."""
        statuses = await self.pool.status()
        self.metrics.update_cluster(statuses, pool_counters(self.pool))

    async def _poll_status(self) -> None:
        while True:
            try:
                await self.refresh_metrics()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a failed poll must not stop the server
                log.warning("cluster status poll failed", exc_info=True)
            await asyncio.sleep(self.config.status_interval_s)

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop taking requests (health NOT_SERVING, new RPCs UNAVAILABLE, new HTTP requests 503),
        let in-flight ones (of both transports) finish.

        Returns False if requests were still running when `timeout` (default
        config.drain_timeout_s) passed.
        """
        self.service.draining = True
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        wait = self.config.drain_timeout_s if timeout is None else timeout
        done = await self.service.wait_idle(wait)
        if not done:
            log.warning("drain: %d requests still running after %.0f s", self.service.active_requests, wait)
        return done

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving (open RPCs get `grace` seconds, then are cancelled) and the metrics endpoint."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        grace = self.config.stop_grace_s if grace is None else grace
        if self.http is not None:
            await self.http.stop(grace)
            self.http = None
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace)
            self._server = None
        self.metrics.stop_http()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> GatewayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
