"""Collection into the spool: duplicates, reordering, corruption; exactly-once and resume points."""

import random

import pytest

from cloud_agent.collector import Collector
from cloud_agent.spool import Spool
from common.protocol import (
    AckKind,
    FeatureBatch,
    FeatureLayout,
    NodeState,
    NodeStatus,
    SkippedSample,
    encode_batch,
    encode_chunk,
    split_transfer,
)

PER = 8


def batch(transfer, skip=()):
    ids = [i for i in range(transfer * PER, (transfer + 1) * PER) if i not in skip]
    return FeatureBatch(
        transfer=transfer,
        bits=1,
        layout=[FeatureLayout(layer=1, shape=[4, 10, 10])],
        ids=ids,
        labels=[bytes([i % 10]) for i in ids],
        data=bytes([transfer]) * 50 * len(ids),
        skipped=[SkippedSample(id=i, reason="corrupt image") for i in skip],
    )


def payloads(transfer, chunk_bytes=100, **kw):
    return [
        encode_chunk(c)
        for c in split_transfer("job", "edge1", transfer, encode_batch(batch(transfer, **kw)), chunk_bytes)
    ]


@pytest.fixture
def collector(tmp_path):
    acks = []
    spool = Spool(tmp_path / "spool.sqlite")
    c = Collector(spool, "job", {"edge1": PER, "edge2": PER}, acks.append)
    c.acks = acks
    yield c
    spool.close()


def test_reordered_and_duplicated_chunks_commit_once(collector):
    msgs = payloads(0) + payloads(1)
    stream = msgs + msgs[:5]
    random.Random(0).shuffle(stream)
    for m in stream:
        collector.on_features("edge1", m)
    assert collector.spool.sample_ids("edge1") == list(range(16))
    assert collector.spool.committed_transfers("edge1") == [0, 1]
    done = {a.transfer for a in collector.acks if a.transfer_done}
    assert done == {0, 1}
    late = payloads(0)[0]
    collector.on_features("edge1", late)
    assert collector.acks[-1].transfer_done and collector.duplicates >= 1
    assert collector.spool.sample_ids("edge1") == list(range(16))


def test_corrupt_chunk_is_rejected_then_accepted_when_resent(collector):
    msgs = payloads(0)
    bad = bytearray(msgs[1])
    bad[-3] ^= 0xFF
    collector.on_features("edge1", bytes(bad))
    assert collector.acks[-1].kind == AckKind.REJECTED and collector.acks[-1].seq == 1
    for m in msgs:
        collector.on_features("edge1", m)
    assert collector.spool.sample_ids("edge1") == list(range(8))


def test_garbage_and_foreign_nodes_are_counted_not_stored(collector):
    collector.on_features("edge1", b"\xff\x00garbage")
    collector.on_features("intruder", payloads(0)[0])
    collector.on_features("edge2", payloads(0)[0])  # edge1's chunk on edge2's topic
    assert sum(collector.rejected.values()) == 3
    assert collector.spool.sample_ids("edge1") == collector.spool.sample_ids("edge2") == []


def test_ids_outside_the_transfer_are_refused(collector):
    wrong = batch(0).model_copy(update={"transfer": 3})
    for c in split_transfer("job", "edge1", 3, encode_batch(wrong), 10_000):
        collector.on_features("edge1", encode_chunk(c))
    assert collector.acks[-1].kind == AckKind.REJECTED
    assert collector.spool.sample_ids("edge1") == []


def test_resume_point_and_completion_count_skipped_samples(collector):
    for t in (0, 1, 3):
        for m in payloads(t, skip=(25,) if t == 3 else ()):
            collector.on_features("edge1", m)
    collector.on_hello(NodeStatus(node="edge1", state=NodeState.READY, job="job", total=4 * PER))
    resume = collector.acks[-1]
    assert resume.kind == AckKind.RESUME and resume.next_transfer == 2 and resume.committed == [3]
    counts = collector.spool.counts("edge1")
    assert (counts.samples, counts.skipped, counts.complete) == (23, 1, False)
    for m in payloads(2):
        collector.on_features("edge1", m)
    assert collector.spool.counts("edge1").complete


def test_spool_survives_reopen(tmp_path):
    spool = Spool(tmp_path / "s.sqlite")
    c = Collector(spool, "job", {"edge1": PER}, lambda a: None)
    msgs = payloads(0)
    for m in msgs[:2]:
        c.on_features("edge1", m)
    spool.close()
    spool = Spool(tmp_path / "s.sqlite")
    c = Collector(spool, "job", {"edge1": PER}, lambda a: None)
    for m in msgs[2:]:
        c.on_features("edge1", m)
    assert spool.sample_ids("edge1") == list(range(8))
    sample = spool.read(spool.rowids(["edge1"])[0])
    assert sample.features == bytes([0]) * 50 and sample.layout[0].shape == [4, 10, 10]
