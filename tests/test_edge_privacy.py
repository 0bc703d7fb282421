"""The edge owns its privacy, over a real mosquitto with real agent processes.

- An edge's policy refuses a job before reading an image; the cloud reports why.
- Assignments with NaN or Infinity are refused.
- The bits the broker delivers are randomized at the rate the job's ε asks (captured from the broker
  and compared with clean bits computed here), and equal the clean bits at ε = 100.
- No file name of the edge's dataset is in any byte the broker delivered.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.checkpoint import load_model, read_tensors
from common.datasets.mnist import MnistShard
from common.jobspec import CloudSpec, CollectSpec, EdgeSpec, JobSpec, ModelSpec
from common.privacy import BitEncoder, keep_probability, quantize
from common.protocol import (
    HeadManifest,
    JobAssignment,
    ModelRef,
    PrivacyParams,
    Topics,
    decode_batch,
    join_transfer,
    parse_feature_message,
    to_json,
)
from edge_agent.torch_head import TorchExtractor as Extractor
from mistnet.demo import write_job as write_spec
from tests.agents import finish, mistnet, start_cloud, start_edge, wait_for, without
from tests.harness import client, job_status, mnist_base, node_status, stop, write_job

pytestmark = [pytest.mark.integration, pytest.mark.security]

LENET_ACTIVATIONS = 6 * 14 * 14  # LeNet-5 cut at layer 2: one [6, 14, 14] head output per sample


@contextmanager
def sniffer(url: str) -> Iterator[list[tuple[str, bytes]]]:
    """Every message the broker delivers under the protocol's root, as any subscriber gets it."""
    got: list[tuple[str, bytes]] = []
    lock = threading.Lock()

    def on_message(_c: object, _u: object, m: object) -> None:
        with lock:
            got.append((m.topic, bytes(m.payload)))  # type: ignore[attr-defined]

    c = client(url, inflight=100)
    c.on_message = on_message
    c.subscribe(f"{Topics.root}/#", qos=1)
    time.sleep(0.3)
    try:
        yield got
    finally:
        time.sleep(0.5)
        c.loop_stop()
        c.disconnect()


def delivered_batches(messages: list[tuple[str, bytes]], node: str, job: str) -> dict[int, bytes]:
    """The feature transfers of one edge as the broker delivered them, reassembled: transfer -> blob."""
    chunks: dict[int, dict[int, object]] = {}
    for topic, payload in messages:
        if topic == Topics.features(node, job):
            chunk = parse_feature_message(payload)
            chunks.setdefault(chunk.transfer, {})[chunk.seq] = chunk  # type: ignore[union-attr]
    out = {}
    for transfer, parts in chunks.items():
        ordered = [parts[s] for s in sorted(parts)]
        first = ordered[0]
        out[transfer] = join_transfer(
            [c.payload for c in ordered],  # type: ignore[attr-defined]
            [c.sha256 for c in ordered],  # type: ignore[attr-defined]
            first.size,  # type: ignore[attr-defined]
            first.transfer_sha256,  # type: ignore[attr-defined]
        )
    return out


def clean_bits(weights: Path, shard: Path, batch_size: int = 64) -> np.ndarray:
    """The unrandomized bits of every sample of a shard, [N, bytes], by the edge's own head code (its
    folded head, its batches, one thread as the edge processes run)."""
    model, _ = load_model(weights, "lenet5", 10)
    data = MnistShard(shard)
    extractor = Extractor(model, 2, BitEncoder(1.0), data, batch_size)
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for t in range(extractor.transfers):
            images = torch.from_numpy(np.stack([data.load(i).image for i in extractor.sample_range(t)]))  # type: ignore[misc]
            (out,) = extractor.head(images).values()
            rows.append(np.packbits(quantize(out, None).reshape(len(out), -1).numpy(), axis=1))
    finally:
        torch.set_num_threads(threads)
    return np.concatenate(rows)


