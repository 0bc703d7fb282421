"""Throwaway TLS material for tests and trials: a CA, a server certificate and client certificates.

``tls_init(out)`` writes::

    ca.crt  ca.key                CA (keep ca.key away from the broker; only ca.crt is distributed)
    server.crt  server.key        broker certificate, SANs from ``hosts``
    NAME.crt  NAME.key  NAME.env  client certificate (CN = NAME) and its MISTNET_* TLS settings
    mosquitto-tls.conf            a listener snippet for mosquitto.conf

Keys are ECDSA P-256, private keys mode 0600.  For production, use certificates of your own CA.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import grp
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import MistnetError
from common.protocol import check_name

from .launcher import BrokerError

CA_CN = "MistNet throwaway CA"


def tls_listener_config(
    port: int,
    ca_file: Path,
    cert_file: Path,
    key_file: Path,
    *,
    require_certificate: bool = False,
    use_identity_as_username: bool = False,
    bind: str | None = None,
) -> str:
    """A mosquitto ``listener`` block for TLS (settings after it belong to this listener)."""
    lines = [
        "# TLS listener: clients use mqtts://HOST:PORT with --ca-file ca.crt"
        + (" and a client certificate (--cert-file, --key-file)" if require_certificate else ""),
        f"listener {port}" + (f" {bind}" if bind else ""),
        f"cafile {ca_file}",
        f"certfile {cert_file}",
        f"keyfile {key_file}",
        "tls_version tlsv1.2",
        f"require_certificate {'true' if require_certificate else 'false'}",
    ]
    if use_identity_as_username:
        lines.append("use_identity_as_username true")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class TlsBundle:
    out: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]
    env_files: dict[str, Path]
    conf: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MistNet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _sans(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return names


def _cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    days: int,
    *,
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                       critical=False)
        .add_extension(
            x509.KeyUsage(digital_signature=not ca, key_cert_sign=ca, crl_sign=ca, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def tls_init(
    out: Path,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    clients: Sequence[str] = ("client",),
    *,
    port: int = 8883,
    days: int = 30,
    require_certificate: bool = False,
    force: bool = False,
) -> TlsBundle:
    """Create the CA, server and client certificates and the listener snippet under ``out``."""
    hosts, clients = _checked(hosts, clients, days)
    out = Path(out).resolve()
    names = ["ca.crt", "ca.key", "server.crt", "server.key", "mosquitto-tls.conf"]
    names += [f"{c}.{ext}" for c in clients for ext in ("crt", "key", "env")]
    existing = [str(out / n) for n in names if (out / n).exists()]
    if existing and not force:
        raise BrokerError(f"{existing[0]} already exists; pass --force to overwrite")

    ca_key = _key()
    ca_cert = _cert(_name(CA_CN), ca_key, _name(CA_CN), ca_key, days, ca=True)
    server_key = _key()
    server_cert = _cert(_name(hosts[0]), server_key, ca_cert.subject, ca_key, days,
                        usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=_sans(hosts))

    def pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    try:
        out.mkdir(parents=True, exist_ok=True)
        _write(out / "ca.crt", pem(ca_cert), 0o644)
        _write(out / "ca.key", _pem_key(ca_key), 0o600)
        _write(out / "server.crt", pem(server_cert), 0o644)
        # mosquitto drops to user `mosquitto` when started as root: readable by owner + group only.
        _write(out / "server.key", _pem_key(server_key), 0o640)
        _group_mosquitto(out / "server.key")
        client_files: dict[str, tuple[Path, Path]] = {}
        env_files: dict[str, Path] = {}
        for c in clients:
            key = _key()
            cert = _cert(_name(c), key, ca_cert.subject, ca_key, days, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
            client_files[c] = (out / f"{c}.crt", out / f"{c}.key")
            _write(client_files[c][0], pem(cert), 0o644)
            _write(client_files[c][1], _pem_key(key), 0o600)
            env_files[c] = out / f"{c}.env"
            env = _client_env(c, f"mqtts://{hosts[0]}:{port}", out / "ca.crt", client_files[c], require_certificate)
            _write(env_files[c], env.encode(), 0o600)
        conf = out / "mosquitto-tls.conf"
        _write(conf, tls_listener_config(port, out / "ca.crt", out / "server.crt", out / "server.key",
                                         require_certificate=require_certificate).encode(), 0o644)
    except OSError as exc:
        raise BrokerError(f"cannot write to {out}: {exc.strerror} ({exc.filename})") from None
    return TlsBundle(out=out, ca_cert=out / "ca.crt", ca_key=out / "ca.key", server_cert=out / "server.crt",
                     server_key=out / "server.key", clients=client_files, env_files=env_files, conf=conf)


def _checked(host_names: Sequence[str], client_names: Sequence[str], days: int) -> tuple[list[str], list[str]]:
    """The host and client names, stripped and checked, or a BrokerError saying what is wrong."""
    hosts = [h.strip() for h in host_names if h.strip()]
    if not hosts:
        raise BrokerError("--hosts needs at least one host name or IP address")
    clients = [c.strip() for c in client_names if c.strip()]
    for c in clients:
        try:
            check_name("client name", c)
        except MistnetError as exc:
            raise BrokerError(str(exc)) from None
        if c in ("ca", "server"):
            raise BrokerError(f"client name {c!r} would overwrite the {c} files")
    if not 0 < days <= 3650:
        raise BrokerError("--days must be between 1 and 3650")
    return hosts, clients


def _client_env(client: str, url: str, ca: Path, files: tuple[Path, Path], require_certificate: bool) -> str:
    """The client's ``--credentials`` file: broker URL and CA, and its certificate under mutual TLS."""
    env = [
        f"# TLS settings of client {client!r} from `mistnet broker tls-init` (use with --credentials).",
        f"MISTNET_BROKER={url}",
        f"MISTNET_CA_FILE={ca}",
    ]
    if require_certificate:
        env += [f"MISTNET_CERT_FILE={files[0]}", f"MISTNET_KEY_FILE={files[1]}"]
    return "\n".join(env) + "\n"


def _group_mosquitto(path: Path) -> None:
    if os.geteuid() != 0:
        return
    with contextlib.suppress(KeyError):
        os.chown(path, 0, grp.getgrnam("mosquitto").gr_gid)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)
