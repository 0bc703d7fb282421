"""Hostile input: every decoder refuses malformed messages with a ProtocolError (never another
exception), the agents count and log each refusal and keep going, and a real job under a flood of
malformed messages ends exactly as it does without one.

Malformed messages are made from real encoded ones: bit flips, truncation, inserted garbage, type
swaps, huge lengths (msgpack headers claiming 4 GiB, sizes of 10 GB, oversized shapes), nesting bombs.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import constants as C
from common.errors import ProtocolError
from common.protocol import (
    Ack,
    AckKind,
    CheckpointAnnouncement,
    Chunk,
    Control,
    ControlAction,
    EdgeProgress,
    FeatureBatch,
    FeatureLayout,
    FeatureObject,
    HeadChunk,
    HeadManifest,
    JobAssignment,
    JobPhase,
    JobStatus,
    ModelRef,
    NodeState,
    NodeStatus,
    ObjectStoreRef,
    PrivacyParams,
    Topics,
    decode_batch,
    decode_chunk,
    decode_head_chunk,
    encode_batch,
    encode_chunk,
    encode_head_chunk,
    from_json,
    parse_feature_message,
    split_transfer,
    to_json,
    to_msgpack,
)
from common.transport import BrokerOptions, Inbound

JOB = "mnist-demo"

# Real messages ----------------------------------------------------------------------------------


def real_batch(transfer: int = 3, n: int = 4) -> FeatureBatch:
    ids = list(range(transfer * 64, transfer * 64 + n))
    return FeatureBatch(
        transfer=transfer,
        bits=1,
        layout=[FeatureLayout(layer=2, shape=[6, 14, 14])],
        ids=ids,
        labels=[bytes([i % 10]) for i in ids],
        data=bytes(range(147)) * n,
    )


def real_messages(node: str = "edge1") -> dict[str, list[bytes]]:
    """Well-formed encodings of every message kind, as the agents would send them."""
    blob = encode_batch(real_batch())
    chunks = [encode_chunk(c) for c in split_transfer(JOB, node, 3, blob, 256)]
    head = bytes(range(256)) * 9
    claim = FeatureObject(
        job=JOB,
        node=node,
        transfer=3,
        key=f"features/{JOB}/{node}/000003-00.msgpack",
        size=len(blob),
        sha256=hashlib.sha256(blob).digest(),
    )
    assignment = JobAssignment(
        job=JOB,
        node=node,
        model=ModelRef(arch="lenet5", num_classes=10, cut_layer=2, image_size=28),
        privacy=PrivacyParams(epsilon=100),
        dataset="/data/edge1.npz",
        batch_size=64,
        head=HeadManifest(sha256=hashlib.sha256(head).hexdigest(), size=len(head), chunks=3),
        store=ObjectStoreRef(bucket="features", prefix="runs", endpoint_url="http://minio:9000"),
    )
    return {
        "chunk": chunks,
        "features": [*chunks[:2], to_msgpack(claim)],
        "batch": [blob],
        "head_chunk": [
            encode_head_chunk(
                HeadChunk(
                    job=JOB, seq=i, total=3, sha256=hashlib.sha256(head[i * 1024 :]).digest(), payload=head[i * 1024 :]
                )
            )
            for i in range(2)
        ],
        "ack": [
            to_json(Ack(job=JOB, node=node, kind=AckKind.CHUNK, transfer=3, seq=1, transfer_done=True)),
            to_json(Ack(job=JOB, node=node, kind=AckKind.RESUME, next_transfer=5, committed=[7, 9])),
            to_json(Ack(job=JOB, node=node, kind=AckKind.REJECTED, transfer=2, seq=0, reason="sha256 mismatch")),
        ],
        "job_assignment": [to_json(assignment)],
        "node_status": [
            to_json(NodeStatus(node=node, state=NodeState.EXTRACTING, job=JOB, total=1500, extracted=640, acked=512)),
            to_json(NodeStatus(node=node, state=NodeState.READY, job=JOB, total=1500)),
        ],
        "job_status": [
            to_json(
                JobStatus(
                    job=JOB,
                    phase=JobPhase.TRAINING,
                    edges={node: EdgeProgress(state="complete", samples=1500)},
                    epoch=2,
                    epochs=6,
                    loss=0.3,
                    metrics={"accuracy": 0.9},
                )
            )
        ],
        "control": [to_json(Control(job=JOB, action=ControlAction.CANCEL, reason="stop"))],
        "checkpoint": [
            to_json(CheckpointAnnouncement(job=JOB, epoch=6, url="s3://b/k", sha256="ab" * 32, size=100, final=True))
        ],
    }


DECODERS: dict[str, Callable[[bytes], Any]] = {
    "chunk": decode_chunk,
    "features": parse_feature_message,
    "batch": decode_batch,
    "head_chunk": decode_head_chunk,
    "ack": lambda p: from_json(Ack, p),
    "job_assignment": lambda p: from_json(JobAssignment, p),
    "node_status": lambda p: from_json(NodeStatus, p),
    "job_status": lambda p: from_json(JobStatus, p),
    "control": lambda p: from_json(Control, p),
    "checkpoint": lambda p: from_json(CheckpointAnnouncement, p),
}
REAL = real_messages()


# Mutations --------------------------------------------------------------------------------------

HUGE_HEADERS = [
    b"\xc6\xff\xff\xff\xff",  # bin 32 of 4 GiB
    b"\xdb\xff\xff\xff\xff",  # str 32 of 4 GiB
    b"\xdd\xff\xff\xff\xff",  # array 32 of 4 G items
    b"\xdf\xff\xff\xff\xff",  # map 32 of 4 G pairs
    b"\xc7\xff\x01",  # ext 8
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",  # uint 64 max
]
WEIRD_VALUES: list[Any] = [
    None,
    True,
    -1,
    0,
    2**63 - 1,
    -(2**63),
    1.5,
    float("nan"),
    "",
    "x" * 300,
    "../../etc",
    "+/#",
    b"",
    b"\x00" * 33,
    [],
    [1, 2],
    {},
    {"a": 1},
    10 * 1024**3,
    [100000, 100000, 100000],
    [0],
    [-5, 3],
]


def _is_json(payload: bytes) -> bool:
    return payload[:1] in (b"{", b"[")


def _flip(rnd: random.Random, p: bytes) -> bytes:
    b = bytearray(p)
    for _ in range(rnd.randint(1, 8)):
        i = rnd.randrange(len(b))
        b[i] ^= 1 << rnd.randrange(8)
    return bytes(b)


def _truncate(rnd: random.Random, p: bytes) -> bytes:
    return p[: rnd.randrange(1, len(p))] if len(p) > 1 else p + b"\x00"


def _insert(rnd: random.Random, p: bytes) -> bytes:
    i = rnd.randrange(len(p) + 1)
    return p[:i] + rnd.randbytes(rnd.randint(1, 40)) + p[i:]


def _huge(rnd: random.Random, p: bytes) -> bytes:
    if _is_json(p):
        i = rnd.randrange(len(p))
        return p[:i] + rnd.choice([b"1e999", b"9" * 400, b'"' + b"x" * 2000, b"[" * 5000, b"-"]) + p[i:]
    i = rnd.randrange(len(p))
    return p[:i] + rnd.choice(HUGE_HEADERS) + p[i:]


def _bomb(rnd: random.Random, p: bytes) -> bytes:
    depth = rnd.choice([100, 10_000, 200_000])
    return b"[" * depth + b"]" * depth if _is_json(p) else b"\x91" * depth + b"\xc0"


def _structured(rnd: random.Random, p: bytes) -> bytes:
    """Decode a real message, swap a field's value for one of another type or size, re-encode."""
    doc = json.loads(p) if _is_json(p) else msgpack.unpackb(p, raw=False)
    target = doc
    while isinstance(target, dict) and target and rnd.random() < 0.7:
        key = rnd.choice(list(target))
        if isinstance(target[key], dict) and target[key]:
            target = target[key]
        else:
            break
    if not isinstance(target, dict) or not target:
        target = doc
    action = rnd.random()
    key = rnd.choice(list(target))
    if action < 0.6:
        target[key] = rnd.choice(WEIRD_VALUES)
    elif action < 0.8:
        del target[key]
    else:
        target[rnd.choice(["extra", "payload2", "Ä", "v"])] = rnd.choice(WEIRD_VALUES)
    if _is_json(p):
        return json.dumps(doc, default=lambda o: o.hex() if isinstance(o, bytes) else str(o)).encode()
    return bytes(msgpack.packb(doc, use_bin_type=True))


