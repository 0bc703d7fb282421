"""The spool's storage and training reads: a kill -9 at any moment loses nothing acknowledged;
batched reads (``SpoolFeatures.__getitems__``) and the vectorised unpack give the per-sample results."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud_agent.collector import Collector
from cloud_agent.spool import PAGE_SIZE, DamagedSample, Spool, SpoolFeatures, StoredSample
from cloud_agent.tasks.base import stack_features
from cloud_agent.tasks.classification import Classification
from common.errors import ProtocolError
from common.privacy import BitEncoder, decode_features
from common.protocol import FeatureBatch, FeatureLayout, encode_batch, encode_chunk, split_transfer

PER = 8


def _batch(transfer: int, layout: list[FeatureLayout], sample_bytes: int, seed: int = 0) -> FeatureBatch:
    rng = np.random.default_rng(seed * 1000 + transfer)
    ids = list(range(transfer * PER, (transfer + 1) * PER))
    return FeatureBatch(
        transfer=transfer,
        bits=1,
        layout=layout,
        ids=ids,
        labels=[bytes([i % 10]) for i in ids],
        data=rng.integers(0, 256, PER * sample_bytes, dtype=np.uint8).tobytes(),
    )


LAYOUT = [FeatureLayout(layer=1, shape=[6, 14, 14]), FeatureLayout(layer=2, shape=[3, 5, 5])]  # 147 + 10 bytes
SAMPLE_BYTES = 157


def _messages(transfers: int, chunk_bytes: int = 300) -> list[list[bytes]]:
    return [
        [
            encode_chunk(c)
            for c in split_transfer("job", "edge1", t, encode_batch(_batch(t, LAYOUT, SAMPLE_BYTES)), chunk_bytes)
        ]
        for t in range(transfers)
    ]


def _child(path: Path, messages: list[list[bytes]], out: int, seed: int) -> None:
    """Collect forever-repeating, shuffled, duplicated chunks; report every acknowledgement after it
    is published (so the parent knows exactly what was acknowledged when it kills us)."""
    rng = random.Random(seed)
    spool = Spool(path)

    def send(ack) -> None:
        os.write(out, f"{ack.kind.value} {ack.transfer} {ack.seq} {int(ack.transfer_done)}\n".encode())

    collector = Collector(spool, "job", {"edge1": PER}, send, pipeline=seed != 1)  # as the cloud agent runs it
    stream = [m for ms in messages for m in ms]
    while True:
        rng.shuffle(stream)
        for start in range(0, len(stream), 7):
            collector.hold_s = rng.choice([0.0, 0.0, 60.0])  # some chunks persisted early, some held
            with collector.batch():
                for m in stream[start : start + rng.randint(1, 7)]:
                    collector.on_features("edge1", m)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_at_any_moment_loses_nothing_acknowledged(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "spool.sqlite"
    messages = _messages(12)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child is killed
        try:
            os.close(read_fd)
            _child(path, messages, write_fd, seed)
        finally:
            os._exit(1)
    os.close(write_fd)
    rng = random.Random(seed)
    want = rng.randint(5, 40)
    acks: list[tuple[str, int, int, bool]] = []
    buffer = b""
    deadline = time.monotonic() + 30
    try:
        while len(acks) < want and time.monotonic() < deadline:
            data = os.read(read_fd, 4096)
            if not data:
                break
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                kind, transfer, seq, done = line.decode().split()
                acks.append((kind, int(transfer), int(seq), done == "1"))
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_fd)
    assert len(acks) >= want, "the child stopped acknowledging"

    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    committed = {t for (t,) in db.execute("SELECT transfer FROM transfers WHERE node='edge1'")}
    persisted = set(db.execute("SELECT transfer, seq FROM chunks WHERE node='edge1'").fetchall())
    for kind, transfer, seq, done in acks:
        if kind != "chunk":
            continue
        if done:
            assert transfer in committed, f"transfer {transfer} was acknowledged, then lost"
        else:
            assert transfer in committed or (transfer, seq) in persisted, f"chunk {transfer}/{seq} lost"
    for (t,) in db.execute("SELECT transfer FROM transfers"):
        ids = [i for (i,) in db.execute("SELECT id FROM samples WHERE id / ? = ? ORDER BY id", (PER, t))]
        assert ids == list(range(t * PER, (t + 1) * PER))
    db.close()

    # The restarted cloud finishes the job from what is on disk plus the edge's resends: exactly once.
    spool = Spool(path)
    collector = Collector(spool, "job", {"edge1": PER}, lambda ack: None)
    for ms in messages:
        for m in ms:
            collector.on_features("edge1", m)
    assert spool.sample_ids("edge1") == list(range(12 * PER))
    assert spool.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] == 0
    expected = b"".join(_batch(t, LAYOUT, SAMPLE_BYTES).data for t in range(12))
    stored = b"".join(s.features for s in SpoolFeatures(spool, ["edge1"]).__getitems__(list(range(12 * PER))))
    assert stored == expected
    spool.close()


def _filled(tmp_path: Path, transfers: int = 5) -> Spool:
    spool = Spool(tmp_path / "spool.sqlite")
    for t in range(transfers):
        spool.commit_transfer("edge1", _batch(t, LAYOUT, SAMPLE_BYTES))
    return spool


def test_batched_reads_match_single_reads_in_the_order_asked(tmp_path: Path) -> None:
    spool = _filled(tmp_path)
    assert spool.db.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE
    data = SpoolFeatures(spool, ["edge1"])
    indices = [17, 3, 3, 39, 0, 22]
    batch = data.__getitems__(indices)
    assert batch == [data[i] for i in indices]
    assert [s.id for s in batch] == indices  # one node: rowid order is id order
    assert batch[0].layout is batch[1].layout  # parsed once, shared
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, collate_fn=list)
    assert sorted(s.id for b in loader for s in b) == list(range(40))
    with pytest.raises(KeyError):
        spool.read_many([10**9])
    spool.close()


def test_vectorised_unpack_equals_the_per_sample_decode(tmp_path: Path) -> None:
    spool = _filled(tmp_path, 2)
    samples = SpoolFeatures(spool, ["edge1"]).__getitems__(list(range(16)))
    fast = stack_features(samples)
    slow = [decode_features(s.layout, s.features, s.bits) for s in samples]
    assert fast.keys() == {1, 2}
    for layer in (1, 2):
        assert torch.equal(fast[layer], torch.stack([d[layer] for d in slow]))
        assert fast[layer].dtype == torch.float32
    batch = Classification(None).collate(samples)
    assert batch.targets.tolist() == [i % 10 for i in range(16)] and batch.features[1].shape == (16, 6, 14, 14)
    spool.close()


def test_unpack_of_samples_with_different_layouts_or_sizes(tmp_path: Path) -> None:
    layout_a = [FeatureLayout(layer=1, shape=[2, 4, 4])]
    layout_b = [FeatureLayout(layer=1, shape=[2, 4, 4])]  # equal, not the same object
    layout, packed = BitEncoder(100.0, seed=0).encode({1: torch.randn(3, 2, 4, 4)})
    samples = [
        StoredSample("a", 0, b"\x01", 1, layout_a, packed[0]),
        StoredSample("b", 1, b"\x02", 1, layout_b, packed[1]),
        StoredSample("b", 2, b"\x03", 1, layout, packed[2]),
    ]
    got = stack_features(samples)[1]
    assert torch.equal(got, torch.stack([decode_features(layout, p)[1] for p in packed]))
    short = [*samples[:2], samples[2]._replace(features=packed[2][:-1])]
    with pytest.raises(ProtocolError):  # a wrong size is refused, never read misaligned
        stack_features(short)


def test_feature_bytes_go_once_into_a_segment_file_and_the_wal_stays_small(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite")
    big = [FeatureLayout(layer=1, shape=[8, 128, 128])]  # 16 KiB a sample, 128 KiB a transfer
    for t in range(40):
        spool.commit_transfer("edge1", _batch(t, big, 16384))
    segments = sorted((tmp_path / "spool.segments").iterdir())
    assert [p.stat().st_size for p in segments] == [40 * PER * 16384]  # every byte once, nothing else
    # each commit writes a few index pages to the WAL, not its 128 KiB of features
    assert os.path.getsize(tmp_path / "spool.sqlite-wal") < 40 * 8 * PAGE_SIZE  # 1.3 MB against 5.2 MB
    assert spool.counts("edge1").samples == 40 * PER
    assert spool.read_many([1])[0].features == _batch(0, big, 16384).sample_data(0)
    spool.close()


def _commit_then_die(path: Path, transfer: int) -> None:
    """Append a transfer's bytes and fsync them, then die (kill -9) before the COMMIT."""
    spool = Spool(path)
    with spool.transaction():
        spool.insert_transfer("edge1", _batch(transfer, LAYOUT, SAMPLE_BYTES), 0)
        spool.segments.sync()
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_torn_segment_tail_is_never_read_and_cut_off_by_the_next_writer(tmp_path: Path) -> None:
    _filled(tmp_path, 3).close()
    segment = tmp_path / "spool.segments" / "000001.seg"
    committed = segment.stat().st_size
    assert committed == 3 * PER * SAMPLE_BYTES
    pid = os.fork()
    if pid == 0:  # pragma: no cover - killed
        try:
            _commit_then_die(tmp_path / "spool.sqlite", 3)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert segment.stat().st_size == committed + PER * SAMPLE_BYTES  # durable, but never committed
    with segment.open("ab") as f:
        f.write(b"\x5a" * 77)  # and a partial write on top
    spool = Spool(tmp_path / "spool.sqlite")
    assert spool.committed() == {"edge1": {0, 1, 2}} and spool.sample_ids("edge1") == list(range(3 * PER))
    data = SpoolFeatures(spool, ["edge1"])
    assert [s.features for s in data.__getitems__(list(range(3 * PER)))] == [
        _batch(t, LAYOUT, SAMPLE_BYTES).sample_data(i) for t in range(3) for i in range(PER)
    ]
    assert segment.stat().st_size > committed  # reading changes nothing
    spool.commit_transfer("edge1", _batch(3, LAYOUT, SAMPLE_BYTES, seed=5))  # another version of transfer 3
    assert segment.stat().st_size == committed + PER * SAMPLE_BYTES  # the tail was cut, then appended to
    got = SpoolFeatures(spool, ["edge1"]).__getitems__(list(range(3 * PER, 4 * PER)))
    assert [s.features for s in got] == [_batch(3, LAYOUT, SAMPLE_BYTES, seed=5).sample_data(i) for i in range(PER)]
    spool.close()


