"""The cloud's on-disk spool: exactly-once storage of every edge's samples.

A transfer's samples are committed in one transaction keyed by (node, sample id), so redelivered
chunks and restarted edges or clouds can never store a sample twice or lose one already
acknowledged. Every feature byte is written to disk once: the collector assembles a transfer's
chunks in memory and, when the transfer is complete and verified, its feature bytes are appended to
a segment file (``spool.segments/NNNNNN.seg``, append-only) while SQLite keeps only the index (which
segment, offset, length and crc32 of each sample) and the commit records (``transfers``). A group
commit writes its segment bytes, fsyncs the segment, then commits the SQLite transaction: an index
row only ever points at bytes already on disk. Bytes appended by a transaction that never committed
(a crash, kill -9, a rollback) lie beyond the last indexed byte: readers never look there and the
next writer truncates them before it appends. Only the chunks of a transfer that stays incomplete
for a while are written to SQLite's ``chunks`` table (so they can be acknowledged), and those rows
are deleted when their transfer commits. Training streams from here, one query per batch and each
sample sliced from a read-only map of its segment (the page cache holds it, not the process), so
cloud memory does not grow with the data.

Before, the feature bytes went into SQLite itself (WAL, then checkpointed into the database): each
byte written twice; spools written that way are still read (their ``features`` column).

The database uses WAL with ``synchronous=NORMAL`` (a commit is a write to the WAL: safe against a
crash of this process at any moment; SQLite fsyncs at its checkpoints, which are small now).
"""

from __future__ import annotations

import functools
import json
import logging
import mmap
import os
import sqlite3
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from torch.utils.data import Dataset

from common.errors import ProtocolError
from common.protocol import FeatureBatch, FeatureLayout

SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    node TEXT, transfer INTEGER, seq INTEGER, total INTEGER, size INTEGER, digest BLOB,
    wire_bytes INTEGER, payload BLOB, PRIMARY KEY (node, transfer, seq));
CREATE TABLE IF NOT EXISTS transfers (
    node TEXT, transfer INTEGER, samples INTEGER, skipped INTEGER, wire_bytes INTEGER,
    PRIMARY KEY (node, transfer));
CREATE TABLE IF NOT EXISTS samples (
    node TEXT, id INTEGER, bits INTEGER, layout TEXT, label BLOB, features BLOB,
    segment INTEGER, offset INTEGER, length INTEGER, crc32 INTEGER,
    PRIMARY KEY (node, id));
CREATE TABLE IF NOT EXISTS skipped (
    node TEXT, id INTEGER, reason TEXT, PRIMARY KEY (node, id));
CREATE TABLE IF NOT EXISTS nodes (node TEXT PRIMARY KEY, total INTEGER);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS objects (
    node TEXT, transfer INTEGER, key TEXT, sha256 BLOB, size INTEGER, ids TEXT, PRIMARY KEY (node, transfer));