def _swap(rnd: random.Random, p: bytes) -> bytes:
    """A message of another kind, or another encoding of this one (JSON <-> msgpack)."""
    other = rnd.choice([m for ms in REAL.values() for m in ms])
    if rnd.random() < 0.5:
        return other
    doc = json.loads(p) if _is_json(p) else msgpack.unpackb(p, raw=False)
    if _is_json(p):
        return bytes(msgpack.packb(doc, use_bin_type=True))
    return json.dumps(doc, default=lambda o: o.hex() if isinstance(o, bytes) else str(o)).encode()


def _random(rnd: random.Random, p: bytes) -> bytes:
    return rnd.randbytes(rnd.choice([1, 7, 64, 1000, 70_000]))


MUTATIONS = [_flip, _flip, _truncate, _insert, _huge, _bomb, _structured, _structured, _swap, _random]


def mutate(rnd: random.Random, payload: bytes) -> bytes:
    out = payload
    for _ in range(rnd.choice([1, 1, 1, 2, 3])):
        mutation = rnd.choice(MUTATIONS)
        try:
            out = mutation(rnd, out)
        except Exception:  # a structured mutation of something already mangled: flip bits instead
            out = _flip(rnd, out)
        out = out or b"\x00"
    return out


def refuses(decode: Callable[[bytes], Any], payload: bytes) -> bool:
    """True when the decoder refuses the payload with a ProtocolError; any other exception fails."""
    try:
        decode(payload)
    except ProtocolError:
        return True
    return False


