"""Collection into the spool: duplicates, reordering, corruption; exactly-once and resume points;
batched commits with acknowledgements only after COMMIT; every byte written once; restarts."""

import random
import sqlite3
import threading

import pytest

from cloud_agent.collector import Collector
from cloud_agent.spool import Spool, SpoolFeatures
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


def batch(transfer, skip=(), fill=None):
    ids = [i for i in range(transfer * PER, (transfer + 1) * PER) if i not in skip]
    return FeatureBatch(
        transfer=transfer,
        bits=1,
        layout=[FeatureLayout(layer=1, shape=[4, 10, 10])],
        ids=ids,
        labels=[bytes([i % 10]) for i in ids],
        data=bytes([transfer if fill is None else fill]) * 50 * len(ids),
        skipped=[SkippedSample(id=i, reason="corrupt image") for i in skip],
    )


def payloads(transfer, chunk_bytes=100, node="edge1", **kw):
    return [
        encode_chunk(c) for c in split_transfer("job", node, transfer, encode_batch(batch(transfer, **kw)), chunk_bytes)
    ]


def corrupt(payload):
    bad = bytearray(payload)
    bad[-3] ^= 0xFF
    return bytes(bad)


def distinct_features(spool):
    data = SpoolFeatures(spool, ["edge1", "edge2"])
    return {s.features for s in data.__getitems__(list(range(len(data))))}


def chunk_rows(spool):
    return spool.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]


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


def test_a_complete_transfer_is_written_once_and_acknowledged_once(collector):
    msgs = payloads(0)
    assert len(msgs) > 3
    for m in msgs[:-1]:
        collector.on_features("edge1", m)
    # Held in memory: nothing stored, nothing acknowledged yet (an acknowledgement means persisted).
    assert collector.acks == [] and chunk_rows(collector.spool) == 0
    collector.on_features("edge1", msgs[-1])
    assert [(a.kind, a.transfer, a.transfer_done) for a in collector.acks] == [(AckKind.CHUNK, 0, True)]
    assert chunk_rows(collector.spool) == 0 and collector.spilled == 0  # the chunks table was never written
    assert collector.spool.sample_ids("edge1") == list(range(8))
    assert collector.spool.counts("edge1").wire_bytes == sum(len(m) for m in msgs)


def test_a_batch_commits_once_and_acknowledges_after_commit(tmp_path):
    spool = Spool(tmp_path / "spool.sqlite")
    reader = sqlite3.connect(tmp_path / "spool.sqlite")
    seen = []

    def send_ack(ack):  # what another process sees of the spool when the acknowledgement goes out
        stored = reader.execute("SELECT COUNT(*) FROM samples WHERE id / ? = ?", (PER, ack.transfer)).fetchone()[0]
        seen.append((ack.transfer, ack.transfer_done, stored))

    c = Collector(spool, "job", {"edge1": PER}, send_ack)
    commits = []
    transaction = spool.transaction

    def counting():
        commits.append(1)
        return transaction()

    spool.transaction = counting
    with c.batch():
        for m in payloads(0) + payloads(1) + payloads(2):
            c.on_features("edge1", m)
        assert seen == [] and spool.sample_ids("edge1") == []  # nothing said before the COMMIT
    assert len(commits) == 1
    assert seen == [(0, True, PER), (1, True, PER), (2, True, PER)]
    reader.close()
    spool.close()


def test_a_failed_commit_acknowledges_nothing_and_the_resend_is_stored(collector):
    insert = collector.spool.insert_transfer

    def failing(*args):
        raise sqlite3.OperationalError("disk I/O error")

    collector.spool.insert_transfer = failing
    with pytest.raises(sqlite3.OperationalError), collector.batch():
        for m in payloads(0):
            collector.on_features("edge1", m)
    assert collector.acks == [] and collector.spool.sample_ids("edge1") == []
    collector.spool.insert_transfer = insert
    for m in payloads(0):  # the edge resends (no acknowledgement came)
        collector.on_features("edge1", m)
    assert collector.spool.sample_ids("edge1") == list(range(8)) and collector.acks[-1].transfer_done


def test_duplicates_in_one_batch_are_acknowledged_once_and_not_stored(collector):
    for m in payloads(0):
        collector.on_features("edge1", m)
    collector.acks.clear()
    with collector.batch():
        for m in payloads(0) * 3:
            collector.on_features("edge1", m)
    assert [(a.transfer, a.transfer_done) for a in collector.acks] == [(0, True)]
    assert collector.duplicates == 3 * len(payloads(0))
    assert collector.spool.sample_ids("edge1") == list(range(8))