def test_a_rollback_cuts_its_bytes_and_damaged_bytes_are_refused(tmp_path: Path) -> None:
    spool = _filled(tmp_path, 2)
    segment = tmp_path / "spool.segments" / "000001.seg"
    with pytest.raises(RuntimeError), spool.transaction():
        spool.insert_transfer("edge1", _batch(2, LAYOUT, SAMPLE_BYTES), 0)
        raise RuntimeError("the batch failed")
    assert segment.stat().st_size == 2 * PER * SAMPLE_BYTES and spool.committed() == {"edge1": {0, 1}}
    with segment.open("r+b") as f:  # one bit flipped in sample 9
        f.seek(9 * SAMPLE_BYTES + 100)
        byte = f.read(1)[0]
        f.seek(9 * SAMPLE_BYTES + 100)
        f.write(bytes([byte ^ 1]))
    data = SpoolFeatures(spool, ["edge1"])
    assert data[8].features == _batch(1, LAYOUT, SAMPLE_BYTES).sample_data(0)
    with pytest.raises(DamagedSample, match=r"edge1/9: .*000001.seg at 1413 do not match their crc32"):
        data.__getitems__([8, 9])
    spool.close()
    os.truncate(segment, 5 * SAMPLE_BYTES)  # and cut short
    spool = Spool(tmp_path / "spool.sqlite")
    assert SpoolFeatures(spool, ["edge1"])[4].features == _batch(0, LAYOUT, SAMPLE_BYTES).sample_data(4)
    with pytest.raises(DamagedSample, match=r"000001.seg ends before byte 1570: the spool is damaged"):
        SpoolFeatures(spool, ["edge1"])[9]
    spool.close()


