"""Broker accounts for MistNet: password file, ACL and per-user credentials files.

``init_auth`` writes, into one directory::

    mosquitto.conf          listener, allow_anonymous false, password_file, acl_file, persistence
    passwd                  mosquitto password file ($7$ = PBKDF2-SHA512 hashes, never clear text)
    acl                     per-user topic rights derived from common.protocol.Topics
    credentials/NAME.env    MISTNET_USERNAME / MISTNET_PASSWORD / MISTNET_BROKER (mode 0600)
    data/                   persistence_location

The credentials files are what agents read with ``--credentials FILE`` (common.transport).
Passwords appear nowhere else: not on stdout, not in a process's arguments.
"""

from __future__ import annotations

import base64
import grp
import hashlib
import hmac
import os
import pwd
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common import constants as C
from common.errors import MistnetError
from common.protocol import Topics, check_name

from .launcher import BrokerError

Role = Literal["edge", "cloud", "monitor"]
Access = Literal["read", "write", "readwrite"]

# A feature/head chunk (MAX_CHUNK_BYTES) plus its msgpack envelope, topic and v5 properties fit
# easily; keep in step with broker/conf/mosquitto.conf (a test checks).
MAX_PACKET_BYTES = C.MAX_CHUNK_BYTES + 64 * 1024
MAX_QUEUED_MESSAGES = 20000
MAX_INFLIGHT_MESSAGES = 100

PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes
SALT_BYTES = 12
HASH_BYTES = 64


# ACL ---------------------------------------------------------------------------------------------


def acl_rules(role: Role, name: str) -> list[tuple[Access, str]]:
    """The topic rights of one user, built from the topic tree (a node id is its own level)."""
    if role == "edge":
        return [
            ("write", Topics.features(name, "#")),
            ("write", Topics.node_status(name)),
            ("read", Topics.job_assignment(name, "#")),
            ("read", Topics.node_heads(name)),
            ("read", Topics.ack(name, "#")),
        ]
    if role == "cloud":
        return [
            ("readwrite", Topics.job_assignment("+", "#")),
            ("readwrite", Topics.node_heads("+")),
            ("readwrite", Topics.ack("+", "#")),
            ("readwrite", Topics.all_job_status()),
            ("readwrite", Topics.checkpoint("+")),
            ("readwrite", Topics.control("+")),  # operators cancel with the cloud's credentials
            ("read", Topics.features("+", "#")),
            ("read", Topics.all_node_status()),
        ]
    if role == "monitor":
        return [
            ("read", Topics.all_node_status()),
            ("read", Topics.all_job_status()),
            ("read", Topics.checkpoint("+")),
        ]
    raise ValueError(f"unknown role {role!r}")


def render_acl(cloud: str, monitor: str | None, nodes: Sequence[str]) -> str:
    lines = [
        "# MistNet broker ACL, written by `mistnet broker init-auth` (see broker/conf/acl.example).",
        "# read = subscribe and receive, write = publish (last will included); the rest is denied.",
        "# No line precedes the first `user`: anonymous clients get no rights (and are refused).",
        "",
    ]
    users: list[tuple[Role, str]] = [("cloud", cloud)]
    if monitor:
        users.append(("monitor", monitor))
    users.extend(("edge", n) for n in nodes)
    for role, name in users:
        lines.append(f"# {role}")
        lines.append(f"user {name}")
        lines.extend(f"topic {access} {topic}" for access, topic in acl_rules(role, name))
        lines.append("")
    return "\n".join(lines)


# Passwords ---------------------------------------------------------------------------------------


