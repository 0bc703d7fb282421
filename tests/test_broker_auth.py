"""Authentication and ACL of `mistnet broker init-auth` output, enforced by a real mosquitto."""

from __future__ import annotations

import base64
import shutil
import stat
from pathlib import Path

import pytest

from broker.auth import acl_rules, hash_password, init_auth, render_acl, verify_password
from broker.launcher import BrokerError, free_port, mosquitto_from_config
from broker.probe import NOT_AUTHORIZED, SUCCESS, Probe
from common.protocol import Topics
from common.transport import read_env_file

pytestmark = [pytest.mark.security]

NO_SUBSCRIBERS = 0x10
OK = (SUCCESS, NO_SUBSCRIBERS)


def login(broker, name: str, **kw) -> Probe:
    env = read_env_file(broker.credentials[name])
    assert env["MISTNET_BROKER"] == broker.url
    probe = Probe(broker.url, env["MISTNET_USERNAME"], env["MISTNET_PASSWORD"], **kw)
    assert probe.connect() == SUCCESS
    return probe


# ---- files ------------------------------------------------------------------------------------------


def test_init_auth_files(tmp_path: Path) -> None:
    b = init_auth(tmp_path / "a", ["edge1", "edge2"], cloud="cloud", monitor="mon", port=1999, host="broker.lan")
    assert set(b.roles) == {"cloud", "mon", "edge1", "edge2"}
    for name, path in b.credentials.items():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        env = read_env_file(path)
        assert env == {"MISTNET_USERNAME": name, "MISTNET_PASSWORD": b.passwords[name],
                       "MISTNET_BROKER": "mqtt://broker.lan:1999"}
        assert len(b.passwords[name]) >= 32
    assert stat.S_IMODE((tmp_path / "a" / "credentials").stat().st_mode) == 0o700
    passwd = b.passwd.read_text()
    assert not any(p in passwd for p in b.passwords.values())
    for line in passwd.splitlines():
        user, encoded = line.split(":", 1)
        assert encoded.startswith("$7$") and verify_password(encoded, b.passwords[user])
    assert not stat.S_IMODE(b.passwd.stat().st_mode) & 0o007
    conf = b.config.read_text()
    for needle in ("allow_anonymous false", f"password_file {b.passwd}", f"acl_file {b.acl}",
                   "persistence true", "listener 1999"):
        assert needle in conf
    assert "password" not in repr(b).lower().replace("passwd", "")


def test_init_auth_refuses_overwrite_without_force(tmp_path: Path) -> None:
    first = init_auth(tmp_path, ["edge1"])
    with pytest.raises(BrokerError, match=r"already exists.*--force"):
        init_auth(tmp_path, ["edge1"])
    assert read_env_file(first.credentials["edge1"])["MISTNET_PASSWORD"] == first.passwords["edge1"]
    second = init_auth(tmp_path, ["edge1"], force=True)
    assert second.passwords["edge1"] != first.passwords["edge1"]
    assert read_env_file(second.credentials["edge1"])["MISTNET_PASSWORD"] == second.passwords["edge1"]


@pytest.mark.parametrize(
    ("nodes", "cloud", "match"),
    [
        (["edge/1"], "cloud", "not a valid name"),
        (["edge+"], "cloud", "not a valid name"),
        (["#"], "cloud", "not a valid name"),
        ([], "cloud", "at least one"),
        (["edge1", "edge1"], "cloud", "repeated: edge1"),
        (["cloud"], "cloud", "repeated: cloud"),
        (["a:b"], "cloud", "not a valid name"),
    ],
)
def test_init_auth_rejects_bad_names(tmp_path: Path, nodes: list[str], cloud: str, match: str) -> None:
    with pytest.raises(BrokerError, match=match):
        init_auth(tmp_path, nodes, cloud=cloud)
    assert not (tmp_path / "passwd").exists()


def test_acl_follows_topic_tree() -> None:
    edge = dict((t, a) for a, t in acl_rules("edge", "edge1"))
    assert edge == {
        "mistnet/v1/node/edge1/features/#": "write",
        "mistnet/v1/node/edge1/status": "write",
        "mistnet/v1/node/edge1/jobs/#": "read",
        "mistnet/v1/node/edge1/head/#": "read",
        "mistnet/v1/node/edge1/ack/#": "read",
    }
    text = render_acl("cloud", "monitor", ["edge1"])
    assert text.splitlines()[0].startswith("#")
    first_rule = next(line for line in text.splitlines() if line and not line.startswith("#"))
    assert first_rule == "user cloud"  # nothing granted to anonymous clients
    assert all(t.startswith(Topics.root + "/") for _, t in acl_rules("cloud", "cloud") + acl_rules("monitor", "m"))


def test_acl_example_matches_generated() -> None:
    example = Path(__file__).parents[1] / "broker" / "conf" / "acl.example"

    def rules(text: str) -> list[str]:
        return [" ".join(line.split()) for line in text.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]

    assert rules(example.read_text()) == rules(render_acl("cloud", "monitor", ["edge1", "edge2"]))


