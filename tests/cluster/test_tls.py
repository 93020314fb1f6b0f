"""TLS on the wire: the gateway's own server over TLS and mutual TLS on 127.0.0.1, with certificates
made here (tls_certs.py) and the fake pool of test_grpc_fake.py; real grpcio clients.

What is checked: a client holding the CA gets answers identical to the oracle; a client without it
(system roots, an unrelated CA, plaintext, a wrong server name) is refused in the handshake
(UNAVAILABLE); with mutual TLS a client without a certificate, or with one from another CA, is
refused (UNAVAILABLE) and one with it gets through; the bearer token still decides the Decoder RPCs
(UNAUTHENTICATED) while health and reflection need TLS but no token; TLSConfig / ClientTLSConfig
refuse bad files naming the flag; the insecure-bind warning; the same files serve a stdlib-ssl
server (what an HTTP server beside the gateway would use).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import ssl
from pathlib import Path
from typing import Any

import grpc
import pytest

from mlaserve.cluster.client import DecoderClient
from mlaserve.cluster.server import GatewayServer, ServerConfig
from mlaserve.cluster.service import SERVICE_NAME
from mlaserve.cluster.tls import (
    ClientTLSConfig,
    TLSConfig,
    TLSConfigError,
    exposure_warnings,
    is_loopback,
)
from mlaserve.worker.types import SamplingParams

from .test_grpc_fake import FakePool, expected_tokens, run, text_of
from .tls_certs import NAMED_HOST, CertFiles, make_certs

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertFiles:
    return make_certs(tmp_path_factory.mktemp("certs"))


def server_tls(c: CertFiles, mutual: bool = False) -> TLSConfig:
    tls = TLSConfig.from_files(c.server_cert, c.server_key, c.ca if mutual else None)
    assert tls is not None
    return tls


def client_tls(c: CertFiles, *, with_cert: bool = False, **kw: Any) -> ClientTLSConfig:
    tls = ClientTLSConfig.from_files(
        ca=kw.pop("ca", c.ca),
        cert=c.client_cert if with_cert else None,
        key=c.client_key if with_cert else None,
        **kw,
    )
    assert tls is not None
    return tls


async def _start(pool: FakePool, **cfg: Any) -> GatewayServer:
    server = GatewayServer(pool, ServerConfig(host="127.0.0.1", port=0, status_interval_s=0.05, **cfg))
    await server.start()
    return server


async def _code(call) -> grpc.StatusCode:
    """The status code an awaitable RPC ends with (OK when it succeeds)."""
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


SAMPLING = SamplingParams(max_tokens=5, temperature=0.0)
WANT = expected_tokens(list(b"hello tls"), SAMPLING)[0]


# -- the handshake decides who gets in -------------------------------------------------------------


def test_tls_client_with_the_ca_is_served_and_others_are_refused(certs):
    async def body():
        pool = FakePool()
        server = await _start(pool, tls=server_tls(certs))
        target = f"127.0.0.1:{server.port}"
        try:
            async with DecoderClient(target, timeout=20, tls=client_tls(certs)) as ok:
                await ok.wait_ready(10)
                got = await ok.generate("hello tls", sampling=SAMPLING)
                assert list(got.token_ids) == WANT and got.text == text_of(WANT)
                chunks = [c async for c in ok.stream("hello tls", sampling=SAMPLING)]
                assert [t for c in chunks for t in c.delta.token_ids] == WANT
                status = await ok.status()
                assert [w.worker_id for w in status.workers] == pool.workers and status.serving
                assert await ok.health() == "SERVING"
            # The same CA, dialled by name: the certificate holds localhost too.
            async with DecoderClient(
                f"localhost:{server.port}", timeout=20, tls=client_tls(certs)
            ) as by_name:
                assert list((await by_name.generate("hello tls", sampling=SAMPLING)).token_ids) == WANT
            routed = sum(pool.routed.values())

            refused = {
                "system roots only": ClientTLSConfig.from_files(enabled=True),
                "an unrelated CA": client_tls(certs, ca=certs.other_ca),
                "a name not in the certificate": client_tls(certs, server_name="gateway.example.com"),
                "plaintext": None,
            }
            for what, tls in refused.items():
                async with DecoderClient(target, timeout=10, tls=tls) as client:
                    code = await _code(client.generate("hello tls", sampling=SAMPLING))
                    assert code == grpc.StatusCode.UNAVAILABLE, what
                    assert await _code(client.health()) == grpc.StatusCode.UNAVAILABLE, what
            assert sum(pool.routed.values()) == routed, "a refused client reached the pool"
        finally:
            await server.stop()

    run(body())


def test_mutual_tls_wants_a_client_certificate_from_its_ca(certs):
    async def body():
        pool = FakePool()
        server = await _start(pool, tls=server_tls(certs, mutual=True))
        target = f"127.0.0.1:{server.port}"
        try:
            stranger = ClientTLSConfig.from_files(
                ca=certs.ca, cert=certs.other_client_cert, key=certs.other_client_key
            )
            for what, tls in (("no client certificate", client_tls(certs)), ("another CA's", stranger)):
                async with DecoderClient(target, timeout=10, tls=tls) as client:
                    code = await _code(client.generate("hello tls", sampling=SAMPLING))
                    assert code == grpc.StatusCode.UNAVAILABLE, what
                    assert await _code(client.status()) == grpc.StatusCode.UNAVAILABLE, what
            assert not any(pool.routed.values())

            async with DecoderClient(target, timeout=20, tls=client_tls(certs, with_cert=True)) as ok:
                got = await ok.generate("hello tls", sampling=SAMPLING)
                assert list(got.token_ids) == WANT
                assert len((await ok.status()).workers) == 3
        finally:
            await server.stop()

    run(body())


def test_server_name_override_for_an_address_not_in_the_certificate(certs):
    """An SSH tunnel or a bare IP: the certificate names the gateway, the client dials 127.0.0.1."""

    async def body():
        tls = TLSConfig.from_files(certs.named_cert, certs.named_key)
        server = await _start(FakePool(), tls=tls)
        target = f"127.0.0.1:{server.port}"
        try:
            async with DecoderClient(target, timeout=10, tls=client_tls(certs)) as by_address:
                code = await _code(by_address.generate("hello tls", sampling=SAMPLING))
                assert code == grpc.StatusCode.UNAVAILABLE
            async with DecoderClient(target, timeout=20, tls=client_tls(certs, server_name=NAMED_HOST)) as ok:
                assert list((await ok.generate("hello tls", sampling=SAMPLING)).token_ids) == WANT
        finally:
            await server.stop()

    run(body())


# -- the token over TLS; health and reflection ------------------------------------------------------


def test_token_over_mutual_tls_and_what_health_and_reflection_need(certs):
    """As over plaintext (test_grpc_fake): the token guards the Decoder RPCs, health and reflection
    need none; over TLS they still need the handshake (and with mTLS the client certificate)."""
    from google.protobuf import descriptor_pool
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    async def body():
        pool = FakePool()
        server = await _start(pool, tls=server_tls(certs, mutual=True), auth_token=TOKEN)
        target = f"127.0.0.1:{server.port}"
        tls = client_tls(certs, with_cert=True)
        try:
            for token in (None, "wrong-token"):
                async with DecoderClient(target, timeout=10, token=token, tls=tls) as client:
                    for call in (
                        client.generate("hello tls", sampling=SAMPLING),
                        client.status(),
                        _drain(client.stream("hello tls", sampling=SAMPLING)),
                    ):
                        assert await _code(call) == grpc.StatusCode.UNAUTHENTICATED, token
                    assert await client.health() == "SERVING"
            assert not any(pool.routed.values()), "an unauthenticated request reached the pool"
            async with DecoderClient(target, timeout=20, token=TOKEN, tls=tls) as ok:
                assert list((await ok.generate("hello tls", sampling=SAMPLING)).token_ids) == WANT

            def generic(creds: grpc.ChannelCredentials | None) -> tuple[list[str], list[str], int]:
                """A generic client (grpcurl's way): reflection, then health; no token."""
                channel = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
                with channel:
                    db = ProtoReflectionDescriptorDatabase(channel)
                    services = sorted(db.get_services())
                    desc = descriptor_pool.DescriptorPool(db).FindServiceByName(SERVICE_NAME)
                    health = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10
                    )
                    return services, sorted(m.name for m in desc.methods), health.status

            services, methods, health = await asyncio.to_thread(generic, tls.channel_credentials())
            assert SERVICE_NAME in services and "grpc.health.v1.Health" in services
            assert methods == ["Generate", "GenerateUnary", "GetClusterStatus"]
            assert health == health_pb2.HealthCheckResponse.SERVING
            for creds in (None, client_tls(certs).channel_credentials()):  # plaintext; TLS without a cert
                with pytest.raises(grpc.RpcError) as info:
                    await asyncio.to_thread(generic, creds)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop()

    run(body())