def test_corrupt_chunk_is_rejected_then_accepted_when_resent(collector):
    msgs = payloads(0)
    collector.on_features("edge1", corrupt(msgs[1]))
    assert collector.acks[-1].kind == AckKind.REJECTED and collector.acks[-1].seq == 1
    for m in msgs:
        collector.on_features("edge1", m)
    assert collector.spool.sample_ids("edge1") == list(range(8))


def test_corrupt_copies_are_rejected_whatever_is_held_or_committed(collector):
    msgs = payloads(0)
    collector.on_features("edge1", msgs[1])  # held
    collector.on_features("edge1", corrupt(msgs[1]))
    assert collector.acks[-1].kind == AckKind.REJECTED
    for m in msgs:
        collector.on_features("edge1", m)
    collector.on_features("edge1", corrupt(msgs[2]))  # transfer 0 is committed now
    assert collector.acks[-1].kind == AckKind.REJECTED and collector.rejected["chunk sha256 mismatch"] == 2
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


def test_a_batch_claiming_another_transfer_number_is_refused(collector):
    inside = batch(1)  # transfer 1's ids and number, sent as the chunks of transfer 0
    for c in split_transfer("job", "edge1", 0, encode_batch(inside), 10_000):
        collector.on_features("edge1", encode_chunk(c))
    assert collector.acks[-1].kind == AckKind.REJECTED
    assert collector.spool.committed_transfers("edge1") == []


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


def test_a_hello_inside_a_batch_includes_what_the_batch_verified(collector):
    with collector.batch():
        for m in payloads(0):
            collector.on_features("edge1", m)
        collector.on_hello(NodeStatus(node="edge1", state=NodeState.READY, job="job", total=2 * PER))
    assert [(a.kind, a.transfer_done) for a in collector.acks] == [(AckKind.CHUNK, True), (AckKind.RESUME, False)]
    assert collector.acks[-1].next_transfer == 1