def test_python_hash_matches_mosquitto_format() -> None:
    salt = bytes(range(12))
    encoded = hash_password("pw1", salt)
    assert encoded.startswith("$7$101$AAECAwQFBgcICQoL$") and verify_password(encoded, "pw1")
    assert not verify_password(encoded, "pw2")
    # a line written by mosquitto_passwd 2.0.11 for u1:pw1
    tool = ("$7$101$UxD+tAMy/KQVrvHL$"
            "XMUa71uTUuUKE69PW+2/xkI9uwUvVJoSokjNQ8kpIofMOkN2wXvqrpHVFTQoWXfoV7mM0NxUuR1+gBfvEAHMPA==")
    assert verify_password(tool, "pw1")
    assert hash_password("pw1", base64.b64decode("UxD+tAMy/KQVrvHL")) == tool


# ---- enforced by mosquitto --------------------------------------------------------------------------


@pytest.mark.integration
def test_anonymous_refused(secured_broker) -> None:
    with Probe(secured_broker.url) as anonymous:
        assert anonymous.connect() == NOT_AUTHORIZED


@pytest.mark.integration
def test_wrong_password_and_unknown_user_refused(secured_broker) -> None:
    for user, password in [("edge1", "wrong"), ("edge1", secured_broker.passwords["edge2"]), ("nobody", "x"),
                           ("edge1", "")]:
        with Probe(secured_broker.url, user, password) as p:
            assert p.connect() != SUCCESS, user


@pytest.mark.integration
@pytest.mark.parametrize("hasher", ["python", "mosquitto_passwd"])
def test_both_hashers_accepted_by_mosquitto(tmp_path: Path, hasher: str) -> None:
    if hasher == "mosquitto_passwd" and not shutil.which("mosquitto_passwd"):
        pytest.fail("mosquitto_passwd is not installed")
    bundle = init_auth(tmp_path / "a", ["edge1"], hasher=hasher)  # type: ignore[arg-type]
    assert bundle.hasher == hasher
    with mosquitto_from_config(bundle.config, port=free_port(), workdir=tmp_path / "run").start() as m:
        with Probe(m.url, "edge1", bundle.passwords["edge1"]) as ok:
            assert ok.connect() == SUCCESS
        with Probe(m.url, "edge1", bundle.passwords["cloud"]) as bad:
            assert bad.connect() != SUCCESS


@pytest.mark.integration
def test_edge_features_reach_cloud(secured_broker) -> None:
    with login(secured_broker, "cloud") as cloud, login(secured_broker, "edge1") as edge1:
        assert cloud.subscribe(Topics.all_features("j1")) < 0x80
        assert cloud.subscribe(Topics.all_node_status()) < 0x80
        assert edge1.publish(Topics.features("edge1", "j1"), b"chunk") == SUCCESS
        assert edge1.publish(Topics.node_status("edge1"), b"{}", retain=True) == SUCCESS
        got = cloud.wait_message(Topics.features("edge1", "j1"))
        assert got is not None and got.payload == b"chunk"
        assert cloud.wait_message(Topics.node_status("edge1")) is not None


@pytest.mark.integration
def test_edge_receives_its_jobs_heads_and_acks(secured_broker) -> None:
    with login(secured_broker, "cloud") as cloud:
        assert cloud.publish(Topics.job_assignment("edge1", "j1"), b"job", retain=True) in OK
        assert cloud.publish(Topics.head_chunk("edge1", "j1", 0), b"head", retain=True) in OK
        with login(secured_broker, "edge1") as edge1:
            for sub in (Topics.node_jobs("edge1"), Topics.node_heads("edge1"), Topics.node_acks("edge1")):
                assert edge1.subscribe(sub) < 0x80
            assert cloud.publish(Topics.ack("edge1", "j1"), b"ack") == SUCCESS
            for topic, payload in [(Topics.job_assignment("edge1", "j1"), b"job"),
                                   (Topics.head_chunk("edge1", "j1", 0), b"head"), (Topics.ack("edge1", "j1"), b"ack")]:
                got = edge1.wait_message(topic)
                assert got is not None and got.payload == payload, topic


@pytest.mark.integration
def test_edge_cannot_read_other_edges_or_cloud_only_topics(secured_broker) -> None:
    with login(secured_broker, "cloud") as cloud, login(secured_broker, "edge1") as edge1, \
            login(secured_broker, "edge2") as edge2:
        assert cloud.subscribe(Topics.all_features("j1")) < 0x80
        # mosquitto 2.0 grants these SUBACKs but checks read access on every delivery (2.1 may refuse)
        for sub in (Topics.features("edge2", "+"), Topics.all_features("+"), "mistnet/v1/#", "#",
                    Topics.node_status("edge2"), Topics.node_jobs("edge2"), Topics.all_job_status()):
            edge1.subscribe(sub)
        assert edge2.publish(Topics.features("edge2", "j1"), b"secret") == SUCCESS
        assert edge2.publish(Topics.node_status("edge2"), b"{}") == SUCCESS
        assert cloud.wait_message(Topics.features("edge2", "j1")) is not None
        assert cloud.publish(Topics.job_assignment("edge2", "j1"), b"job2") in OK
        assert cloud.publish(Topics.job_status("j1"), b"status") in OK
        # marker: published by the cloud after the above reached the broker; edge1 may read it
        assert cloud.publish(Topics.ack("edge1", "j1"), b"marker") == SUCCESS
        assert edge1.wait_message(Topics.ack("edge1", "j1")) is not None
        assert edge1.topics() == {Topics.ack("edge1", "j1")}


