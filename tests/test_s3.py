"""The S3 transmitter (claim-check) against moto's S3 server over real HTTP, IAM signatures enforced.

The happy path of a whole job (objects up, claims over MQTT, objects deleted) runs in
``test_security.py`` together with broker credentials and the search for leaked secrets.
"""

from __future__ import annotations

import json
import os
from itertools import pairwise

import pytest
from botocore.exceptions import NoCredentialsError

from common.errors import ProtocolError, TransportError
from common.jobspec import S3Spec
from common.storage import ObjectStore, S3Options, describe_s3_error
from tests.agents import finish, spool_query, start_cloud, start_edge
from tests.harness import client, job_status, mnist_base, moto_s3, single_thread, stop, write_job

pytestmark = pytest.mark.security
__all__ = ["moto_s3", "single_thread"]


def store(s3, user="edge", **changes) -> ObjectStore:
    access, secret = s3.keys[user]
    options = S3Options(endpoint_url=s3.url, access_key=access, secret_key=secret)
    return ObjectStore(s3.bucket, S3Options(**{**options.__dict__, **changes}), attempts=1)


def test_object_store_multipart_limits_and_errors(moto_s3):
    edge = store(moto_s3)
    blob = os.urandom(11 * 1024 * 1024 + 5)
    edge.put("runs/j/e/000000.msgpack", blob, multipart_bytes=5 * 1024 * 1024)
    head = moto_s3.client().head_object(Bucket=moto_s3.bucket, Key="runs/j/e/000000.msgpack")
    assert head["ETag"].strip('"').endswith("-3")  # three parts: a multipart upload
    assert store(moto_s3, "cloud").get("runs/j/e/000000.msgpack", len(blob)) == blob
    with pytest.raises(ProtocolError, match="the claim says"):
        store(moto_s3, "cloud").get("runs/j/e/000000.msgpack", len(blob) - 1)
    with pytest.raises(ProtocolError, match="does not exist"):
        store(moto_s3, "cloud").get("runs/j/e/nothing", 10)
    edge.put("runs/j/e/000001.msgpack", b"small")
    assert store(moto_s3, "cloud").delete_prefix("runs/j/") == 2
    assert moto_s3.keys_under() == {}

    wrong_secret = store(moto_s3, secret_key="not-the-secret-key")
    with pytest.raises(TransportError, match="SignatureDoesNotMatch") as refused:
        wrong_secret.put("runs/x", b"data")
    assert "not-the-secret-key" not in str(refused.value)
    with pytest.raises(TransportError, match="InvalidAccessKeyId"):
        store(moto_s3, access_key="AKIAUNKNOWN0000000").put("runs/x", b"data")
    with pytest.raises(TransportError, match="unreachable"):
        store(moto_s3, endpoint_url="http://127.0.0.1:9").put("runs/x", b"data")
    assert "no S3 credentials" in describe_s3_error(NoCredentialsError())


def test_cloud_cleans_up_objects_only_when_asked(tmp_path, moto_s3):
    from cloud_agent.agent import CloudAgent
    from common.jobspec import build_job
    from common.transport import BrokerOptions

    access, secret = moto_s3.keys["cloud"]
    for cleanup in (False, True):
        spec = build_job(
            {
                "name": "j",
                "model": {"arch": "lenet5", "num_classes": 10},
                "cut_layer": 2,
                "edges": [{"node": "e", "dataset": "x"}],
                "transmitter": {
                    "s3": {
                        "bucket_path": f"s3://{moto_s3.bucket}/runs",
                        "endpoint_url": moto_s3.url,
                        "access_key": access,
                        "secret_key": secret,
                        "cleanup": cleanup,
                    }
                },
            }
        )
        agent = CloudAgent(spec, BrokerOptions(), tmp_path / str(cleanup))
        assignment = agent.offer.assignment("e", b"head")
        assert assignment.store is not None and assignment.store.bucket == moto_s3.bucket
        assert secret not in assignment.model_dump_json() and access not in assignment.model_dump_json()
        store(moto_s3).put("runs/j/e/000000-x.msgpack", b"x")
        agent.finish.clean_up_objects()
        assert bool(moto_s3.keys_under("runs/j/")) is not cleanup
        agent.job.spool.close()


@pytest.mark.integration
@pytest.mark.fault
def test_unreachable_store_or_wrong_keys_are_reported_retried_and_never_bypassed(
    tmp_path, mosquitto, moto_s3, tmp_path_factory
):
    """edge1 signs with a wrong secret key, edge2 is pointed at a dead endpoint: each keeps retrying
    with backoff and says why in its status; nothing travels over MQTT instead; the job fails at the
    timeout (on_timeout: fail) naming both edges and their errors."""
    base = mnist_base(tmp_path_factory)
    access, secret = moto_s3.keys["cloud"]
    s3 = S3Spec(
        bucket_path=f"s3://{moto_s3.bucket}/runs", endpoint_url=moto_s3.url, access_key=access, secret_key=secret
    )
    job = write_job(base, tmp_path / "job.yaml", s3=s3, timeout_s=12, on_timeout="fail")
    edge_access = moto_s3.keys["edge"][0]
    (tmp_path / "edge1.env").write_text(f"MISTNET_S3_ACCESS_KEY={edge_access}\nMISTNET_S3_SECRET_KEY=wrong-secret\n")
    (tmp_path / "edge2.env").write_text(moto_s3.env_lines("edge") + "MISTNET_S3_ENDPOINT=http://127.0.0.1:9\n")
    features: list[bytes] = []
    sniffer = client(mosquitto.url)
    sniffer.on_message = lambda _c, _u, m: features.append(bytes(m.payload))
    sniffer.subscribe("mistnet/v1/node/+/features/#", qos=1)
    cloud = start_cloud(job, mosquitto.url, tmp_path / "cloud")
    edges = [
        start_edge(n, mosquitto.url, tmp_path, "--credentials", str(tmp_path / f"{n}.env")) for n in ("edge1", "edge2")
    ]
    try:
        summary = json.loads(finish(cloud, 90))
        status = job_status(mosquitto.url, "mnist-demo")
        assert all(e.wait(30) == 0 for e in edges)
    finally:
        stop([cloud, *edges])
        sniffer.loop_stop()
        sniffer.disconnect()
    assert cloud.returncode == 1 and summary["phase"] == "failed"
    reasons = {n: e["missing_reason"] for n, e in summary["edges"].items()}
    assert "SignatureDoesNotMatch" in reasons["edge1"], reasons
    assert "S3 endpoint unreachable" in reasons["edge2"], reasons
    assert status["phase"] == "failed" and status["edges"]["edge1"]["missing_reason"] == reasons["edge1"]
    assert features == [], "features went over MQTT although the job uses S3"
    assert spool_query(tmp_path / "cloud", "SELECT COUNT(*) FROM chunks")[0][0] == 0
    for n in ("edge1", "edge2"):
        log = (tmp_path / f"{n}.log").read_text()
        delays = [
            int(line.rsplit("retrying in ", 1)[1].split()[0]) for line in log.splitlines() if "retrying in" in line
        ]
        assert len(delays) >= 2 and all(b == 2 * a for a, b in pairwise(delays)), delays
        assert "wrong-secret" not in log
        assert "job withdrawn" in log or "cancelled" in log  # the edge stopped when the cloud gave up
    print(f"\n[s3] failed job as reported: {summary['message']!r}")
