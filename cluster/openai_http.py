"""The OpenAI-compatible HTTP server of a gateway: uvicorn serving cluster/openai_app.py in the
gateway's own event loop, beside the gRPC server, over the same GatewayCore (pool, router, auth,
draining, metrics).

    http = OpenAIHttpServer(core, HttpConfig(port=8000, model="tiny"), host="0.0.0.0")
    port = await http.start()      # binds first: port 0 picks a free one
    ...
    await http.stop(grace=5)

Point any OpenAI client at it: `OpenAI(base_url="http://HOST:PORT/v1", api_key=TOKEN)` (any
api_key when the gateway has no --auth-token). The gateway's own SIGINT/SIGTERM handling stays in
charge: uvicorn installs no signal handlers here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mlaserve.cluster.gateway import GatewayCore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP API of a gateway (ServerConfig.http; None there: no HTTP server)."""

    port: int = 8000  # 0: any free port (OpenAIHttpServer.port says which)
    host: str | None = None  # None: the gRPC server's host
    model: str = "tiny"  # checkpoint directory or preset the pool serves: its chat template
    served_model_name: str | None = None  # the `model` clients send and /v1/models lists (default: model)
    chat_template_file: str | None = None  # a Jinja file that replaces the checkpoint's chat template
    max_body_bytes: int = 4 << 20  # largest request body (413 beyond it)
    keep_alive_s: float = 5.0  # idle keep-alive connections are closed after this long

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"HttpConfig.port must be in [0, 65535], got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"HttpConfig.max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.keep_alive_s <= 0:
            raise ValueError(f"HttpConfig.keep_alive_s must be > 0, got {self.keep_alive_s}")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("HttpConfig.served_model_name must not be empty")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


def display_host(host: str) -> str:
    """The address clients on this machine dial for a listen address (127.0.0.1 for every interface)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "[::]", "") else host


def http_exposure_warnings(host: str, port: int, auth_token: str | None) -> list[str]:
    """What is unsafe about the HTTP API bound to `host` (nothing on loopback): it has no TLS."""
    from mlaserve.cluster.tls import is_loopback

    if is_loopback(host):
        return []
    where = f"the OpenAI HTTP API listens on {host or '0.0.0.0'}:{port}, reachable beyond this machine"
    out = [
        f"{where}, without TLS: requests{', answers and the bearer token' if auth_token else ' and answers'} "
        "travel in clear text; put a TLS-terminating proxy in front of it or bind it to loopback"
    ]
    if not auth_token:
        out.append(
            f"{where}, without authentication: anyone who reaches the port can use the cluster; set --auth-token"
        )
    return out


def _bind(host: str, port: int) -> socket.socket:
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only; a listener still refuses
        sock.bind((bare, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot bind the HTTP server to {host}:{port}: {e}") from e
    return sock


class OpenAIHttpServer:
    """uvicorn + the OpenAI API app, started and stopped inside the caller's event loop."""

    def __init__(self, core: GatewayCore, config: HttpConfig, host: str = "0.0.0.0") -> None:
        self.core = core
        self.config = config
        self.host = config.host or host
        self.port: int | None = None
        self.api: Any = None
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as base_url (http://HOST:PORT/v1)."""
        if self.port is None:
            raise RuntimeError("the HTTP server has not started")
        host = display_host(self.host)
        return f"http://[{host}]:{self.port}/v1" if ":" in host else f"http://{host}:{self.port}/v1"

    async def start(self) -> int:
        """Load the chat template, bind, serve; return the bound port. OSError if the port is taken,
        ValueError (ChatTemplateError) for a chat template that does not load."""
        import uvicorn

        from mlaserve.cluster.openai_app import OpenAIApi
        from mlaserve.worker.chat_template import load_chat_template

        if self._task is not None:
            raise RuntimeError("the HTTP server is already started")
        cfg = self.config
        template = await asyncio.to_thread(load_chat_template, cfg.model, cfg.chat_template_file)
        if template is None:
            log.warning("model %s has no chat template: /v1/chat/completions answers 400", cfg.model)
        self.api = OpenAIApi(self.core, cfg.model_name, template, max_body_bytes=cfg.max_body_bytes)
        sock = _bind(self.host, cfg.port)

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:  # the gateway handles SIGINT / SIGTERM
                yield

        server = Server(
            uvicorn.Config(
                self.api.app,
                lifespan="off",
                log_config=None,  # the process's logging as configured, not uvicorn's own
                access_log=False,
                timeout_keep_alive=max(1, round(cfg.keep_alive_s)),
                timeout_graceful_shutdown=None,
            )
        )
        task = asyncio.create_task(server.serve(sockets=[sock]), name="mlaserve-http")
        while not server.started:
            if task.done():
                sock.close()
                exc = task.exception()
                raise OSError(f"the HTTP server did not start: {exc!r}")
            await asyncio.sleep(0.01)
        self._server, self._task = server, task
        self.port = int(sock.getsockname()[1])
        log.info("OpenAI HTTP API on %s", self.base_url)
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        """Stop listening, let open requests finish for `grace` seconds, then cut them."""
        if self._task is None:
            return
        server, task = self._server, self._task
        server.config.timeout_graceful_shutdown = grace  # read by uvicorn's shutdown: then it cancels
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), grace + 5.0)
        except asyncio.TimeoutError:
            log.warning("the HTTP server did not stop within %.0f s", grace + 5.0)
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._task = self._server = None