def test_a_spool_written_before_segment_files_is_read_and_extended(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / "spool.sqlite")
    old.executescript(
        "CREATE TABLE samples (node TEXT, id INTEGER, bits INTEGER, layout TEXT, label BLOB, features BLOB, "
        "PRIMARY KEY (node, id));"
        "CREATE TABLE transfers (node TEXT, transfer INTEGER, samples INTEGER, skipped INTEGER, wire_bytes INTEGER, "
        "PRIMARY KEY (node, transfer));"
    )
    layout = json.dumps([f.model_dump() for f in LAYOUT])
    old.execute("INSERT INTO samples VALUES ('edge1', 0, 1, ?, x'01', ?)", (layout, b"\x07" * SAMPLE_BYTES))
    old.execute("INSERT INTO transfers VALUES ('edge1', 0, 1, 0, 10)")
    old.commit()
    old.close()
    spool = Spool(tmp_path / "spool.sqlite")
    spool.commit_transfer("edge1", _batch(1, LAYOUT, SAMPLE_BYTES))
    data = SpoolFeatures(spool, ["edge1"])
    assert data[0].features == b"\x07" * SAMPLE_BYTES and data[0].label == b"\x01"
    assert data[1].features == _batch(1, LAYOUT, SAMPLE_BYTES).sample_data(0) and len(data) == 1 + PER
    spool.close()
