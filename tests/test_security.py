"""Whole MNIST jobs over TLS and over an authenticated broker with ACLs; secrets never leak.

The secured job also runs the S3 transmitter (claim-check) end to end against moto: features go up
as objects, only claims travel over MQTT, and the objects are gone after the job.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from broker.tls import tls_init
from common.jobspec import S3Spec
from common.protocol import FeatureObject, Topics, parse_feature_message
from tests.agents import finish, spool_query, start_cloud, start_edge
from tests.harness import client, mnist_base, moto_s3, retained, single_thread, stop, write_job

pytestmark = [pytest.mark.integration, pytest.mark.security]
__all__ = ["moto_s3", "single_thread"]

NODES = ("edge1", "edge2")


def mistnet_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mistnet.cli", *args], capture_output=True, text=True, timeout=60)


def test_tls_job_and_a_wrong_ca_is_refused_in_one_line(tmp_path, tls_broker, tmp_path_factory):
    base = mnist_base(tmp_path_factory)
    job = write_job(base, tmp_path / "job.yaml", epochs=1)
    ca = ("--ca-file", str(tls_broker.tls.ca_cert))
    cloud = start_cloud(job, tls_broker.url, tmp_path / "cloud", *ca)
    edges = [start_edge(n, tls_broker.url, tmp_path, *ca) for n in NODES]
    try:
        other_ca = tls_init(tmp_path / "other-ca").ca_cert
        refused = {
            "edge": mistnet_cli(
                "edge", "--node", "edge9", "--once", "--broker", tls_broker.url, "--ca-file", str(other_ca)
            ),
            "cloud": mistnet_cli(
                "cloud",
                "--job",
                str(job),
                "--workdir",
                str(tmp_path / "c2"),
                "--broker",
                tls_broker.url,
                "--ca-file",
                str(other_ca),
            ),
        }
        summary = json.loads(finish(cloud, 180))
        assert cloud.returncode == 0, (tmp_path / "cloud-cloud.log").read_text()[-3000:]
        assert all(e.wait(30) == 0 for e in edges)
    finally:
        stop([cloud, *edges])
    assert summary["phase"] == "done" and [e["samples"] for e in summary["edges"].values()] == [1500, 1500]
    assert summary["metrics"]["accuracy"] >= 0.85
    for command, result in refused.items():
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(errors) == 1 and errors[0].startswith(f"mistnet {command}: error: cannot connect to mqtts://")
        assert "certificate verify failed" in errors[0], errors[0]
    print(f"\n[tls] wrong CA: {errors[0]}")


def test_secured_job_with_s3_leaks_no_secret(tmp_path, secured_broker, moto_s3, tmp_path_factory):
    """Per-node credentials files (ACL enforced), S3 keys from the job's Secret (cloud) and the edges'
    own credentials files; then no password or secret key in any log, retained message, checkpoint,
    spool or --json output."""
    base = mnist_base(tmp_path_factory)
    cloud_access, cloud_secret = moto_s3.keys["cloud"]
    s3 = S3Spec(
        bucket_path=f"s3://{moto_s3.bucket}/runs",
        endpoint_url=moto_s3.url,
        access_key=cloud_access,
        secret_key=cloud_secret,
    )
    job = write_job(base, tmp_path / "job.yaml", epochs=1, s3=s3)
    creds = {}
    for n in NODES:  # the broker login from init-auth plus this edge's own S3 keys, mode 0600
        creds[n] = tmp_path / f"{n}.env"
        creds[n].write_text(secured_broker.credentials[n].read_text() + moto_s3.env_lines("edge"))
        creds[n].chmod(0o600)
    cloud_login = {"username": "cloud", "password": secured_broker.passwords["cloud"]}
    sniffed: dict[str, list[bytes]] = {"features": [], "foreign": []}
    sniffer = client(secured_broker.url, **cloud_login)  # the cloud may read every edge's features
    sniffer.on_message = lambda _c, _u, m: sniffed["features"].append(bytes(m.payload))
    sniffer.subscribe("mistnet/v1/node/+/features/#", qos=1)
    nosy = client(secured_broker.url, username="edge1", password=secured_broker.passwords["edge1"])
    nosy.on_message = lambda _c, _u, m: sniffed["foreign"].append(bytes(m.payload))
    nosy.subscribe([("mistnet/v1/node/edge2/#", 1), (Topics.all_features("mnist-demo"), 1)])  # ACL: nothing

    cloud = start_cloud(
        job, secured_broker.url, tmp_path / "cloud", "--credentials", str(secured_broker.credentials["cloud"])
    )
    edges = [start_edge(n, secured_broker.url, tmp_path, "--credentials", str(creds[n])) for n in NODES]
    try:
        out = finish(cloud, 180)
        assert cloud.returncode == 0, (tmp_path / "cloud-cloud.log").read_text()[-3000:]
        assert all(e.wait(30) == 0 for e in edges)
        kept = retained(secured_broker.url, ["mistnet/v1/#"], **cloud_login)
        kept |= retained(
            secured_broker.url, ["mistnet/v1/#"], username="monitor", password=secured_broker.passwords["monitor"]
        )
    finally:
        stop([cloud, *edges])
        for c in (sniffer, nosy):
            c.loop_stop()
            c.disconnect()
    summary = json.loads(out)
    assert summary["phase"] == "done" and [e["samples"] for e in summary["edges"].values()] == [1500, 1500]
    rows = spool_query(tmp_path / "cloud", "SELECT node, COUNT(DISTINCT id), COUNT(*) FROM samples GROUP BY node")
    assert rows == [("edge1", 1500, 1500), ("edge2", 1500, 1500)]
    # before training, the cloud listed the edges' objects as the job's feature store (other nodes' ranks read it)
    index = spool_query(tmp_path / "cloud", "SELECT value FROM meta WHERE key='feature_store'")
    assert index == [(f"s3://{moto_s3.bucket}/runs/mnist-demo/features-index.json",)]
    # claim-check: only FeatureObject claims went over MQTT, the objects are deleted after the job
    claims = [parse_feature_message(p) for p in sniffed["features"]]
    assert claims and all(isinstance(c, FeatureObject) for c in claims)
    assert {c.transfer for c in claims if c.node == "edge1"} == set(range(24))
    assert moto_s3.keys_under("runs/") == {}
    assert sniffed["foreign"] == [], "the ACL let edge1 read edge2's topics"
    assert Topics.job_status("mnist-demo") in kept and Topics.node_status("edge1") in kept

    secrets = {f"{name} password": pw for name, pw in secured_broker.passwords.items()}
    secrets |= {"cloud S3 secret key": cloud_secret, "edge S3 secret key": moto_s3.keys["edge"][1]}
    haystacks = {
        str(p.relative_to(tmp_path)): p.read_bytes()
        for p in tmp_path.rglob("*")
        if p.is_file() and p.suffix in (".log", ".safetensors", ".sqlite", ".sqlite-wal", ".json", ".png", ".db", "")
    }
    haystacks |= {f"retained {topic}": payload for topic, payload in kept.items()}
    haystacks["--json output"] = out
    haystacks["mosquitto log"] = secured_broker.mosquitto.log_text().encode()
    assert any("cloud-cloud.log" in k for k in haystacks) and any(k.endswith(".safetensors") for k in haystacks)
    leaks = [
        (what, where)
        for what, secret in secrets.items()
        for where, text in haystacks.items()
        if secret.encode() in text
    ]
    assert leaks == []
    assert cloud_secret.encode() in job.read_bytes()  # the search does find a secret where one is (the input)
    print(
        f"\n[secrets] {len(secrets)} secrets searched in {len(haystacks)} logs/files/messages: none found; "
        f"{len(claims)} S3 claims over MQTT, objects deleted"
    )