def test_policy_refuses_a_job_before_reading_and_the_cloud_says_why(tmp_path, mosquitto, tmp_path_factory):
    base = mnist_base(tmp_path_factory)
    job = write_job(base, tmp_path / "job.yaml", epochs=0, timeout_s=60)
    with sniffer(mosquitto.url) as messages:
        cloud = start_cloud(job, mosquitto.url, tmp_path / "cloud")
        edges = [
            start_edge("edge1", mosquitto.url, tmp_path),
            start_edge("edge2", mosquitto.url, tmp_path, "--max-epsilon", "4", "--data", str(tmp_path / "absent")),
        ]
        try:
            summary = json.loads(finish(cloud, 90))
            status = job_status(mosquitto.url, "mnist-demo")
            edge2 = node_status(mosquitto.url, "edge2")
        finally:
            stop([cloud, *edges])
    why = "epsilon 100 exceeds this edge's limit 4"
    assert summary["phase"] == "done" and summary["edges"]["edge1"]["samples"] == 1500
    assert summary["edges"]["edge2"]["samples"] == 0
    assert summary["edges"]["edge2"]["missing_reason"] == f"refused: {why}"
    assert status["edges"]["edge2"]["state"] == "refused"
    assert status["edges"]["edge2"]["missing_reason"] == f"refused: {why}"
    assert edge2["state"] == "refused" and edge2["job"] == "mnist-demo" and edge2["message"] == why
    assert not [t for t, _ in messages if t == Topics.features("edge2", "mnist-demo")]
    assert [t for t, _ in messages if t == Topics.features("edge1", "mnist-demo")]
    log = (tmp_path / "edge2.log").read_text()
    assert f"job mnist-demo refused: {why}" in log and "policy: max_epsilon=4" in log
    assert "does not exist" not in log and "samples in" not in log  # refused before touching the data
    # The accounting, per edge, in the summary, the status and the checkpoint's record.
    account = summary["edges"]["edge1"]["privacy"]
    assert account == {
        "epsilon": 100.0,
        "bits": 1,
        "activations": LENET_ACTIVATIONS,
        "activation_epsilon": 50.0,
        "sample_epsilon": 50.0 * LENET_ACTIVATIONS,
    }
    assert status["edges"]["edge1"]["privacy"] == account
    _, meta = read_tensors(Path(summary["checkpoint"]))
    assert meta["privacy"]["edge1"] == account == meta["privacy"]["edge2"]


def test_assignments_with_nan_or_infinity_are_refused(tmp_path, mosquitto, tmp_path_factory):
    base = mnist_base(tmp_path_factory)
    assignment = JobAssignment(
        job="bad",
        node="edge1",
        model=ModelRef(arch="lenet5", num_classes=10, cut_layer=2, image_size=28),
        privacy=PrivacyParams(epsilon=4),
        dataset=str(base.shard(1)),
        batch_size=64,
        head=HeadManifest(sha256="0" * 64, size=1, chunks=1),
    )
    good = to_json(assignment)
    assert b'"epsilon":4.0' in good
    pub = client(mosquitto.url)
    with sniffer(mosquitto.url) as messages:
        edge = start_edge("edge1", mosquitto.url, tmp_path)
        try:
            wait_for(lambda: node_status(mosquitto.url, "edge1", wait_s=0.3).get("state") == "online", 30, "edge1")
            for job, literal in (("inf", b"Infinity"), ("neginf", b"-Infinity"), ("nan", b"NaN")):
                payload = good.replace(b'"job":"bad"', f'"job":"{job}"'.encode())
                payload = payload.replace(b'"epsilon":4.0', b'"epsilon":' + literal)
                pub.publish(Topics.job_assignment("edge1", job), payload, qos=1, retain=True).wait_for_publish(10)
            log = tmp_path / "edge1.log"
            wait_for(lambda: log.read_text().count("privacy.epsilon: Input should be a finite number") >= 3, 30, "3")
            time.sleep(1.0)
            assert edge.poll() is None, "the edge died"
            state = node_status(mosquitto.url, "edge1")
        finally:
            stop([edge])
            pub.loop_stop()
            pub.disconnect()
    assert state["state"] == "online" and state.get("job") is None  # none of them was taken for a job
    assert not [t for t, _ in messages if "/features/" in t]


