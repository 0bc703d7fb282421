"""Shared pytest fixtures."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from broker.auth import AuthBundle, init_auth
from broker.launcher import Mosquitto, find_mosquitto, free_port, local_mosquitto, mosquitto_from_config
from broker.tls import TlsBundle, tls_init

# ---- broker fixtures (owner: broker) -------------------------------------------------------------
# mosquitto          private anonymous mosquitto on a free loopback port: .url, .port, .stop()
# secured_broker     init-auth output (edge1, edge2, cloud, monitor) run by a real mosquitto:
#                    .url, .credentials[name] -> Path of the NAME.env file, .passwords[name]
# tls_broker         tls-init output run by a TLS-only mosquitto (anonymous, server auth only):
#                    .url (mqtts://127.0.0.1:PORT), .tls.ca_cert, .tls.clients["client"]
# All fail (never skip) when mosquitto is not installed: `make test` installs it.



# Tests stop agents and brokers with SIGINT, as Ctrl-C and the containers' STOPSIGNAL do. A shell
# that starts pytest in the background (`cmd &`) makes it ignore SIGINT, and children inherit an
# ignored signal across exec: with Python's own handler here instead, they start with the default.
signal.signal(signal.SIGINT, signal.default_int_handler)


def _require_mosquitto() -> None:
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A started private mosquitto (anonymous, loopback, no persistence)."""
    _require_mosquitto()
    broker = local_mosquitto(tmp_path / "mosquitto").start()
    try:
        yield broker
    finally:
        broker.stop()


@dataclass
class SecuredBroker:
    mosquitto: Mosquitto
    auth: AuthBundle
    credentials: dict[str, Path] = field(default_factory=dict)
    passwords: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def url(self) -> str:
        return self.mosquitto.url


@pytest.fixture
def secured_broker(tmp_path: Path) -> Iterator[SecuredBroker]:
    """``mistnet broker init-auth --nodes edge1,edge2`` output run by mosquitto on a free port."""
    _require_mosquitto()
    port = free_port()
    bundle = init_auth(tmp_path / "auth", ["edge1", "edge2"], port=port)
    broker = mosquitto_from_config(bundle.config, port=port, workdir=tmp_path / "auth-run").start()
    try:
        yield SecuredBroker(broker, bundle, dict(bundle.credentials), dict(bundle.passwords))
    finally:
        broker.stop()


@dataclass
class TlsBroker:
    mosquitto: Mosquitto
    tls: TlsBundle

    @property
    def url(self) -> str:
        return self.mosquitto.url


def start_tls_mosquitto(tls: TlsBundle, workdir: Path, extra: str = "allow_anonymous true\n") -> Mosquitto:
    """mosquitto serving only the tls-init listener snippet (moved to a free port)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "tls.conf"
    config.write_text("per_listener_settings false\n" + extra + tls.conf.read_text())
    return mosquitto_from_config(config, port=free_port(), workdir=workdir).start()


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[TlsBroker]:
    """``mistnet broker tls-init`` output (localhost, 127.0.0.1) run by an anonymous TLS mosquitto."""
    _require_mosquitto()
    bundle = tls_init(tmp_path / "tls")
    broker = start_tls_mosquitto(bundle, tmp_path / "tls-run")
    try:
        yield TlsBroker(broker, bundle)
    finally:
        broker.stop()


# ---- end of broker fixtures ----------------------------------------------------------------------