async def _drain(stream) -> None:
    async for _ in stream:
        pass


def test_batch_backend_over_tls(certs):
    from mlaserve.cluster import batch_backends
    from mlaserve.cluster.types import GenerationRequest

    async def body():
        pool = FakePool()
        server = await _start(pool, tls=server_tls(certs, mutual=True), auth_token=TOKEN)
        try:
            backend = batch_backends.grpc_backend(
                f"127.0.0.1:{server.port}",
                timeout=20,
                token=TOKEN,
                tls=client_tls(certs, with_cert=True),
                connect_timeout=10,
            )
            async with backend as generate:
                req = GenerationRequest(request_id="b-1", sampling=SAMPLING, prompt="hello tls")
                done = await generate(req)
            assert list(done.token_ids) == WANT and done.text == text_of(WANT)
        finally:
            await server.stop()

    run(body())


def test_a_client_without_the_ca_times_out_with_a_tls_hint(certs):
    async def body():
        server = await _start(FakePool(), tls=server_tls(certs))
        try:
            async with DecoderClient(
                f"127.0.0.1:{server.port}", tls=client_tls(certs, ca=certs.other_ca)
            ) as c:
                with pytest.raises(TimeoutError, match="TLS handshake"):
                    await c.wait_ready(1.5)
        finally:
            await server.stop()

    run(body())