@pytest.mark.integration
@pytest.mark.parametrize(
    "topic",
    [
        Topics.job_assignment("edge1", "j1"),
        Topics.job_assignment("edge2", "j1"),
        Topics.head_chunk("edge1", "j1", 0),
        Topics.ack("edge1", "j1"),
        Topics.job_status("j1"),
        Topics.checkpoint("j1"),
        Topics.features("edge2", "j1"),
        Topics.node_status("edge2"),
        "mistnet/v1/other",
        "elsewhere/topic",
    ],
)
def test_edge_cannot_publish_outside_its_topics(secured_broker, topic: str) -> None:
    with login(secured_broker, "cloud") as cloud, login(secured_broker, "edge1") as edge1:
        assert cloud.subscribe("mistnet/v1/#") < 0x80
        assert edge1.publish(topic, b"forged", retain=True) == NOT_AUTHORIZED
        # edge1's own status, published after the forgery, is the marker: in-order per publisher
        assert edge1.publish(Topics.node_status("edge1"), b"marker", retain=True) == SUCCESS
        assert cloud.wait_message(Topics.node_status("edge1")) is not None
        assert cloud.topics() == {Topics.node_status("edge1")}
    with login(secured_broker, "cloud") as late:  # nothing retained either
        late.subscribe(topic)
        late.subscribe(Topics.node_status("edge1"))
        assert late.wait_message(Topics.node_status("edge1")) is not None
        assert late.wait_message(topic, timeout_s=0.05) is None


@pytest.mark.integration
def test_edge_last_will_only_on_own_status(secured_broker) -> None:
    with login(secured_broker, "cloud") as cloud:
        assert cloud.subscribe(Topics.all_node_status()) < 0x80
        forged = login(secured_broker, "edge2", will=(Topics.node_status("edge1"), b"forged-offline"))
        forged.drop()
        honest = login(secured_broker, "edge1", will=(Topics.node_status("edge1"), b"offline"))
        honest.drop()
        got = cloud.wait_message(Topics.node_status("edge1"))
        assert got is not None and got.payload == b"offline"
        assert [m.payload for m in cloud.drain()] == [b"offline"]


@pytest.mark.integration
def test_cloud_publishes_all_it_owns(secured_broker) -> None:
    with login(secured_broker, "cloud") as cloud:
        for topic in (Topics.job_assignment("edge2", "j1"), Topics.head_chunk("edge2", "j1", 3),
                      Topics.ack("edge2", "j1"), Topics.job_status("j1"), Topics.checkpoint("j1")):
            assert cloud.publish(topic, b"x") in OK, topic
        assert cloud.publish(Topics.features("edge1", "j1"), b"x") == NOT_AUTHORIZED
        assert cloud.publish(Topics.node_status("edge1"), b"x") == NOT_AUTHORIZED


@pytest.mark.integration
def test_monitor_reads_status_and_checkpoints_only(secured_broker) -> None:
    with login(secured_broker, "monitor") as monitor, login(secured_broker, "cloud") as cloud, \
            login(secured_broker, "edge1") as edge1:
        monitor.subscribe("mistnet/v1/#")
        assert edge1.publish(Topics.features("edge1", "j1"), b"features") in OK
        assert edge1.publish(Topics.node_status("edge1"), b"status") == SUCCESS
        for topic in (Topics.job_assignment("edge1", "j1"), Topics.head_chunk("edge1", "j1", 0),
                      Topics.ack("edge1", "j1"), Topics.job_status("j1"), Topics.checkpoint("j1")):
            assert cloud.publish(topic, b"x") in OK
        assert monitor.wait_message(Topics.node_status("edge1")) is not None
        assert monitor.wait_message(Topics.checkpoint("j1")) is not None
        assert monitor.topics() == {Topics.node_status("edge1"), Topics.job_status("j1"), Topics.checkpoint("j1")}
        for topic in (Topics.node_status("edge1"), Topics.job_status("j1"), Topics.checkpoint("j1")):
            assert monitor.publish(topic, b"forged") == NOT_AUTHORIZED


@pytest.mark.integration
def test_credentials_file_feeds_transport_options(secured_broker) -> None:
    """The lead's transport reads the same files: options from --credentials FILE."""
    from common.transport import broker_options

    opts = broker_options(None, credentials=secured_broker.credentials["edge1"])
    assert opts.username == "edge1" and opts.url == secured_broker.url
    password = secured_broker.passwords["edge1"]
    assert opts.password == password and password not in repr(opts)
