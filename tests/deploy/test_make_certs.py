"""deploy/make-certs.sh (openssl) makes certificates the gateway and its clients actually use: a
mutual-TLS gateway on 127.0.0.1 started from DIR's server files answers a client holding only
DIR/client/, and refuses one without them."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from mlaserve.cluster.client import DecoderClient
from mlaserve.cluster.server import GatewayServer, ServerConfig
from mlaserve.cluster.tls import ClientTLSConfig, TLSConfig
from mlaserve.worker.types import SamplingParams

from ..cluster.test_grpc_fake import FakePool, expected_tokens, run

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="make-certs.sh needs openssl")

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "make-certs.sh"


def make(directory: Path, sans: str = "") -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(directory.parent), "MLASERVE_TLS_SANS": sans}
    return subprocess.run(
        ["bash", str(SCRIPT), str(directory)], env=env, capture_output=True, text=True, timeout=60
    )


def test_make_certs_files_names_and_rerun(tmp_path: Path):
    from cryptography import x509

    d = tmp_path / "tls"
    done = make(d, "gw.example.com, 203.0.113.7")
    assert done.returncode == 0, done.stderr
    for key in ("ca.key", "server.key", "client.key", "client/client.key"):
        assert (d / key).stat().st_mode & 0o077 == 0, f"{key} is readable by others"
    assert sorted(p.name for p in (d / "client").iterdir()) == ["ca.crt", "client.crt", "client.key"]

    server = x509.load_pem_x509_certificate((d / "server.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(sans.get_values_for_type(x509.DNSName))
    addresses = set(sans.get_values_for_type(x509.IPAddress))
    assert {"localhost", "mlaserve-gateway", "gw.example.com"} <= names
    assert {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "203.0.113.7")} <= addresses
    ca = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    assert server.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert make(d).returncode == 0
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before, "a rerun changed the files"


def test_a_gateway_on_make_certs_files_serves_mutual_tls(tmp_path: Path):
    d = tmp_path / "tls"
    assert make(d).returncode == 0
    sampling = SamplingParams(max_tokens=4, temperature=0.0)
    want = expected_tokens(list(b"deploy"), sampling)[0]

    async def body():
        tls = TLSConfig.from_files(str(d / "server.crt"), str(d / "server.key"), str(d / "ca.crt"))
        server = GatewayServer(FakePool(), ServerConfig(host="127.0.0.1", port=0, tls=tls))
        await server.start()
        target = f"127.0.0.1:{server.port}"
        bundle = d / "client"
        try:
            for server_name in (None, "mlaserve-gateway"):
                client_tls = ClientTLSConfig.from_files(
                    ca=str(bundle / "ca.crt"),
                    cert=str(bundle / "client.crt"),
                    key=str(bundle / "client.key"),
                    server_name=server_name,
                )
                async with DecoderClient(target, timeout=20, tls=client_tls) as client:
                    assert list((await client.generate("deploy", sampling=sampling)).token_ids) == want
            no_cert = ClientTLSConfig.from_files(ca=str(bundle / "ca.crt"))
            async with DecoderClient(target, timeout=10, tls=no_cert) as client:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await client.generate("deploy", sampling=sampling)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop()

    run(body())