# -- the configs check their files, naming the flag -------------------------------------------------


def test_server_tls_config_names_the_flag_of_what_is_wrong(certs, tmp_path):
    assert TLSConfig.from_files(None, None, None) is None
    assert TLSConfig.from_files("", "", "") is None  # empty flags count as unset
    cases = [
        ((certs.server_cert, None, None), r"--tls-cert needs --tls-key"),
        ((None, certs.server_key, None), r"--tls-key needs --tls-cert"),
        ((None, None, certs.ca), r"--tls-client-ca needs --tls-cert and --tls-key"),
        ((str(tmp_path / "nope.crt"), certs.server_key, None), r"--tls-cert .*nope\.crt: no such file"),
        ((certs.server_cert, str(tmp_path), None), r"--tls-key .*: not a regular file"),
        ((certs.server_key, certs.server_key, None), r"--tls-cert .*: no PEM certificate"),
        ((certs.server_cert, certs.server_cert, None), r"--tls-key .*: no PEM private key"),
        ((certs.server_cert, certs.client_key, None), r"--tls-key .*client\.key is not the private key of"),
        ((certs.server_cert, certs.server_key, certs.server_key), r"--tls-client-ca .*: no PEM certificate"),
    ]
    for args, message in cases:
        with pytest.raises(TLSConfigError, match=message):
            TLSConfig.from_files(*args)
    assert issubclass(TLSConfigError, ValueError)

    garbage = tmp_path / "garbage.crt"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    with pytest.raises(TLSConfigError, match=r"--tls-cert .*garbage\.crt / --tls-key .*: not a usable"):
        TLSConfig.from_files(str(garbage), certs.server_key)
    with pytest.raises(TLSConfigError, match=r"--tls-client-ca .*garbage\.crt: not a usable CA"):
        TLSConfig.from_files(certs.server_cert, certs.server_key, str(garbage))

    encrypted = tmp_path / "encrypted.key"
    _encrypt_key(certs.server_key, encrypted)
    with pytest.raises(TLSConfigError, match=r"--tls-key .*encrypted\.key: the private key is encrypted"):
        TLSConfig.from_files(certs.server_cert, str(encrypted))

    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "locked.key"
        shutil.copy(certs.server_key, locked)
        locked.chmod(0)
        with pytest.raises(TLSConfigError, match=r"--tls-key .*locked\.key: cannot read it"):
            TLSConfig.from_files(certs.server_cert, str(locked))


def _encrypt_key(src: str, dst: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(src).read_bytes(), password=None)
    dst.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )


def test_client_tls_config_names_the_flag_of_what_is_wrong(certs, tmp_path):
    assert ClientTLSConfig.from_files() is None
    assert ClientTLSConfig.from_files(enabled=True) == ClientTLSConfig()  # --tls: the system's roots
    cases = [
        (dict(cert=certs.client_cert), r"--tls-cert needs --tls-key"),
        (dict(key=certs.client_key), r"--tls-key needs --tls-cert"),
        (dict(ca=str(tmp_path / "ca.pem")), r"--tls-ca .*ca\.pem: no such file"),
        (dict(ca=certs.client_key), r"--tls-ca .*: no PEM certificate"),
        (
            dict(cert=certs.client_cert, key=certs.server_key),
            r"--tls-key .*server\.key is not the private key",
        ),
        (dict(server_name="two words"), r"--tls-server-name: must be a host name"),
    ]
    for kwargs, message in cases:
        with pytest.raises(TLSConfigError, match=message):
            ClientTLSConfig.from_files(**kwargs)


def test_configs_keep_paths_not_key_material_in_their_repr(certs):
    tls = server_tls(certs, mutual=True)
    config = ServerConfig(tls=tls, auth_token=TOKEN)
    key_body = Path(certs.server_key).read_text().splitlines()[1]
    for text in (repr(tls), repr(config), repr(client_tls(certs, with_cert=True))):
        assert key_body not in text and TOKEN not in text
    assert certs.server_cert in repr(tls)
    assert tls == server_tls(certs, mutual=True) and tls.mutual and not server_tls(certs).mutual
    with pytest.raises(AttributeError):
        tls.cert_file = "other"  # type: ignore[misc]


def test_the_same_files_serve_a_stdlib_ssl_server(certs):
    """TLSConfig.ssl_context(): what an HTTP server beside the gateway loads; with mTLS it wants the
    client certificate too."""

    async def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> bytes:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(await reader.readline())
                await writer.drain()
            finally:
                writer.close()

        srv = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ctx)
        port = srv.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
            )
            writer.write(b"ping\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            return line
        finally:
            srv.close()

    def client_ctx(with_cert: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=certs.ca)
        if with_cert:
            ctx.load_cert_chain(certs.client_cert, certs.client_key)
        return ctx

    assert run(handshake(server_tls(certs).ssl_context(), client_ctx(False))) == b"ping\n"
    mutual = server_tls(certs, mutual=True).ssl_context()
    assert run(handshake(mutual, client_ctx(True))) == b"ping\n"
    try:  # TLS 1.3: the server refuses the missing certificate right after the client's handshake
        answer = run(handshake(mutual, client_ctx(False)))
    except (ssl.SSLError, ConnectionError):
        answer = None
    assert answer in (None, b""), "a client without a certificate was answered"


# -- the warning for a gateway open beyond loopback -------------------------------------------------


def test_loopback_and_exposure_rules(certs):
    for host in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "", "::", "[::]", "10.1.2.3", "192.168.0.7", "2001:db8::1"):
        assert not is_loopback(host), host
    tls, mtls = server_tls(certs), server_tls(certs, mutual=True)
    assert exposure_warnings("127.0.0.1", None, None) == []
    assert exposure_warnings("0.0.0.0", tls, TOKEN) == []
    assert exposure_warnings("0.0.0.0", mtls, None) == []  # client certificates authenticate the clients
    (only,) = exposure_warnings("10.1.2.3", tls, None)
    assert "--auth-token" in only and "--tls-cert" not in only
    (only,) = exposure_warnings("::", None, TOKEN)
    assert "--tls-cert/--tls-key" in only and "bearer token" in only
    assert len(exposure_warnings("0.0.0.0", None, None)) == 2


def test_the_gateway_warns_at_start_when_open_beyond_loopback(certs, caplog):
    async def warnings_at_start(**cfg: Any) -> list[str]:
        caplog.clear()
        server = GatewayServer(FakePool(), ServerConfig(port=0, status_interval_s=0.05, **cfg))
        with caplog.at_level(logging.WARNING, logger="mlaserve.cluster.server"):
            await server.start()
        await server.stop()
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    async def body():
        bare = await warnings_at_start(host="0.0.0.0")
        assert len(bare) == 2
        assert any("without TLS" in m and "--tls-cert/--tls-key" in m for m in bare), bare
        assert any("without authentication" in m and "--auth-token" in m for m in bare), bare
        assert await warnings_at_start(host="127.0.0.1") == []
        assert await warnings_at_start(host="0.0.0.0", tls=server_tls(certs), auth_token=TOKEN) == []
        (tls_no_token,) = await warnings_at_start(host="0.0.0.0", tls=server_tls(certs))
        assert "--auth-token" in tls_no_token

    run(body())