def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A mosquitto ``$7$`` hash: ``$7$<iterations>$<base64 salt>$<base64 PBKDF2-SHA512>``."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(encoded: str, password: str) -> bool:
    """Check a password against a ``$7$`` hash (as mosquitto does)."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    iterations, salt, digest = int(parts[2]), base64.b64decode(parts[3]), base64.b64decode(parts[4])
    mine = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(digest))
    return hmac.compare_digest(mine, digest)


def new_password() -> str:
    """32 URL-safe characters (192 bits): no ':' for the password file, no quoting in .env files."""
    return secrets.token_urlsafe(24)


def _write_private(path: Path, text: str, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), mode)
        f.write(text)


def write_password_file(
    path: Path,
    accounts: dict[str, str],
    hasher: Literal["auto", "mosquitto_passwd", "python"] = "auto",
) -> str:
    """Write a mosquitto password file for ``{user: password}``; returns the hasher used.

    With mosquitto_passwd installed, clear-text lines go to a 0600 temporary file that
    ``mosquitto_passwd -U`` hashes in place (so no password ever appears in a process's arguments,
    unlike ``-b``); otherwise (or when it fails) the same ``$7$`` hashes are computed here.
    """
    for user, password in accounts.items():
        if ":" in user or ":" in password or "\n" in user + password:
            raise BrokerError(f"user {user!r}: ':' and newlines cannot appear in a password file")
    tool = shutil.which("mosquitto_passwd") if hasher != "python" else None
    if hasher == "mosquitto_passwd" and tool is None:
        raise BrokerError("mosquitto_passwd is not installed")
    if tool is not None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            _write_private(tmp, "".join(f"{u}:{p}\n" for u, p in accounts.items()))
            done = subprocess.run([tool, "-U", str(tmp)], capture_output=True, text=True, timeout=30)
            lines = tmp.read_text().splitlines()
            if done.returncode == 0 and len(lines) == len(accounts) and all(
                line.split(":", 1)[1].startswith(("$7$", "$6$")) for line in lines
            ):
                os.replace(tmp, path)
                return "mosquitto_passwd"
            if hasher == "mosquitto_passwd":
                raise BrokerError(f"mosquitto_passwd -U failed: {done.stderr.strip() or done.returncode}")
        finally:
            tmp.unlink(missing_ok=True)
    _write_private(path, "".join(f"{u}:{hash_password(p)}\n" for u, p in accounts.items()))
    return "python"


# Credentials -------------------------------------------------------------------------------------


def credentials_text(
    name: str, role: Role, password: str, url: str, extra: dict[str, str] | None = None
) -> str:
    lines = [
        f"# MistNet broker credentials of {name!r} (role: {role}), from `mistnet broker init-auth`.",
        "# Secret: keep mode 0600.  Use with --credentials FILE.",
        f"MISTNET_USERNAME={name}",
        f"MISTNET_PASSWORD={password}",
        f"MISTNET_BROKER={url}",
    ]
    lines.extend(f"{k}={v}" for k, v in (extra or {}).items())
    return "\n".join(lines) + "\n"


# The whole bundle --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """Server side of a TLS listener (e.g. the output of ``mistnet broker tls-init``)."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    port: int = 8883
    require_certificate: bool = False

    @classmethod
    def from_dir(cls, directory: Path, port: int = 8883, require_certificate: bool = False) -> TlsFiles:
        d = Path(directory).resolve()
        files = cls(d / "ca.crt", d / "server.crt", d / "server.key", port, require_certificate)
        for p in (files.ca_file, files.cert_file, files.key_file):
            if not p.is_file():
                raise BrokerError(f"TLS directory {d}: {p.name} is missing (make it with `mistnet broker tls-init`)")
        return files


@dataclass(frozen=True)
class AuthBundle:
    out: Path
    config: Path
    passwd: Path
    acl: Path
    credentials: dict[str, Path]
    roles: dict[str, Role]
    url: str
    hasher: str
    passwords: dict[str, str] = field(repr=False, default_factory=dict)


def render_auth_config(
    out: Path, port: int, bind: str | None = None, tls: TlsFiles | None = None
) -> str:
    listener = f"listener {port}" + (f" {bind}" if bind else "")
    lines = [
        "# MistNet broker, written by `mistnet broker init-auth`.  Run: mosquitto -c <this file>",
        "# (running as root, mosquitto switches to user `mosquitto`, which must be able to read",
        "# passwd and acl and write data/; see docs/security.md).",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {out / 'passwd'}",
        f"acl_file {out / 'acl'}",
        "persistence true",
        f"persistence_location {out / 'data'}/",
        "autosave_interval 60",
        "persistent_client_expiration 7d",
        f"max_packet_size {MAX_PACKET_BYTES}",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        "set_tcp_nodelay true",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
        "",
        "# Plain MQTT: passwords travel in clear text; on an untrusted network bind it to 127.0.0.1",
        "# and use the TLS listener.",
        listener,
    ]
    if tls is not None:
        from .tls import tls_listener_config

        lines += ["", tls_listener_config(tls.port, tls.ca_file, tls.cert_file, tls.key_file,
                                          require_certificate=tls.require_certificate, bind=bind)]
    return "\n".join(lines) + "\n"


