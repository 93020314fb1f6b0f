"""TLS settings of the gateway and of its clients: frozen configs that load and check PEM files.

    tls = TLSConfig.from_files(cert="server.crt", key="server.key", client_ca="ca.crt")  # mutual TLS
    server.add_secure_port("0.0.0.0:50051", tls.server_credentials())
    ctx = tls.ssl_context()            # the same files for an HTTP server (stdlib ssl)

    client_tls = ClientTLSConfig.from_files(ca="ca.crt", cert="client.crt", key="client.key")
    channel = grpc.aio.secure_channel(target, client_tls.channel_credentials(),
                                      options=client_tls.channel_options())

Both configs read their files once, when they are made, and raise `TLSConfigError` (a ValueError)
naming the command-line flag of the bad file: missing, unreadable, not PEM, an encrypted key, a
key that does not belong to its certificate, a key without a certificate... The paths stay on the
config, so another server (stdlib ssl, uvicorn) can load the same files. Credentials come from
grpcio itself (`grpc.ssl_server_credentials`, `grpc.ssl_channel_credentials`); the checks use the
stdlib `ssl` module, which parses PEM the way OpenSSL does.

`exposure_warnings(host, tls, auth_token)` says what is unsafe about a gateway listening on `host`:
beyond loopback without TLS (clear-text traffic, the bearer token included), or without any client
authentication (no token and no client certificates).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc

# The flags each file comes from: the server's (`mlaserve serve`) and the clients' (generate, status,
# batch, bench serve). Errors name them.
SERVER_FLAGS = {"cert": "--tls-cert", "key": "--tls-key", "client_ca": "--tls-client-ca"}
CLIENT_FLAGS = {
    "ca": "--tls-ca",
    "cert": "--tls-cert",
    "key": "--tls-key",
    "server_name": "--tls-server-name",
}

_CERT_MARKER = b"-----BEGIN CERTIFICATE-----"
_KEY_MARKER = b"PRIVATE KEY-----"
_MAX_PEM_BYTES = 1 << 20


class TLSConfigError(ValueError):
    """A TLS file or flag combination that cannot work; the message names the flag."""


def _read_pem(path: str, flag: str, kind: str) -> bytes:
    """The bytes of a PEM file holding a certificate ("cert") or a private key ("key")."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TLSConfigError(f"{flag} {path}: no such file")
    if not p.is_file():
        raise TLSConfigError(f"{flag} {path}: not a regular file")
    try:
        with p.open("rb") as f:
            data = f.read(_MAX_PEM_BYTES + 1)
    except OSError as e:
        raise TLSConfigError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    if len(data) > _MAX_PEM_BYTES:
        raise TLSConfigError(f"{flag} {path}: larger than {_MAX_PEM_BYTES} bytes, not a PEM file")
    if kind == "key":
        if b"ENCRYPTED" in data:
            raise TLSConfigError(
                f"{flag} {path}: the private key is encrypted; gRPC needs an unencrypted PEM key "
                "(e.g. `openssl pkey -in KEY -out plain.key`, kept readable by this user only)"
            )
        if _KEY_MARKER not in data:
            raise TLSConfigError(
                f"{flag} {path}: no PEM private key in it ('-----BEGIN ... PRIVATE KEY-----')"
            )
    elif _CERT_MARKER not in data:
        raise TLSConfigError(f"{flag} {path}: no PEM certificate in it ('-----BEGIN CERTIFICATE-----')")
    return data


def _no_passphrase() -> bytes:
    return b""  # never prompt on the terminal for an encrypted key's passphrase


def _check_cert_chain(cert_path: str, key_path: str, flags: dict[str, str], purpose: ssl.Purpose) -> None:
    """The certificate parses and the key belongs to it (stdlib ssl's own check)."""
    ctx = ssl.create_default_context(purpose)
    try:
        ctx.load_cert_chain(
            str(Path(cert_path).expanduser()), str(Path(key_path).expanduser()), password=_no_passphrase
        )
    except ssl.SSLError as e:
        reason = getattr(e, "reason", None) or str(e)
        if "KEY_VALUES_MISMATCH" in str(reason).upper():
            raise TLSConfigError(
                f"{flags['key']} {key_path} is not the private key of the certificate in {flags['cert']} {cert_path}"
            ) from None
        raise TLSConfigError(
            f"{flags['cert']} {cert_path} / {flags['key']} {key_path}: not a usable certificate and key ({reason})"
        ) from None