@pytest.mark.parametrize("epsilon", [1.0, 100.0])
def test_delivered_bits_are_randomized_as_epsilon_asks(tmp_path, mosquitto, tmp_path_factory, epsilon):
    """Bits captured from the broker against clean bits computed here: flips at rate 1 - p (within
    5 sigma) at ε = 1, none at ε = 100; labels and ids are the shard's, in order."""
    base = mnist_base(tmp_path_factory)
    job = write_job(base, tmp_path / "job.yaml", nodes=("edge1",), epochs=0, epsilon=epsilon)
    with sniffer(mosquitto.url) as messages:
        cloud = start_cloud(job, mosquitto.url, tmp_path / "cloud")
        edge = start_edge("edge1", mosquitto.url, tmp_path)
        try:
            summary = json.loads(finish(cloud, 90))
            assert edge.wait(30) == 0
        finally:
            stop([cloud, edge])
    assert summary["phase"] == "done" and summary["edges"]["edge1"]["samples"] == 1500
    batches = [decode_batch(blob) for _, blob in sorted(delivered_batches(messages, "edge1", "mnist-demo").items())]
    ids = [i for b in batches for i in b.ids]
    assert ids == list(range(1500))
    noisy = np.frombuffer(b"".join(b.data for b in batches), np.uint8).reshape(1500, -1)
    clean = clean_bits(base.weights, base.shard(1))
    assert noisy.shape == clean.shape == (1500, LENET_ACTIVATIONS // 8)
    flips = np.unpackbits(noisy ^ clean)
    q = 1 - keep_probability(epsilon)
    sigma = math.sqrt(q * (1 - q) / flips.size)
    print(f"\n[privacy] ε={epsilon:g}: flip rate {flips.mean():.5f} of {flips.size} bits, expected {q:.5f}±{sigma:.5f}")
    if epsilon == 100.0:
        assert not flips.any()
    else:
        assert abs(flips.mean() - q) < 5 * sigma
        assert flips.mean() > 0.3  # really randomized, not a few flips
    labels = MnistShard(base.shard(1))
    assert [lbl for b in batches for lbl in b.labels] == [labels.load(i).label for i in range(1500)]


def _yolo_folder(root: Path, names: list[str], corrupt: str) -> None:
    for k, name in enumerate(names):
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (80, 60), (40 * k, 90, 200 - 20 * k)).save(root / "images" / name)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        (root / "labels" / Path(name).with_suffix(".txt")).write_text(f"{k} 0.5 0.5 0.2 0.3\n")
    (root / "images" / corrupt).write_bytes(b"\xff\xd8 not really a jpeg")


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_no_file_name_of_the_edge_data_crosses_the_broker(tmp_path, mosquitto, runtime):
    """A detection edge with telling file names and one unreadable image, and an edge whose data path
    does not exist: every byte the broker delivered (features, statuses, acknowledgements) is free of
    those names; the skip reason and the error are categories, the details stay in the edges' logs.
    With either runtime (the onnx edges in processes that cannot import torch)."""
    names = [f"patient-{k:04d}-alice-smith.jpg" for k in range(5)]
    corrupt = "patient-9999-bob-jones.jpg"
    data = tmp_path / "clinic-ward-7"
    _yolo_folder(data, names, corrupt)
    spec = JobSpec(
        name="secret",
        model=ModelSpec(arch="yolov5n", num_classes=80, image_size=64),
        cut_layer=4,
        edges=[EdgeSpec(node="edge1", dataset="local", batch_size=4), EdgeSpec(node="edge2", dataset="local")],
        cloud=CloudSpec(epochs=0, output=str(tmp_path / "secret.safetensors")),
        collect=CollectSpec(timeout_s=60),
    )
    job = write_spec(spec, tmp_path / "job.yaml")
    missing, edge2_log = tmp_path / "patient-records-of-bob", tmp_path / "edge2.log"
    env = without(tmp_path, {"torch"}, "is not installed on this edge") if runtime == "onnx" else None
    with sniffer(mosquitto.url) as messages:
        cloud = start_cloud(job, mosquitto.url, tmp_path / "cloud")
        edges = [
            start_edge("edge1", mosquitto.url, tmp_path, "--runtime", runtime, "--data", str(data), env=env),
            # Without --once: it stays up, in state error, so the cloud stops waiting for it.
            mistnet("edge", "--node", "edge2", "--broker", mosquitto.url, "--runtime", runtime, "--data", str(missing),
                    log=edge2_log, env=env),
        ]
        try:
            summary = json.loads(finish(cloud, 120))
            assert edges[0].wait(30) == 0
        finally:
            stop([cloud, *edges])
    assert summary["phase"] == "done", summary
    assert summary["edges"]["edge1"]["samples"] == 5 and summary["edges"]["edge1"]["skipped"] == 1
    assert summary["edges"]["edge2"]["missing_reason"] == "the dataset cannot be read (details in the edge's log)"
    assert "patient-records-of-bob does not exist" in (tmp_path / "edge2.log").read_text()
    wire = b"".join(t.encode() + p for t, p in messages)
    assert len(wire) > 5 * 64 * 8 * 8 // 8  # the features did cross
    for secret in ["patient", "alice", "smith", "bob-jones", "clinic-ward", str(data)]:
        assert secret.encode() not in wire, secret
    batches = [decode_batch(b) for b in delivered_batches(messages, "edge1", "secret").values()]
    assert [s.model_dump() for b in batches for s in b.skipped] == [{"id": 5, "reason": "unreadable image"}]
    log = (tmp_path / "edge1.log").read_text()
    assert "sample 5 (images/patient-9999-bob-jones.jpg) skipped: unreadable image" in log  # kept locally
    assert f"{runtime} runtime" in log