def _validate_names(nodes: Sequence[str], cloud: str, monitor: str | None) -> list[str]:
    clean = [n.strip() for n in nodes if n.strip()]
    if not clean:
        raise BrokerError("--nodes needs at least one node id, e.g. --nodes edge1,edge2")
    everyone = [*clean, cloud, *([monitor] if monitor else [])]
    for name in everyone:
        try:
            check_name("user name", name)
        except MistnetError as exc:
            raise BrokerError(str(exc)) from None
    dupes = sorted({n for n in everyone if everyone.count(n) > 1})
    if dupes:
        raise BrokerError(f"each user needs its own name; repeated: {', '.join(dupes)}")
    return clean


def _share_with_mosquitto(paths: Sequence[Path], data_dir: Path) -> None:
    """Running as root: let a system mosquitto (which drops to user `mosquitto`) read and write."""
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam("mosquitto")
        gid = grp.getgrnam("mosquitto").gr_gid
    except KeyError:
        return
    for p in paths:
        os.chown(p, 0, gid)
        os.chmod(p, 0o640)
    os.chown(data_dir, user.pw_uid, user.pw_gid)


def init_auth(
    out: Path,
    nodes: Sequence[str],
    *,
    cloud: str = "cloud",
    monitor: str | None = "monitor",
    port: int = 1883,
    host: str = "127.0.0.1",
    bind: str | None = None,
    tls: TlsFiles | None = None,
    force: bool = False,
    hasher: Literal["auto", "mosquitto_passwd", "python"] = "auto",
) -> AuthBundle:
    """Create accounts for the cloud, an optional monitor and each edge (see module docstring).

    Refuses to overwrite any existing output file unless ``force``.  ``host`` is what clients
    put in their broker URL; with ``tls`` the URL is ``mqtts://host:tls.port`` and the credentials
    carry ``MISTNET_CA_FILE``.
    """
    if not 0 < port < 65536:
        raise BrokerError(f"--port {port} is not a TCP port")
    node_ids = _validate_names(nodes, cloud, monitor)
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise BrokerError(f"--out {out} exists and is not a directory")
    roles: dict[str, Role] = {cloud: "cloud"}
    if monitor:
        roles[monitor] = "monitor"
    roles.update((n, "edge") for n in node_ids)
    cred_dir = out / "credentials"
    targets = [out / "mosquitto.conf", out / "passwd", out / "acl", *(cred_dir / f"{n}.env" for n in roles)]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise BrokerError(
            f"{existing[0]} already exists{f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''};"
            " pass --force to overwrite (the old passwords stop working)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        cred_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(cred_dir, 0o700)
        data_dir = out / "data"
        data_dir.mkdir(exist_ok=True)
        passwords = {name: new_password() for name in roles}
        used = write_password_file(out / "passwd", passwords, hasher)
        _write_private(out / "acl", render_acl(cloud, monitor, node_ids))
        (out / "mosquitto.conf").write_text(render_auth_config(out, port, bind, tls))
        url = f"mqtts://{host}:{tls.port}" if tls else f"mqtt://{host}:{port}"
        extra = {"MISTNET_CA_FILE": str(tls.ca_file)} if tls else {}
        creds: dict[str, Path] = {}
        for name, role in roles.items():
            creds[name] = cred_dir / f"{name}.env"
            _write_private(creds[name], credentials_text(name, role, passwords[name], url, extra))
        _share_with_mosquitto([out / "passwd", out / "acl"], data_dir)
    except OSError as exc:
        raise BrokerError(f"cannot write to {out}: {exc.strerror} ({exc.filename})") from None
    return AuthBundle(out=out, config=out / "mosquitto.conf", passwd=out / "passwd", acl=out / "acl",
                      credentials=creds, roles=roles, url=url, hasher=used, passwords=passwords)