def _check_ca(path: str, flag: str) -> None:
    ctx = ssl.create_default_context()
    try:
        ctx.load_verify_locations(cafile=str(Path(path).expanduser()))
    except ssl.SSLError as e:
        raise TLSConfigError(
            f"{flag} {path}: not a usable CA certificate bundle ({getattr(e, 'reason', None) or e})"
        ) from None


@dataclass(frozen=True)
class TLSConfig:
    """The gateway's TLS: its certificate chain and key, and for mutual TLS the CA of its clients.

    Use `from_files` (or the constructor, which does the same): the files are read and checked here,
    once. `cert_file` / `key_file` / `client_ca_file` stay readable for other servers.
    """

    cert_file: str  # PEM certificate chain the server presents (--tls-cert)
    key_file: str  # PEM private key of that certificate, unencrypted (--tls-key)
    client_ca_file: str | None = None  # PEM CA bundle; set: clients must present a certificate it signed
    _cert_pem: bytes = field(init=False, repr=False, compare=False)
    _key_pem: bytes = field(init=False, repr=False, compare=False)
    _client_ca_pem: bytes | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        f = SERVER_FLAGS
        object.__setattr__(self, "_cert_pem", _read_pem(self.cert_file, f["cert"], "cert"))
        object.__setattr__(self, "_key_pem", _read_pem(self.key_file, f["key"], "key"))
        _check_cert_chain(self.cert_file, self.key_file, f, ssl.Purpose.CLIENT_AUTH)
        ca = None
        if self.client_ca_file is not None:
            ca = _read_pem(self.client_ca_file, f["client_ca"], "cert")
            _check_ca(self.client_ca_file, f["client_ca"])
        object.__setattr__(self, "_client_ca_pem", ca)

    @classmethod
    def from_files(
        cls, cert: str | None = None, key: str | None = None, client_ca: str | None = None
    ) -> TLSConfig | None:
        """The config for these flags' values; None when none is set (plaintext). TLSConfigError for
        an incomplete set: a certificate without its key, a key without a certificate, a client CA
        without a server certificate."""
        cert, key, client_ca = cert or None, key or None, client_ca or None
        f = SERVER_FLAGS
        if cert is None and key is None:
            if client_ca is not None:
                raise TLSConfigError(
                    f"{f['client_ca']} needs {f['cert']} and {f['key']}: mutual TLS is TLS with client "
                    "certificates, so the server needs its own certificate first"
                )
            return None
        if key is None:
            raise TLSConfigError(f"{f['cert']} needs {f['key']} (the certificate's private key)")
        if cert is None:
            raise TLSConfigError(f"{f['key']} needs {f['cert']} (the certificate the key belongs to)")
        return cls(cert, key, client_ca)

    @property
    def mutual(self) -> bool:
        """Clients must present a certificate signed by `client_ca_file`."""
        return self.client_ca_file is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        """grpcio's credentials for `server.add_secure_port` (client certificates required when mutual)."""
        return grpc.ssl_server_credentials(
            [(self._key_pem, self._cert_pem)],
            root_certificates=self._client_ca_pem,
            require_client_auth=self.mutual,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A stdlib server-side SSLContext over the same files (for an HTTP server beside the gRPC one)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(
            str(Path(self.cert_file).expanduser()),
            str(Path(self.key_file).expanduser()),
            password=_no_passphrase,
        )
        if self.client_ca_file is not None:
            ctx.load_verify_locations(cafile=str(Path(self.client_ca_file).expanduser()))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def describe(self) -> str:
        return "TLS, client certificates required" if self.mutual else "TLS"


@dataclass(frozen=True)
class ClientTLSConfig:
    """A client's TLS: the CA to trust (None: the system's roots), a client certificate for mutual
    TLS, and a server-name override (when the address dialled is not a name in the server's
    certificate, e.g. an SSH tunnel's localhost)."""

    ca_file: str | None = None  # PEM CA bundle that signed the server's certificate (--tls-ca)
    cert_file: str | None = None  # PEM client certificate chain, for mutual TLS (--tls-cert)
    key_file: str | None = None  # its unencrypted PEM private key (--tls-key)
    server_name: str | None = None  # name checked against the server's certificate (--tls-server-name)
    _ca_pem: bytes | None = field(init=False, repr=False, compare=False)
    _cert_pem: bytes | None = field(init=False, repr=False, compare=False)
    _key_pem: bytes | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        f = CLIENT_FLAGS
        if (self.cert_file is None) != (self.key_file is None):
            given, missing = ("cert", "key") if self.key_file is None else ("key", "cert")
            raise TLSConfigError(
                f"{f[given]} needs {f[missing]}: a client certificate goes with its private key"
            )
        if self.server_name is not None and (
            not self.server_name or any(c.isspace() for c in self.server_name)
        ):
            raise TLSConfigError(f"{f['server_name']}: must be a host name, got {self.server_name!r}")
        ca = None
        if self.ca_file is not None:
            ca = _read_pem(self.ca_file, f["ca"], "cert")
            _check_ca(self.ca_file, f["ca"])
        cert = key = None
        if self.cert_file is not None and self.key_file is not None:
            cert = _read_pem(self.cert_file, f["cert"], "cert")
            key = _read_pem(self.key_file, f["key"], "key")
            _check_cert_chain(self.cert_file, self.key_file, f, ssl.Purpose.SERVER_AUTH)
        object.__setattr__(self, "_ca_pem", ca)
        object.__setattr__(self, "_cert_pem", cert)
        object.__setattr__(self, "_key_pem", key)

    @classmethod
    def from_files(
        cls,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        server_name: str | None = None,
        *,
        enabled: bool = False,
    ) -> ClientTLSConfig | None:
        """The config for these flags' values; None (plaintext) when none is set and not `enabled`
        (`--tls`: TLS with the system's trusted roots)."""
        ca, cert, key, server_name = (v or None for v in (ca, cert, key, server_name))
        if not enabled and ca is None and cert is None and key is None and server_name is None:
            return None
        return cls(ca, cert, key, server_name)

    @property
    def mutual(self) -> bool:
        return self.cert_file is not None

    def channel_credentials(self, token: str | None = None) -> grpc.ChannelCredentials:
        """grpcio's channel credentials; with `token`, every call also carries
        `authorization: Bearer <token>` (gRPC sends such call credentials over secure channels only)."""
        creds = grpc.ssl_channel_credentials(
            root_certificates=self._ca_pem, private_key=self._key_pem, certificate_chain=self._cert_pem
        )
        if token:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
        return creds

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


# -- how exposed a listening address is ------------------------------------------------------------

_ANY_ADDRESS = {"", "0.0.0.0", "::", "[::]", "*"}


def is_loopback(host: str) -> bool:
    """True when `host` (a bind address) accepts connections from this machine only."""
    h = host.strip()
    if h in _ANY_ADDRESS:
        return False
    h = h[1:-1] if h.startswith("[") and h.endswith("]") else h
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        pass
    if h.lower() == "localhost":
        return True
    with contextlib.suppress(OSError, UnicodeError):  # a name: loopback only if every address it has is
        addrs = {str(info[4][0]).split("%")[0] for info in socket.getaddrinfo(h, None)}
        return bool(addrs) and all(ipaddress.ip_address(a).is_loopback for a in addrs)
    return False


def exposure_warnings(host: str, tls: TLSConfig | None, auth_token: str | None) -> list[str]:
    """What is unsafe about a gateway bound to `host` with these settings, each naming the flag to
    set; empty for loopback binds and for TLS with client authentication (token or certificates)."""
    if is_loopback(host):
        return []
    where = f"the gateway listens on {host or '0.0.0.0'}, reachable beyond this machine"
    out = []
    if tls is None:
        out.append(
            f"{where}, without TLS: requests{', answers and the bearer token' if auth_token else ' and answers'} "
            "travel in clear text; set --tls-cert/--tls-key"
        )
    if not auth_token and (tls is None or not tls.mutual):
        out.append(
            f"{where}, without authentication: anyone who reaches the port can use the cluster; "
            "set --auth-token (or --tls-client-ca for client certificates)"
        )
    return out