def test_held_chunks_are_persisted_and_acknowledged_after_the_hold_time(collector, monkeypatch):
    import cloud_agent.collector as module

    clock = [100.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    msgs = payloads(0)
    with collector.batch():
        for m in msgs[:3]:
            collector.on_features("edge1", m)
    assert collector.acks == [] and collector.wait_s(5.0) == pytest.approx(collector.hold_s)
    clock[0] += collector.hold_s
    assert collector.wait_s(5.0) == 0
    collector.flush()  # what the agent's pump does when its wait ends
    assert [(a.seq, a.transfer_done) for a in collector.acks] == [(0, False), (1, False), (2, False)]
    assert chunk_rows(collector.spool) == 3 and collector.spilled == 3 and collector.wait_s(5.0) == 5.0
    collector.on_features("edge1", msgs[0])  # its acknowledgement was lost: said again
    assert (collector.acks[-1].seq, collector.acks[-1].transfer_done) == (0, False)
    for m in msgs[3:]:
        collector.on_features("edge1", m)
    assert collector.spool.sample_ids("edge1") == list(range(8)) and collector.acks[-1].transfer_done
    assert chunk_rows(collector.spool) == 0


def test_held_bytes_over_the_limit_are_persisted_oldest_first(collector):
    collector.max_held_bytes = 250
    first, second = payloads(0), payloads(1)
    with collector.batch():
        for m in first[:2] + second[:2]:  # 4 x 100 payload bytes held
            collector.on_features("edge1", m)
    persisted = collector.spool.db.execute("SELECT transfer, seq FROM chunks ORDER BY transfer, seq").fetchall()
    assert persisted == [(0, 0), (0, 1)] and collector.held_bytes == 200
    assert [(a.transfer, a.seq) for a in collector.acks] == [(0, 0), (0, 1)]


def test_a_restarted_cloud_keeps_persisted_chunks_and_loses_only_unacknowledged_ones(tmp_path):
    spool = Spool(tmp_path / "s.sqlite")
    acks = []
    c = Collector(spool, "job", {"edge1": PER}, acks.append)
    c.hold_s = 0
    msgs = payloads(0)
    for m in msgs[:2]:
        c.on_features("edge1", m)
    c.hold_s = 60
    c.on_features("edge1", msgs[2])  # held, not acknowledged: a crash may lose it
    assert [a.seq for a in acks] == [0, 1]
    for m in payloads(1):
        c.on_features("edge1", m)
    spool.close()  # the process stops

    spool = Spool(tmp_path / "s.sqlite")
    acks.clear()
    c = Collector(spool, "job", {"edge1": PER}, acks.append)
    assert c.committed == {"edge1": {1}} and c.assemblies[("edge1", 0)].stored.keys() == {0, 1}
    c.on_features("edge1", payloads(1)[0])  # a duplicate of a transfer committed before the restart
    assert acks[-1].transfer_done and spool.sample_ids("edge1") == list(range(8, 16))
    for m in msgs[2:]:  # the edge resends what was not acknowledged
        c.on_features("edge1", m)
    assert spool.sample_ids("edge1") == list(range(16))
    sample = spool.read(spool.rowids(["edge1"])[0])
    assert sample.features == bytes([0]) * 50 and sample.layout[0].shape == [4, 10, 10]
    assert chunk_rows(spool) == 0
    spool.close()


def test_a_re_extracted_transfer_replaces_the_earlier_version(collector):
    """An edge that restarts re-extracts an unfinished transfer with fresh randomization: a different
    transfer sha256. The newer version wins; late chunks of the older one are ignored."""
    collector.hold_s = 0
    old, new = payloads(0, fill=7), payloads(0, fill=9)
    for m in old[:3]:
        collector.on_features("edge1", m)
    assert chunk_rows(collector.spool) == 3
    collector.hold_s = 60
    for m in new:
        collector.on_features("edge1", m)
    collector.on_features("edge1", old[3])  # a late redelivery of the old version: a duplicate now
    assert distinct_features(collector.spool) == {bytes([9]) * 50} and chunk_rows(collector.spool) == 0
    assert collector.spool.sample_ids("edge1") == list(range(8))


def test_late_chunks_of_a_replaced_version_are_ignored(collector):
    old, new = payloads(0, fill=7), payloads(0, fill=9)
    collector.on_features("edge1", old[0])
    collector.on_features("edge1", new[0])  # replaces the old version
    collector.on_features("edge1", old[1])  # ignored: not acknowledged, not stored
    assert collector.assemblies[("edge1", 0)].held.keys() == {0}
    for m in new[1:]:
        collector.on_features("edge1", m)
    assert distinct_features(collector.spool) == {bytes([9]) * 50}


def test_a_transfer_that_never_verifies_is_asked_for_again_whole(collector):
    # Each chunk is intact, but they come from two versions with the same transfer sha256 (a sender bug).
    good, other = payloads(0, fill=7), payloads(0, fill=9)
    from common.protocol import decode_chunk

    mixed = []
    for i, m in enumerate(other):
        chunk = decode_chunk(m)
        if i % 2:
            chunk = chunk.model_copy(update={"transfer_sha256": decode_chunk(good[0]).transfer_sha256})
        else:
            chunk = decode_chunk(good[i])
        mixed.append(encode_chunk(chunk))
    for m in mixed:
        collector.on_features("edge1", m)
    rejected = [a.seq for a in collector.acks if a.kind == AckKind.REJECTED]
    assert rejected == list(range(len(mixed))) and collector.rejected["corrupt transfer"] == 1
    assert collector.spool.sample_ids("edge1") == [] and not collector.assemblies


def test_pipelined_batches_are_acknowledged_only_once_committed(collector):
    """Pipelined (as the cloud agent runs it), a batch's fsync runs while the next messages are
    handled; its commit and acknowledgements come once the fsync is done, and its transfers count as
    committed for duplicates meanwhile."""
    collector.pipeline = True
    gate, sync = threading.Event(), collector.spool.segments.sync
    collector.spool.segments.sync = lambda: (gate.wait(10), sync())[1]  # a slow disk
    with collector.batch():
        for m in payloads(0):
            collector.on_features("edge1", m)
    assert collector.acks == [] and collector.spool.committed() == {}  # fsync'ing, not committed
    assert collector.wait_s(5.0) < 0.01  # the agent's loop comes straight back
    with collector.batch():
        collector.on_features("edge1", payloads(0)[2])  # a duplicate of the pending transfer
        assert collector.duplicates == 1 and collector.acks == []
        gate.set()
    assert collector.spool.committed_transfers("edge1") == [0]  # settled by that batch's flush
    assert [(a.transfer, a.transfer_done) for a in collector.acks] == [(0, True), (0, True)]
    with collector.batch():
        for m in payloads(1):
            collector.on_features("edge1", m)
    collector._pending.synced.result()
    collector.on_features("edge1", payloads(1)[0])  # fsync'd: settled before this message is handled
    assert [(a.transfer, a.transfer_done) for a in collector.acks][2:] == [(1, True), (1, True)]
    collector.close()
    assert collector.spool.committed_transfers("edge1") == [0, 1] and collector.wait_s(5.0) == 5.0
    assert collector.spool.sample_ids("edge1") == list(range(16))
