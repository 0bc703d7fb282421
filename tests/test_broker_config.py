"""The shipped mosquitto configs start on a real mosquitto and enforce the sizes the protocol needs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from broker.auth import MAX_PACKET_BYTES, init_auth
from broker.launcher import BrokerError, free_port, mosquitto_from_config, parse_listeners, rewrite_config
from broker.probe import NOT_AUTHORIZED, SUCCESS, Probe
from broker.tls import tls_init
from common import constants as C
from common.protocol import Chunk, Topics, decode_chunk, encode_chunk

CONF = Path(__file__).parents[1] / "broker" / "conf"


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            found.setdefault(words[0], []).append(" ".join(words[1:]))
    return found


def test_production_config_values() -> None:
    d = directives((CONF / "mosquitto.conf").read_text())
    assert d["listener"] == ["1883"]
    assert d["allow_anonymous"] == ["false"]
    assert d["persistence"] == ["true"] and d["persistence_location"][0].endswith("/")
    assert "password_file" in d and "acl_file" in d
    assert int(d["max_packet_size"][0]) == MAX_PACKET_BYTES
    assert int(d["message_size_limit"][0]) >= MAX_PACKET_BYTES  # the packet limit must be the one that bites
    assert int(d["max_queued_messages"][0]) >= 10000
    assert int(d["max_inflight_messages"][0]) >= 20
    # the largest chunk with its envelope, topic and v5 properties fits
    assert MAX_PACKET_BYTES >= C.MAX_CHUNK_BYTES + C.ENVELOPE_OVERHEAD_BYTES + 4096
    tls = directives((CONF / "mosquitto-tls.conf").read_text())
    assert tls["listener"] == ["8883"] and {"cafile", "certfile", "keyfile", "require_certificate"} <= set(tls)


def test_rewrite_config() -> None:
    text = "listener 1883\nlistener 8883 0.0.0.0\ncertfile /etc/x.crt\npassword_file /etc/p\n# password_file old\n"
    assert [(lst.port, lst.bind, lst.tls) for lst in parse_listeners(text)] == [(1883, None, False),
                                                                                 (8883, "0.0.0.0", True)]
    out = rewrite_config(text, port=2000, port_map={8883: 2001}, settings={"password_file": "/tmp/p",
                                                                        "acl_file": "/tmp/a"})
    assert directives(out)["listener"] == ["2000", "2001 0.0.0.0"]
    assert directives(out)["password_file"] == ["/tmp/p"] and directives(out)["acl_file"] == ["/tmp/a"]
    assert "# password_file old" in out
    with pytest.raises(BrokerError, match="no TCP listener"):
        rewrite_config("allow_anonymous true\n", port=1)


def _production(tmp_path: Path, extra: str = "", port_map: dict[int, int] | None = None,
                settings: dict[str, str] | None = None):
    auth = init_auth(tmp_path / "auth", ["edge1", "edge2"])
    config = tmp_path / "mosquitto.conf"
    config.write_text((CONF / "mosquitto.conf").read_text() + extra)
    (tmp_path / "data").mkdir()
    broker = mosquitto_from_config(
        config,
        port=free_port(),
        port_map=port_map,
        settings={"password_file": str(auth.passwd), "acl_file": str(auth.acl),
                  "persistence_location": f"{tmp_path / 'data'}/", **(settings or {})},
        workdir=tmp_path / "run",
    )
    return auth, broker


@pytest.mark.integration
@pytest.mark.security
def test_production_config_starts_and_enforces_limits(tmp_path: Path) -> None:
    auth, broker = _production(tmp_path)
    with broker.start():
        with Probe(broker.url) as anonymous:
            assert anonymous.connect() == NOT_AUTHORIZED
        with Probe(broker.url, "cloud", auth.passwords["cloud"]) as cloud, \
                Probe(broker.url, "edge1", auth.passwords["edge1"]) as edge1:
            assert cloud.connect() == SUCCESS and edge1.connect() == SUCCESS
            assert edge1.connack_properties is not None
            assert getattr(edge1.connack_properties, "MaximumPacketSize", None) == MAX_PACKET_BYTES
            assert cloud.subscribe(Topics.all_features("j1")) == 1
            # the largest chunk the protocol allows goes through
            payload = bytes(C.MAX_CHUNK_BYTES)
            digest = hashlib.sha256(payload).digest()
            chunk = Chunk(job="j1", node="edge1", transfer=0, seq=0, total=1, size=len(payload),
                          sha256=digest, transfer_sha256=digest, payload=payload)
            assert edge1.publish(Topics.features("edge1", "j1"), encode_chunk(chunk)) == SUCCESS
            got = cloud.wait_message(Topics.features("edge1", "j1"))
            assert got is not None and decode_chunk(got.payload).payload == payload
            # a packet over the limit is refused loudly: the client is disconnected, with 0x95 (packet too
            # large) when paho reads mosquitto's DISCONNECT before the socket closes, 0x80 when the close wins
            edge1.client.publish(Topics.features("edge1", "j1"), bytes(MAX_PACKET_BYTES + 1), qos=1)
            assert edge1.disconnected.wait(3)
            assert edge1.disconnect_reason in (0x95, 0x80)
        assert "Config loaded" in broker.log_text() or "running" in broker.log_text()


@pytest.mark.integration
@pytest.mark.security
def test_production_and_tls_example_start_together(tmp_path: Path) -> None:
    tls = tls_init(tmp_path / "tls")
    secure = free_port()
    auth, broker = _production(
        tmp_path,
        extra="\n" + (CONF / "mosquitto-tls.conf").read_text(),
        port_map={8883: secure},
        settings={"cafile": str(tls.ca_cert), "certfile": str(tls.server_cert), "keyfile": str(tls.server_key)},
    )
    with broker.start():
        with Probe(f"mqtts://127.0.0.1:{secure}", "edge1", auth.passwords["edge1"], ca_file=str(tls.ca_cert)) as p:
            assert p.connect() == SUCCESS
        with Probe(f"mqtts://localhost:{secure}", ca_file=str(tls.ca_cert)) as anonymous:
            assert anonymous.connect() == NOT_AUTHORIZED


@pytest.mark.integration
def test_bad_config_is_reported_at_once(tmp_path: Path) -> None:
    config = tmp_path / "bad.conf"
    config.write_text(f"listener {free_port()} 127.0.0.1\nno_such_option 1\n")
    broker = mosquitto_from_config(config, workdir=tmp_path)
    with pytest.raises(BrokerError, match="no_such_option"):
        broker.start(timeout_s=5)
    assert not broker.running
