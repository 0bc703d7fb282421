"""One MQTT connection per agent: persistent session, reconnect with backoff, and an inbox.

paho's callbacks run on its network thread; they only put messages on ``inbox``. Agents process
the inbox in their own loop, so nothing slow ever blocks keepalive or acknowledgements.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from common import constants as C
from common.errors import TransportError
from common.lifecycle import sigterm_held

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerOptions:
    """Where and how to connect; secrets are kept out of ``repr`` so they never reach a log."""

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    connect_timeout_s: float = C.CONNECT_TIMEOUT_S

    @property
    def parsed(self) -> tuple[str, str, int, str]:
        """(scheme, host, port, protocol) with protocol '5' or '3.1.1' (``?protocol=3.1.1``)."""
        u = urlparse(self.url)
        if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise TransportError(f"broker URL {self.url!r}: scheme must be mqtt:// or mqtts://")
        tls = u.scheme in ("mqtts", "ssl")
        try:
            port = u.port or (8883 if tls else 1883)
        except ValueError:
            raise TransportError(f"broker URL {self.url!r}: invalid port") from None
        if not u.hostname:
            raise TransportError(f"broker URL {self.url!r} has no host")
        protocol = parse_qs(u.query).get("protocol", ["5"])[0]
        if protocol not in ("5", "3.1.1"):
            raise TransportError(f"broker URL {self.url!r}: protocol must be 5 or 3.1.1")
        return ("mqtts" if tls else "mqtt"), u.hostname, port, protocol


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (the format of ``mistnet broker init-auth`` credentials files)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise TransportError(f"credentials file {path}: {exc.strerror}") from None
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip('"').strip("'")
    return values


def broker_options(
    url: str | None,
    username: str | None = None,
    password: str | None = None,
    credentials: Path | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> BrokerOptions:
    """Flags win over the credentials file, which wins over the MISTNET_* environment."""
    import os

    env = {k: v for k, v in os.environ.items() if k.startswith("MISTNET_")}
    if credentials is not None:
        env.update(read_env_file(credentials))
    return BrokerOptions(
        url=url or env.get("MISTNET_BROKER") or "mqtt://127.0.0.1:1883",
        username=username or env.get("MISTNET_USERNAME"),
        password=password or env.get("MISTNET_PASSWORD"),
        ca_file=ca_file or env.get("MISTNET_CA_FILE"),
        cert_file=cert_file or env.get("MISTNET_CERT_FILE"),
        key_file=key_file or env.get("MISTNET_KEY_FILE"),
    )


class Rejections:
    """Counts refused inbound messages by kind and logs why, without letting a flood fill the log.

    ``counts`` (a Counter keyed by a bounded label: the message kind, never free text) is what
    metrics and summaries report; each rejection is logged with its reason, at most ``burst`` per
    ``interval_s``, after which one line says how many more were refused.
    """

    def __init__(self, logger: logging.Logger, counts: Counter[str], burst: int = 20, interval_s: float = 10.0) -> None:
        self.log = logger
        self.counts = counts
        self.burst = burst
        self.interval_s = interval_s
        self._window_start = 0.0
        self._logged = 0
        self._suppressed = 0
        self.unlogged = 0

    def __call__(self, kind: str, topic: str, reason: object) -> None:
        self.counts[kind] += 1
        now = time.monotonic()
        if now - self._window_start > self.interval_s:
            if self._suppressed:
                self.log.warning("%d more malformed messages rejected (not logged one by one)", self._suppressed)
            self._window_start, self._logged, self._suppressed = now, 0, 0
        if self._logged < self.burst:
            self._logged += 1
            self.log.warning("rejected %s message on %s: %s", kind, topic[:200], str(reason)[:300])
        else:
            self._suppressed += 1
            self.unlogged += 1

    def summary(self) -> str:
        total = sum(self.counts.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        text = f"rejected {total} malformed message(s)" + (f" ({detail})" if detail else "")
        return text + (f", {self.unlogged} of them not logged one by one" if self.unlogged else "")


@dataclass(frozen=True)
class Inbound:
    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True)
class LinkEvent:
    connected: bool
    reason: str = ""


class MqttLink:
    """A paho client whose inbound traffic lands in a queue."""

    def __init__(
        self,
        options: BrokerOptions,
        client_id: str,
        subscriptions: list[str],
        will: tuple[str, bytes] | None = None,
        persistent: bool = True,
    ) -> None:
        """``persistent`` keeps the session (subscriptions, queued QoS 1 messages) across reconnects."""
        self.options = options
        self.persistent = persistent
        self.subscriptions = list(subscriptions)
        self.inbox: queue.Queue[Inbound | LinkEvent] = queue.Queue()
        self.max_packet_size: int | None = None
        self._last: mqtt.MQTTMessageInfo | None = None
        self._connected = threading.Event()
        self._refused: str | None = None
        scheme, self._host, self._port, protocol = options.parsed
        self._v5 = protocol == "5"
        with sigterm_held():
            self.client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
                clean_session=None if self._v5 else not persistent,
            )
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(64)
        self.client.reconnect_delay_set(C.RECONNECT_MIN_DELAY_S, C.RECONNECT_MAX_DELAY_S)
        if options.username:
            self.client.username_pw_set(options.username, options.password)
        if scheme == "mqtts":
            self._configure_tls()
        if will is not None:
            self.client.will_set(will[0], will[1], qos=C.QOS, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def _configure_tls(self) -> None:
        o = self.options
        for label, path in (("CA file", o.ca_file), ("certificate", o.cert_file), ("key", o.key_file)):
            if path and not Path(path).is_file():
                raise TransportError(f"TLS {label} {path} does not exist")
        try:
            self.client.tls_set(
                ca_certs=o.ca_file,
                certfile=o.cert_file,
                keyfile=o.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (ssl.SSLError, ValueError, OSError) as exc:
            raise TransportError(f"TLS setup failed: {exc}") from None

    # paho callbacks: record and enqueue only --------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            return
        if properties is not None and hasattr(properties, "MaximumPacketSize"):
            self.max_packet_size = int(properties.MaximumPacketSize)
        for topic in self.subscriptions:
            client.subscribe(topic, qos=C.QOS)
        self._connected.set()
        self.inbox.put(LinkEvent(connected=True))

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        self._connected.clear()
        self.inbox.put(LinkEvent(connected=False, reason=str(reason)))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.inbox.put(Inbound(message.topic, bytes(message.payload), bool(message.retain)))

    # API --------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def connect(self, timeout_s: float | None = None) -> None:
        """Connect (retrying while the broker is unreachable) and start the network thread."""
        timeout_s = self.options.connect_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        delay = 0.2
        while True:
            try:
                self._connect_once()
                break
            except (OSError, ssl.SSLError) as exc:
                if isinstance(exc, ssl.SSLError) or time.monotonic() + delay > deadline:
                    raise TransportError(f"cannot connect to {self.options.url}: {exc}") from None
                time.sleep(delay)
                delay = min(delay * 2, C.RECONNECT_MAX_DELAY_S)
        self.client.loop_start()
        while not self._connected.wait(0.1):
            if self._refused:
                self.client.loop_stop()
                raise TransportError(f"broker {self.options.url} refused the connection: {self._refused}")
            if time.monotonic() > deadline:
                self.client.loop_stop()
                raise TransportError(f"no answer from broker {self.options.url} within {timeout_s:.0f} s")

    def _connect_once(self) -> None:
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = C.SESSION_EXPIRY_S if self.persistent else 0
            self.client.connect(
                self._host, self._port, keepalive=C.KEEPALIVE_S, clean_start=not self.persistent, properties=props
            )
        else:
            self.client.connect(self._host, self._port, keepalive=C.KEEPALIVE_S)

    def drain(self, handle: Callable[[Inbound | LinkEvent], None], timeout_s: float) -> None:
        """Hand every queued item to ``handle``, waiting up to ``timeout_s`` for the first."""
        try:
            item = self.inbox.get(timeout=timeout_s)
        except queue.Empty:
            return
        while True:
            handle(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo:
        self._last = self.client.publish(topic, payload, qos=C.QOS, retain=retain)
        return self._last

    def close(self, final: tuple[str, bytes] | None = None) -> None:
        """Publish ``final`` (e.g. an offline status) and disconnect cleanly."""
        if final is not None and self.connected:
            self.publish(final[0], final[1], retain=True)
        if self._last is not None and self.connected:
            # QoS 1 acknowledgements arrive in order: once the last is in, everything before it is too.
            with contextlib.suppress(RuntimeError, ValueError):
                self._last.wait_for_publish(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()