def malformed(kind: str, payload: bytes) -> bool:
    """What an agent must refuse on a topic of ``kind``: its decoder refuses it (a features message
    also when its digest is wrong, but never a well-formed S3 claim)."""
    if not payload:
        return False  # an empty payload withdraws a retained message: not malformed
    if kind == "features":
        return refuses(decode_chunk, payload) and (
            refuses(parse_feature_message, payload) or isinstance(parse_feature_message(payload), Chunk)
        )
    return refuses(DECODERS[kind], payload)


# Properties -------------------------------------------------------------------------------------

PROPERTY = settings(max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("kind", sorted(DECODERS))
@PROPERTY
@given(rnd=st.randoms(use_true_random=False), pick=st.integers(0, 10))
def test_mutated_messages_raise_only_protocol_errors(kind, rnd, pick):
    base = REAL[kind][pick % len(REAL[kind])]
    refuses(DECODERS[kind], mutate(rnd, base))


@pytest.mark.parametrize("kind", sorted(DECODERS))
@PROPERTY
@given(payload=st.binary(max_size=3000))
def test_random_bytes_raise_only_protocol_errors(kind, payload):
    assert refuses(DECODERS[kind], payload)


def test_real_messages_decode():
    for kind, payloads in REAL.items():
        for p in payloads:
            DECODERS[kind](p)


def test_size_claims_are_refused_before_allocation():
    blob = encode_batch(real_batch())
    claim = msgpack.unpackb(REAL["features"][-1], raw=False)
    for field, value in (("size", 10 * 1024**3), ("size", 0), ("key", "x" * 5000), ("transfer", -1)):
        with pytest.raises(ProtocolError):
            parse_feature_message(msgpack.packb({**claim, field: value}, use_bin_type=True))
    chunk = msgpack.unpackb(REAL["chunk"][0], raw=False)
    for field, value in (("total", 2**40), ("total", chunk["size"] + 1), ("seq", chunk["total"])):
        with pytest.raises(ProtocolError):
            decode_chunk(msgpack.packb({**chunk, field: value}, use_bin_type=True))
    head = msgpack.unpackb(REAL["head_chunk"][0], raw=False)
    for changes in ({"total": 2**40}, {"seq": 3}, {"payload": b"x" * (C.MAX_CHUNK_BYTES + 1)}):
        with pytest.raises(ProtocolError):
            decode_head_chunk(msgpack.packb({**head, **changes}, use_bin_type=True))
    with pytest.raises(ProtocolError, match="sha256"):
        decode_head_chunk(msgpack.packb({**head, "payload": b"y" + head["payload"][1:]}, use_bin_type=True))
    raw = msgpack.unpackb(blob, raw=False)
    for layout in (
        [{"layer": 2, "shape": [2**31, 2**31]}],
        [{"layer": 2, "shape": [0]}],
        [{"layer": 2, "shape": [1] * 9}],
    ):
        with pytest.raises(ProtocolError):
            decode_batch(msgpack.packb({**raw, "layout": layout}, use_bin_type=True))
    assert math.prod([6, 14, 14]) < C.MAX_FEATURE_ELEMENTS


# The agents' dispatchers, in process --------------------------------------------------------------


class _Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def __call__(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.sent.append((topic, payload))


_AGENTS: dict[str, Any] = {}


def edge_agent() -> Any:
    if "edge" not in _AGENTS:
        from edge_agent.agent import EdgeAgent

        agent = EdgeAgent("edge1", BrokerOptions())
        agent.link.publish = _Sink()  # type: ignore[method-assign,assignment]
        _AGENTS["edge"] = agent
    return _AGENTS["edge"]


def cloud_agent(factory: pytest.TempPathFactory) -> Any:
    if "cloud" not in _AGENTS:
        from cloud_agent.agent import CloudAgent
        from common.jobspec import build_job

        spec = build_job(
            {
                "name": JOB,
                "model": {"arch": "lenet5", "num_classes": 10},
                "cut_layer": 2,
                "edges": [{"node": "edge1", "dataset": "x", "batch_size": 64}],
            }
        )
        agent = CloudAgent(spec, BrokerOptions(), factory.mktemp("cloud"))
        agent.link.publish = _Sink()  # type: ignore[method-assign,assignment]
        _AGENTS["cloud"] = agent
    return _AGENTS["cloud"]


EDGE_TOPICS = [
    Topics.job_assignment("edge1", JOB),
    Topics.head_chunk("edge1", JOB, 0),
    Topics.ack("edge1", JOB),
    "mistnet/v1/node/edge1/head/a/b/c",
    Topics.job_assignment("edge1", "other"),
]
CLOUD_TOPICS = [
    Topics.features("edge1", JOB),
    Topics.features("intruder", JOB),
    Topics.node_status("edge1"),
    Topics.node_status("nobody"),
    Topics.control(JOB),
]
KIND_OF_TOPIC = {
    "jobs": "job_assignment",
    "head": "head_chunk",
    "ack": "ack",
    "features": "features",
    "status": "node_status",
    "control": "control",
}


def kind_of(topic: str) -> str:
    return next(v for k, v in KIND_OF_TOPIC.items() if f"/{k}" in topic)


@settings(max_examples=400, deadline=None, database=None)
@given(rnd=st.randoms(use_true_random=False), topic=st.sampled_from(EDGE_TOPICS + CLOUD_TOPICS))
def test_agents_count_and_survive_malformed_messages(tmp_path_factory, rnd, topic):
    kind = kind_of(topic)
    payload = mutate(rnd, rnd.choice(REAL[kind]))
    if not malformed(kind, payload):
        return  # only malformed input here
    agent = edge_agent() if topic in EDGE_TOPICS else cloud_agent(tmp_path_factory)
    counts = agent.rejected if topic in EDGE_TOPICS else agent.collector.rejected
    before = sum(counts.values())
    agent.dispatch(Inbound(topic, payload, retain=False))  # must not raise
    assert sum(counts.values()) == before + 1


# A real job under a flood ------------------------------------------------------------------------


def flood(n_per_topic: int, nodes: tuple[str, ...], seed: int = 7) -> dict[str, list[tuple[str, bytes]]]:
    """Malformed payloads per receiving agent ("cloud", "edge1", ...), each refused by its decoder."""
    rnd = random.Random(seed)
    real = {node: real_messages(node) for node in nodes}
    topics: dict[str, list[tuple[str, str, str]]] = {"cloud": []}
    for node in nodes:
        topics["cloud"] += [
            (Topics.features(node, JOB), "features", node),
            (Topics.node_status(node), "node_status", node),
        ]
        topics[node] = [
            (Topics.job_assignment(node, JOB), "job_assignment", node),
            (Topics.head_chunk(node, JOB, 0), "head_chunk", node),
            (Topics.ack(node, JOB), "ack", node),
        ]
    topics["cloud"] += [
        (Topics.control(JOB), "control", nodes[0]),
        (Topics.features("intruder", JOB), "features", nodes[0]),
    ]
    out: dict[str, list[tuple[str, bytes]]] = {agent: [] for agent in topics}
    for agent, entries in topics.items():
        for topic, kind, node in entries:
            made = 0
            while made < n_per_topic:
                payload = mutate(rnd, rnd.choice(real[node][kind]))
                if len(payload) > 16_384 and rnd.random() < 0.9:
                    continue  # some big ones (bombs, 70 kB of noise), not a quarter of a gigabyte of them
                if malformed(kind, payload):
                    out[agent].append((topic, payload))
                    made += 1
    return out


def streaming(workdir, nodes) -> bool:
    from tests.agents import committed_transfers

    return min(committed_transfers(workdir, n) for n in nodes) >= 1


@pytest.mark.integration
@pytest.mark.security
def test_job_under_a_flood_of_malformed_messages(tmp_path, mosquitto, tmp_path_factory):
    """The same job twice, side by side: on a quiet broker, and on one flooded with malformed messages."""
    from broker.launcher import local_mosquitto
    from tests.agents import finish, spooled_samples, start_cloud, start_edge, wait_for
    from tests.harness import client, log_numbers, mnist_base, stop, write_job

    base = mnist_base(tmp_path_factory)
    nodes = ("edge1", "edge2")
    payloads = flood(900, nodes)
    sent = {agent: len(p) for agent, p in payloads.items()}
    assert sum(sent.values()) >= 10_000
    quiet = local_mosquitto(tmp_path / "quiet-broker").start()
    urls = {"clean": quiet.url, "flooded": mosquitto.url}
    procs: dict[str, list] = {}
    t0 = time.monotonic()
    try:
        for run, url in urls.items():
            root = tmp_path / run
            job = write_job(base, root / "job.yaml", epochs=1)
            rate = ("--rate-limit", "15000") if run == "flooded" else ()
            procs[run] = [start_cloud(job, url, root / "cloud"), *(start_edge(n, url, root, *rate) for n in nodes)]
        wait_for(partial(streaming, tmp_path / "flooded" / "cloud", nodes), 90, "both edges streaming")
        c = client(mosquitto.url, inflight=200)
        t_flood = time.monotonic()
        infos = [c.publish(t, p, qos=1) for msgs in payloads.values() for t, p in msgs]
        for info in infos:
            info.wait_for_publish(30)
        flood_s = time.monotonic() - t_flood
        c.loop_stop()
        c.disconnect()
        alive = [p.poll() is None for p in procs["flooded"]]
        results = {}
        for run, (cloud, *edges) in procs.items():
            root = tmp_path / run
            summary = json.loads(finish(cloud, 180))
            assert cloud.returncode == 0, (root / "cloud-cloud.log").read_text()[-3000:]
            assert all(e.wait(30) == 0 for e in edges)
            rows = spooled_samples(root / "cloud")
            results[run] = (summary, hashlib.sha256(repr(rows).encode()).hexdigest(), Counter(r[0] for r in rows))
        took = time.monotonic() - t0
    finally:
        stop([p for ps in procs.values() for p in ps])
        quiet.stop()
    (clean, clean_hash, clean_counts), (flooded, flooded_hash, flooded_counts) = results["clean"], results["flooded"]
    assert all(alive), "an agent died during the flood"
    assert flooded["phase"] == "done" and flooded_counts == clean_counts == {"edge1": 1500, "edge2": 1500}
    assert flooded_hash == clean_hash, "the spooled samples differ from the clean run's"
    assert flooded["metrics"]["accuracy"] == clean["metrics"]["accuracy"]  # same data, same seed, same order
    root = tmp_path / "flooded"
    counted = {"cloud": log_numbers(root / "cloud-cloud.log", r"rejected (\d+) malformed")[-1]}
    for n in nodes:
        counted[n] = log_numbers(root / f"{n}.log", r"stops: rejected (\d+) malformed")[-1]
    assert counted == sent, (counted, sent)
    assert "rejected features message on" in (root / "cloud-cloud.log").read_text()
    assert "not logged one by one" in (root / "edge1.log").read_text()  # a flood does not flood the log
    print(
        f"\n[hostile] {sum(sent.values())} malformed messages in {flood_s:.1f} s ({sent}); counted {counted}; "
        f"accuracy {flooded['metrics']['accuracy']} (clean run: {clean['metrics']['accuracy']}); spool identical; "
        f"both jobs took {took:.1f} s"
    )