"""
# Columns a spool written before segment files lacks (its features are in ``samples.features``).
SEGMENT_COLUMNS = ("segment INTEGER", "offset INTEGER", "length INTEGER", "crc32 INTEGER")

log = logging.getLogger("mistnet.cloud.spool")

# Page size of a new spool (an existing one keeps its own): the database holds only the index and
# commit records, so SQLite's default; a group commit writes a few pages to the WAL, not megabytes.
PAGE_SIZE = 4096
# A new segment file is started at the first commit after the current one reached this size.
SEGMENT_BYTES = 1 << 30
SEGMENT_SUFFIX = ".seg"
# Most values bound in one ``IN (...)`` list (SQLite's limit is 32766 on current builds).
MAX_IN_LIST = 900


@dataclass(frozen=True)
class NodeCounts:
    samples: int
    skipped: int
    wire_bytes: int
    total: int | None

    @property
    def complete(self) -> bool:
        return self.total is not None and self.samples + self.skipped >= self.total


class StoredSample(NamedTuple):
    """One spooled sample (a named tuple: the trainer reads tens of thousands a second)."""

    node: str
    id: int
    label: bytes
    bits: int
    layout: list[FeatureLayout]
    features: bytes


class StoredChunk(NamedTuple):
    """A persisted (and acknowledged) chunk of a transfer that was not complete yet, without its payload."""

    node: str
    transfer: int
    seq: int
    total: int
    size: int
    digest: bytes
    wire_bytes: int


class StoredObject(NamedTuple):
    """The S3 object a transfer arrived as (S3 transmitter): where a shared feature store finds it."""

    node: str
    transfer: int
    key: str
    sha256: bytes
    size: int


class DamagedSample(ProtocolError):
    """Stored feature bytes that no longer match their digest (a damaged disk or object)."""


class Spool:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # only takes effect on a new database
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=10000")
        self.db.executescript(SCHEMA)
        _add_segment_columns(self.db)
        self.segments = Segments(path.with_suffix(".segments"))

    def close(self) -> None:
        self.segments.close()
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; inside another it simply joins it (the outer one commits). Segment
        bytes appended inside are on disk before the COMMIT, and cut off again by a rollback."""
        if self.db.in_transaction:
            yield self.db
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.segments.sync()
        except BaseException:
            self.db.execute("ROLLBACK")
            self.segments.rollback()
            raise
        self.db.execute("COMMIT")
        self.segments.committed()

    # collection ------------------------------------------------------------------------------

    def is_committed(self, node: str, transfer: int) -> bool:
        row = self.db.execute("SELECT 1 FROM transfers WHERE node=? AND transfer=?", (node, transfer)).fetchone()
        return row is not None

    def committed(self) -> dict[str, set[int]]:
        """Every committed transfer, by node (what a restarted collector keeps in memory)."""
        out: dict[str, set[int]] = {}
        for node, transfer in self.db.execute("SELECT node, transfer FROM transfers"):
            out.setdefault(str(node), set()).add(int(transfer))
        return out

    def append_features(self, batch: FeatureBatch) -> tuple[int, int]:
        """Append a transfer's feature bytes to the segment: (segment, offset) for
        :meth:`insert_transfer`; durable at the next commit (or ``segments.sync``)."""
        return self.segments.append(self, memoryview(batch.data)[: batch.sample_bytes * len(batch.ids)])

    def insert_transfer(
        self,
        node: str,
        batch: FeatureBatch,
        wire_bytes: int,
        obj: StoredObject | None = None,
        at: tuple[int, int] | None = None,
    ) -> None:
        """Write a verified transfer's index rows, skipped samples and commit record, its feature bytes
        appended first unless ``at`` says where :meth:`append_features` put them; call inside
        :meth:`transaction`. ``obj``: the S3 object it came as."""
        db = self.db
        layout = json.dumps([f.model_dump() for f in batch.layout])
        size = batch.sample_bytes
        data = memoryview(batch.data)
        segment, base = at or self.append_features(batch)
        # Named columns: a spool written before sample keys left the wire still has a key column.
        db.executemany(
            "INSERT OR IGNORE INTO samples (node, id, bits, layout, label, segment, offset, length, crc32) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (node, sid, batch.bits, layout, label, segment, base + i * size, size,
                 zlib.crc32(data[i * size : (i + 1) * size]))
                for i, (sid, label) in enumerate(zip(batch.ids, batch.labels, strict=True))
            ],
        )  # fmt: skip
        if batch.skipped:
            db.executemany(
                "INSERT OR IGNORE INTO skipped (node, id, reason) VALUES (?, ?, ?)",
                [(node, s.id, s.reason) for s in batch.skipped],
            )
        db.execute(
            "INSERT OR IGNORE INTO transfers VALUES (?, ?, ?, ?, ?)",
            (node, batch.transfer, len(batch.ids), len(batch.skipped), wire_bytes),
        )
        if obj is not None:
            db.execute("INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?)", (*obj, json.dumps(batch.ids)))

    def commit_transfer(self, node: str, batch: FeatureBatch, wire_bytes: int | None = None) -> None:
        """Store a verified transfer's samples and forget any of its persisted chunks, atomically.
        ``wire_bytes``: what the transfer cost (default: the sum over its persisted chunks)."""
        with self.transaction() as db:
            wire = wire_bytes
            if wire is None:
                wire = int(
                    db.execute(
                        "SELECT COALESCE(SUM(wire_bytes), 0) FROM chunks WHERE node=? AND transfer=?",
                        (node, batch.transfer),
                    ).fetchone()[0]
                )
            self.insert_transfer(node, batch, wire)
            self.drop_chunks(node, batch.transfer)

    def put_chunks(self, rows: list[tuple[StoredChunk, bytes]]) -> None:
        """Persist verified chunks of incomplete transfers (``(metadata, payload)``)."""
        self.db.executemany(
            "INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(*meta, payload) for meta, payload in rows],
        )

    def stored_chunks(self) -> list[StoredChunk]:
        """Metadata of every persisted chunk (no payloads): a restarted collector's assembly state."""
        rows = self.db.execute(
            "SELECT node, transfer, seq, total, size, digest, wire_bytes FROM chunks ORDER BY node, transfer, seq"
        )
        return [
            StoredChunk(str(n), int(t), int(s), int(tot), int(sz), bytes(d), int(w)) for n, t, s, tot, sz, d, w in rows
        ]

    def chunk_payloads(self, node: str, transfer: int) -> dict[int, bytes]:
        rows = self.db.execute("SELECT seq, payload FROM chunks WHERE node=? AND transfer=?", (node, transfer))
        return {int(seq): bytes(payload) for seq, payload in rows}

    def drop_chunks(self, node: str, transfer: int) -> None:
        self.db.execute("DELETE FROM chunks WHERE node=? AND transfer=?", (node, transfer))

    def committed_transfers(self, node: str) -> list[int]:
        rows = self.db.execute("SELECT transfer FROM transfers WHERE node=? ORDER BY transfer", (node,))
        return [int(r[0]) for r in rows]

    def resume_point(self, node: str) -> tuple[int, list[int]]:
        """(transfers committed without gap, transfers committed beyond that)."""
        done = self.committed_transfers(node)
        nxt = 0
        for t in done:
            if t != nxt:
                break
            nxt += 1
        return nxt, [t for t in done if t > nxt]

    def set_total(self, node: str, total: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO nodes VALUES (?, ?)", (node, total))

    def counts(self, node: str) -> NodeCounts:
        samples, skipped, wire = self.db.execute(
            "SELECT COALESCE(SUM(samples),0), COALESCE(SUM(skipped),0), COALESCE(SUM(wire_bytes),0) "
            "FROM transfers WHERE node=?",
            (node,),
        ).fetchone()
        row = self.db.execute("SELECT total FROM nodes WHERE node=?", (node,)).fetchone()
        return NodeCounts(int(samples), int(skipped), int(wire), None if row is None else int(row[0]))

    def sample_ids(self, node: str) -> list[int]:
        return [int(r[0]) for r in self.db.execute("SELECT id FROM samples WHERE node=? ORDER BY id", (node,))]

    # training --------------------------------------------------------------------------------

    def rowids(self, nodes: list[str]) -> list[int]:
        """Samples in (node, id) order, not arrival order: retransmissions, reordering and restarts
        change when a transfer arrives, never what the trainer sees (same data + seed = same model)."""
        marks = ",".join("?" * len(nodes))
        rows = self.db.execute(f"SELECT rowid FROM samples WHERE node IN ({marks}) ORDER BY node, id", nodes)
        return [int(r[0]) for r in rows]

    def read(self, rowid: int) -> StoredSample:
        return self.read_many([rowid])[0]

    def read_many(self, rowids: list[int]) -> list[StoredSample]:
        """Samples by rowid, in the order asked (repeats allowed), one query per ``MAX_IN_LIST``;
        each sample's bytes are checked against its crc32 (:class:`DamagedSample` when they differ)."""
        found: dict[int, StoredSample] = {}
        read = self.segments.read
        for start in range(0, len(rowids), MAX_IN_LIST):
            part = rowids[start : start + MAX_IN_LIST]
            rows = self.db.execute(
                "SELECT rowid, node, id, label, bits, layout, features, segment, offset, length, crc32 FROM samples "
                f"WHERE rowid IN ({','.join('?' * len(part))})",
                part,
            )
            for rowid, node, sid, label, bits, layout, features, segment, offset, length, crc in rows:
                if features is None:
                    features = read(segment, offset, length)
                    if zlib.crc32(features) != crc:
                        raise DamagedSample(
                            f"spooled sample {node}/{sid}: its bytes in {self.segments.file(segment)} at {offset} "
                            "do not match their crc32 (the disk is damaged)"
                        )
                found[rowid] = StoredSample(node, sid, label, bits, _layout(layout), features)
        try:
            return [found[r] for r in rowids]
        except KeyError as exc:
            raise KeyError(f"no spooled sample with rowid {exc.args[0]}") from None

    def objects(self) -> list[tuple[StoredObject, list[int]]]:
        """The S3 objects committed transfers arrived as, with their sample ids, in (node, transfer) order."""
        rows = self.db.execute("SELECT node, transfer, key, sha256, size, ids FROM objects ORDER BY node, transfer")
        return [(StoredObject(str(n), int(t), str(k), bytes(d), int(z)), json.loads(i)) for n, t, k, d, z, i in rows]

    # state -----------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


class FeatureStore(Dataset[StoredSample], ABC):
    """A job's samples in (node, id) order, wherever they are kept (this spool, or S3 for training
    ranks on other nodes: ``cloud_agent.feature_store``); ``__getitems__`` reads a whole batch."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitems__(self, indices: list[int]) -> list[StoredSample]: ...

    def __getitem__(self, index: int) -> StoredSample:
        return self.__getitems__([index])[0]


class SpoolFeatures(FeatureStore):
    """Reads samples from disk on demand: memory does not grow with the data. The DataLoader asks
    for a whole batch at once (``__getitems__``): one query per batch, not one per sample."""

    def __init__(self, spool: Spool, nodes: list[str]) -> None:
        self.spool = spool
        self.rowids = spool.rowids(nodes)

    def __len__(self) -> int:
        return len(self.rowids)

    def __getitems__(self, indices: list[int]) -> list[StoredSample]:
        rowids = self.rowids
        return self.spool.read_many([rowids[i] for i in indices])


class Segments:
    """Append-only files of feature bytes. Appends go after the last committed byte; a commit makes
    them durable (fsync) before SQLite commits the rows that point at them. The writer opens lazily:
    a spool opened only to read never truncates anything, and a writer first cuts off what lies
    beyond the last indexed byte (a torn tail left by a crash)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.sync_writes = True  # off only to measure what the fsyncs cost (bench.procs --no-segment-sync)
        self.maps: dict[int, mmap.mmap] = {}
        self.current = 0  # the segment being appended to; 0: writer not open
        self.fd = -1
        self.end = 0  # committed bytes of the current segment
        self.pending = 0  # end of the bytes appended by the open transaction
        self.synced = 0  # end of the bytes known durable

    def file(self, segment: int) -> Path:
        return self.folder / f"{segment:06d}{SEGMENT_SUFFIX}"

    def append(self, spool: Spool, data: memoryview) -> tuple[int, int]:
        """Write ``data`` after what is there; returns (segment, offset)."""
        if self.fd < 0:
            self._open_writer(spool)
        elif self.pending == self.end and self.end >= SEGMENT_BYTES:
            self._start(self.current + 1, 0)
        offset = self.pending
        written = 0
        while written < len(data):
            written += os.pwrite(self.fd, data[written:], offset + written)
        self.pending = offset + len(data)
        return self.current, offset

    def sync(self) -> None:
        """Make the appended bytes durable (thread-safe against reads; one syncing thread at a time)."""
        pending = self.pending
        if pending > self.synced and self.sync_writes:
            os.fdatasync(self.fd)
        self.synced = max(self.synced, pending)

    def committed(self) -> None:
        self.end = self.pending

    def rollback(self) -> None:
        if self.pending != self.end:
            os.ftruncate(self.fd, self.end)
            self.pending = self.synced = self.end

    def read(self, segment: int, offset: int, length: int) -> bytes:
        """Through a read-only map of the segment (a slice, no system call per sample), mapped again
        when it has grown since."""
        end = offset + length
        view = self.maps.get(segment)
        if view is None or end > len(view):
            view = self._map(segment, end)
        return view[offset:end]

    def _map(self, segment: int, end: int) -> mmap.mmap:
        old = self.maps.pop(segment, None)
        if old is not None:
            old.close()
        with self.file(segment).open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < end:
                raise DamagedSample(f"{self.file(segment)} ends before byte {end}: the spool is damaged")
            view = self.maps[segment] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return view

    def close(self) -> None:
        for view in self.maps.values():
            view.close()
        self.maps.clear()
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def _open_writer(self, spool: Spool) -> None:
        """Cut every segment back to its last indexed byte, then append to the newest."""
        self.folder.mkdir(parents=True, exist_ok=True)
        ends = dict(spool.db.execute("SELECT segment, MAX(offset + length) FROM samples GROUP BY segment"))
        ends.pop(None, None)  # samples of a spool written before segment files
        for path in sorted(self.folder.glob(f"*{SEGMENT_SUFFIX}")):
            segment, size = int(path.stem), path.stat().st_size
            if size > ends.get(segment, 0):
                log.info("%s: %d bytes after the last committed sample dropped", path, size - ends.get(segment, 0))
                os.truncate(path, ends.get(segment, 0))
            ends.setdefault(segment, 0)
        newest = max(ends, default=1)
        self._start(newest, int(ends.get(newest, 0)))

    def _start(self, segment: int, end: int) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = os.open(self.file(segment), os.O_WRONLY | os.O_CREAT, 0o644)
        self.current, self.end, self.pending, self.synced = segment, end, end, end
        if self.sync_writes:  # the new file's name is durable before any row points into it
            folder = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)


def _add_segment_columns(db: sqlite3.Connection) -> None:
    """A spool written before segment files gets their columns (its own rows keep ``features``)."""
    have = {row[1] for row in db.execute("PRAGMA table_info(samples)")}
    for column in SEGMENT_COLUMNS:
        if column.split()[0] not in have:
            db.execute(f"ALTER TABLE samples ADD COLUMN {column}")


@functools.lru_cache(maxsize=64)
def _layout(text: str) -> list[FeatureLayout]:
    """Parsed once per distinct layout: samples that share one get the same list object."""
    return [FeatureLayout.model_validate(f) for f in json.loads(text)]
