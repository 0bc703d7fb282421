"""A small synchronous MQTT client to check a broker's authentication, ACL and TLS.

Every call waits for the broker's answer (CONNACK, SUBACK, PUBACK) and returns its reason code,
so tests and diagnostics can tell "refused" from "allowed" without sleeping.  Not for agents:
they use common.transport.
"""

from __future__ import annotations

import queue
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from common.lifecycle import sigterm_held

from .launcher import BrokerError

SUCCESS = 0
NOT_AUTHORIZED = 0x87
BAD_USER_OR_PASSWORD = 0x86
UNSPECIFIED_ERROR = 0x80


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool


def _code(rc: Any) -> int:
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    return int(rc)


class Probe:
    """One paho client (MQTT v5 unless the URL says ``?protocol=3.1.1``) with blocking calls."""

    def __init__(
        self,
        url: str,
        username: str | None = None,
        password: str | None = None,
        *,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        client_id: str | None = None,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        u = urlparse(url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise BrokerError(f"broker URL {url!r}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")
        self.tls = u.scheme == "mqtts"
        self.host = u.hostname
        self.port = u.port or (8883 if self.tls else 1883)
        self.v5 = parse_qs(u.query).get("protocol", ["5"])[0] != "3.1.1"
        with sigterm_held():
            self.client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id or f"probe-{uuid.uuid4().hex[:8]}",
                protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
                reconnect_on_failure=False,  # a probe reports a refusal; it never retries
            )
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        if self.tls:
            self.client.tls_set(ca_certs=ca_file, certfile=cert_file, keyfile=key_file,
                                cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.messages: queue.Queue[Received] = queue.Queue()
        self.received: list[Received] = []
        self.connack: int | None = None
        self.connack_properties: Properties | None = None
        self._connected = threading.Event()
        self.disconnected = threading.Event()
        self.disconnect_reason: int | None = None
        self._acks: dict[int, list[int]] = {}
        self._ack_event = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message

    # callbacks (network thread) ----------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.connack = _code(rc)
        self.connack_properties = props
        self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.disconnect_reason = _code(rc)
        self.disconnected.set()
        if self.connack is None:  # dropped before CONNACK (e.g. TLS client certificate refused)
            self.connack = _code(rc) or UNSPECIFIED_ERROR
        self._connected.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any = None) -> None:
        with self._ack_event:
            self._acks[mid] = [_code(c) for c in codes]
            self._ack_event.notify_all()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: Any, props: Any = None) -> None:
        with self._ack_event:
            self._acks[mid] = [_code(rc)]
            self._ack_event.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))

    # blocking API ------------------------------------------------------------------------------

    def connect(self, timeout_s: float = 3.0) -> int:
        """CONNACK reason code (0 = accepted).  TLS failures raise ``ssl.SSLError`` here."""
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(timeout_s):
            raise BrokerError(f"no CONNACK from {self.host}:{self.port} within {timeout_s} s")
        return int(self.connack or 0)

    def _wait_ack(self, mid: int, timeout_s: float) -> list[int]:
        deadline = time.monotonic() + timeout_s
        with self._ack_event:
            while mid not in self._acks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerError(f"no acknowledgement for message id {mid} within {timeout_s} s")
                self._ack_event.wait(left)
            return self._acks.pop(mid)

    def subscribe(self, topic: str, qos: int = 1, timeout_s: float = 3.0) -> int:
        """SUBACK reason code: the granted QoS (0-2), or >= 0x80 when refused."""
        rc, mid = self.client.subscribe(topic, qos)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerError(f"subscribe {topic}: {mqtt.error_string(rc)}")
        return self._wait_ack(mid, timeout_s)[0]

    def publish(self, topic: str, payload: bytes = b"x", qos: int = 1, retain: bool = False,
                timeout_s: float = 3.0) -> int:
        """PUBACK reason code for QoS 1 (0 = accepted, 0x10 = no subscribers, 0x87 = denied)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            info.wait_for_publish(timeout_s)
            return SUCCESS
        return self._wait_ack(info.mid, timeout_s)[0]

    def wait_message(self, topic: str, timeout_s: float = 3.0) -> Received | None:
        """The first message on ``topic`` (received earlier or within the timeout), or None."""
        for m in self.received:
            if m.topic == topic:
                return m
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                m = self.messages.get(timeout=left)
            except queue.Empty:
                break
            self.received.append(m)
            if m.topic == topic:
                return m
        return None

    def drain(self) -> list[Received]:
        """Everything received so far."""
        while True:
            try:
                self.received.append(self.messages.get_nowait())
            except queue.Empty:
                return list(self.received)

    def topics(self) -> set[str]:
        return {m.topic for m in self.drain()}

    def drop(self) -> None:
        """Leave so that the broker publishes the last will (v5 reason 0x04, or a bare socket close)."""
        if self.v5:
            self.client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=0x04))
        else:
            sock = self.client.socket()
            if sock is not None:
                sock.close()
        self.client.loop_stop()

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
