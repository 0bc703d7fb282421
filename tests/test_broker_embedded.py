"""start_embedded_broker: mosquitto when installed, else amqtt in-process (MQTT 3.1.1)."""

from __future__ import annotations

from pathlib import Path

import pytest

import broker.launcher as launcher
from broker.launcher import BrokerError, local_mosquitto, start_embedded_broker
from broker.probe import SUCCESS, Probe

pytestmark = pytest.mark.integration


def roundtrip(url: str, topic: str = "t/x", payload: bytes = b"hello", retain: bool = False) -> None:
    with Probe(url) as p:
        assert p.connect() == SUCCESS
        assert p.subscribe(topic) == 1
        assert p.publish(topic, payload, retain=retain) == SUCCESS
        got = p.wait_message(topic)
        assert got is not None and got.payload == payload


def test_embedded_prefers_mosquitto(tmp_path: Path) -> None:
    if launcher.find_mosquitto() is None:
        pytest.fail("mosquitto is not installed")
    handle = start_embedded_broker(tmp_path)
    try:
        assert (handle.kind, handle.protocol) == ("mosquitto", "mqttv5")
        assert handle.url == f"mqtt://127.0.0.1:{handle.port}"
        roundtrip(handle.url)
    finally:
        handle.stop()


def test_amqtt_fallback_speaks_mqtt_311(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MISTNET_MOSQUITTO", "none")
    handle = start_embedded_broker(tmp_path)
    try:
        assert (handle.kind, handle.protocol) == ("amqtt", "mqttv311")
        assert handle.url == f"mqtt://127.0.0.1:{handle.port}?protocol=3.1.1"
        roundtrip(handle.url, payload=bytes(range(256)) * 4096)  # 1 MiB
        with Probe(handle.url.split("?")[0]) as v5:  # amqtt refuses MQTT 5: Unsupported protocol version
            assert v5.connect() == 0x84
    finally:
        handle.stop()
    assert not handle.running


def test_amqtt_can_be_asked_for(tmp_path: Path) -> None:
    with start_embedded_broker(tmp_path, prefer="amqtt") as handle:
        assert handle.kind == "amqtt"
        roundtrip(handle.url, retain=True)


def test_config_needs_mosquitto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MISTNET_MOSQUITTO", "none")
    with pytest.raises(BrokerError, match="needs mosquitto"):
        start_embedded_broker(tmp_path, config=tmp_path / "x.conf")


def test_amqtt_port_in_use_is_reported(tmp_path: Path) -> None:
    with start_embedded_broker(tmp_path, prefer="amqtt") as first, pytest.raises(BrokerError, match="did not start"):
        start_embedded_broker(tmp_path, prefer="amqtt", port=first.port)


def test_local_mosquitto_persists_retained_messages(tmp_path: Path) -> None:
    if launcher.find_mosquitto() is None:
        pytest.fail("mosquitto is not installed")
    with local_mosquitto(tmp_path, persistence=True).start() as first:
        port = first.port
        with Probe(first.url) as p:
            assert p.connect() == SUCCESS
            assert p.publish("t/kept", b"retained", retain=True) in (SUCCESS, 0x10)  # 0x10: no subscriber
    with local_mosquitto(tmp_path, port=port, persistence=True).start() as second, Probe(second.url) as p:
        assert p.connect() == SUCCESS
        p.subscribe("t/kept")
        got = p.wait_message("t/kept")
        assert got is not None and got.payload == b"retained" and got.retain


def test_mosquitto_fixture(mosquitto) -> None:
    assert mosquitto.running and mosquitto.url.startswith("mqtt://127.0.0.1:")
    roundtrip(mosquitto.url)
