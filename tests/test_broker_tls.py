"""`mistnet broker tls-init` output served by a real mosquitto: right CA accepted, wrong CA refused."""

from __future__ import annotations

import contextlib
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from broker.auth import TlsFiles, init_auth
from broker.launcher import BrokerError, free_port, mosquitto_from_config
from broker.probe import SUCCESS, Probe
from broker.tls import tls_init
from common.transport import read_env_file
from tests.conftest import start_tls_mosquitto

pytestmark = [pytest.mark.security]


def test_tls_init_files(tmp_path: Path) -> None:
    b = tls_init(tmp_path, hosts=["broker.lan", "10.0.0.5"], clients=["edge1", "cloud"], port=8884)
    for key in (b.ca_key, b.server_key, *(k for _, k in b.clients.values())):
        assert not stat.S_IMODE(key.stat().st_mode) & 0o077 & ~0o040, key
    server = x509.load_pem_x509_certificate(b.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.lan"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    edge = x509.load_pem_x509_certificate(b.clients["edge1"][0].read_bytes())
    assert edge.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "edge1"
    assert read_env_file(b.env_files["edge1"]) == {"MISTNET_BROKER": "mqtts://broker.lan:8884",
                                                  "MISTNET_CA_FILE": str(b.ca_cert)}
    conf = b.conf.read_text()
    assert "listener 8884" in conf and f"cafile {b.ca_cert}" in conf and "require_certificate false" in conf
    with pytest.raises(BrokerError, match="already exists"):
        tls_init(tmp_path)
    tls_init(tmp_path, force=True)


def test_tls_init_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="at least one host"):
        tls_init(tmp_path, hosts=[" "])
    with pytest.raises(BrokerError, match="not a valid name"):
        tls_init(tmp_path, clients=["../x"])
    with pytest.raises(BrokerError, match="overwrite the ca"):
        tls_init(tmp_path, clients=["ca"])


@pytest.mark.integration
def test_tls_accepts_right_ca(tls_broker) -> None:
    assert tls_broker.url.startswith("mqtts://127.0.0.1:")
    with Probe(tls_broker.url, ca_file=str(tls_broker.tls.ca_cert)) as p:
        assert p.connect() == SUCCESS
        assert p.subscribe("t/x") == 1
        assert p.publish("t/x", b"over tls") == SUCCESS
        got = p.wait_message("t/x")
        assert got is not None and got.payload == b"over tls"
    localhost = tls_broker.url.replace("127.0.0.1", "localhost")
    with Probe(localhost, ca_file=str(tls_broker.tls.ca_cert)) as p:
        assert p.connect() == SUCCESS


@pytest.mark.integration
def test_tls_refuses_wrong_ca(tls_broker, tmp_path: Path) -> None:
    other = tls_init(tmp_path / "other")
    with Probe(tls_broker.url, ca_file=str(other.ca_cert)) as p, \
            pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        p.connect()
    # and the system trust store does not know the throwaway CA either
    with Probe(tls_broker.url) as p, pytest.raises(ssl.SSLCertVerificationError):
        p.connect()


@pytest.mark.integration
def test_tls_refuses_wrong_host_name(tmp_path: Path) -> None:
    bundle = tls_init(tmp_path / "tls", hosts=["broker.example.org"])
    with start_tls_mosquitto(bundle, tmp_path / "run") as m, \
            Probe(m.url, ca_file=str(bundle.ca_cert)) as p, \
            pytest.raises(ssl.SSLCertVerificationError, match=r"IP address mismatch|hostname"):
        p.connect()


@pytest.mark.integration
def test_mutual_tls_requires_client_certificate(tmp_path: Path) -> None:
    bundle = tls_init(tmp_path / "tls", clients=["edge1"], require_certificate=True)
    assert "require_certificate true" in bundle.conf.read_text()
    assert read_env_file(bundle.env_files["edge1"])["MISTNET_CERT_FILE"] == str(bundle.clients["edge1"][0])
    cert, key = (str(p) for p in bundle.clients["edge1"])
    with start_tls_mosquitto(bundle, tmp_path / "run") as m:
        with Probe(m.url, ca_file=str(bundle.ca_cert), cert_file=cert, key_file=key) as p:
            assert p.connect() == SUCCESS
        # TLS 1.3 reports the missing certificate after the handshake: the broker drops the
        # connection instead of sending a CONNACK (TLS 1.2 fails in the handshake itself)
        with Probe(m.url, ca_file=str(bundle.ca_cert)) as p, contextlib.suppress(ssl.SSLError):
            assert p.connect() != SUCCESS


@pytest.mark.integration
def test_init_auth_with_tls_listener(tmp_path: Path) -> None:
    tls = tls_init(tmp_path / "tls")
    plain, secure = free_port(), free_port()
    bundle = init_auth(tmp_path / "auth", ["edge1"], port=plain,
                       tls=TlsFiles.from_dir(tls.out, port=secure))
    env = read_env_file(bundle.credentials["edge1"])
    assert env["MISTNET_BROKER"] == f"mqtts://127.0.0.1:{secure}"
    assert env["MISTNET_CA_FILE"] == str(tls.ca_cert)
    with mosquitto_from_config(bundle.config, workdir=tmp_path / "run").start() as m:
        with Probe(env["MISTNET_BROKER"], env["MISTNET_USERNAME"], env["MISTNET_PASSWORD"],
                   ca_file=env["MISTNET_CA_FILE"]) as p:
            assert p.connect() == SUCCESS
            assert p.publish("mistnet/v1/node/edge1/status", b"{}") in (0, 0x10)
            assert p.publish("mistnet/v1/job/j/status", b"{}") == 0x87
        with Probe(env["MISTNET_BROKER"], ca_file=env["MISTNET_CA_FILE"]) as anonymous:
            assert anonymous.connect() != SUCCESS
        with Probe(m.url, "edge1", env["MISTNET_PASSWORD"]) as p:  # plain listener, same accounts
            assert p.connect() == SUCCESS


def test_tls_files_from_dir_reports_missing(tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match=r"ca\.crt is missing"):
        TlsFiles.from_dir(tmp_path)
