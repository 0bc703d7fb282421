"""The cloud's on-disk spool (SQLite): exactly-once storage of every edge's samples.

A transfer's samples are committed in one transaction keyed by (node, sample id), so redelivered
chunks and restarted edges or clouds can never store a sample twice or lose one already
acknowledged. Every feature byte is written once: the collector assembles a transfer's chunks in
memory and writes its samples when the transfer is complete and verified; only the chunks of a
transfer that stays incomplete for a while are written to ``chunks`` (so they can be acknowledged),
and those rows are deleted when their transfer commits. Training streams from here, one query per
batch, so cloud memory does not grow with the data.

The database uses WAL with ``synchronous=NORMAL`` (a commit is a write to the WAL, no fsync: safe
against a crash of this process at any moment; the fsyncs happen at checkpoints) and large pages
(feature blobs cost one WAL frame per page, so 64 KiB pages write a megabyte in 16 frames instead
of 256). Once a spool has been written to, a background thread with its own connection
checkpoints the WAL (copies it into the database, with its two fsyncs) every ``CHECKPOINT_BYTES``
or so, off the collector's path: a checkpoint of 64 MB takes ~150 ms, mostly fsync, during which
the collector would otherwise acknowledge nothing. SQLite's own autocheckpoint stays on, at a
higher mark, as a backstop.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from torch.utils.data import Dataset

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
    PRIMARY KEY (node, id));
CREATE TABLE IF NOT EXISTS skipped (
    node TEXT, id INTEGER, reason TEXT, PRIMARY KEY (node, id));
CREATE TABLE IF NOT EXISTS nodes (node TEXT PRIMARY KEY, total INTEGER);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""

log = logging.getLogger("mistnet.cloud.spool")

# Page size of a new spool (an existing one keeps its own): SQLite writes a WAL frame per page,
# so feature blobs written in 64 KiB pages cost 16x fewer frames (and system calls) than in 4 KiB.
PAGE_SIZE = 65536
# The background checkpoint runs when about this much has been written since the last one (and at
# least every CHECKPOINT_INTERVAL_S while there is something to copy); SQLite's default, 1000
# pages, is every 4 MB with 4 KiB pages: two fsyncs every few transfers, on the writer's path.
CHECKPOINT_BYTES = 32 * 1024 * 1024
CHECKPOINT_INTERVAL_S = 2.0
# The writer's own autocheckpoint (a backstop should the background one fall behind), and the size
# the WAL file is truncated back to after a checkpoint.
WAL_LIMIT_BYTES = 256 * 1024 * 1024
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


class Spool:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # only takes effect on a new database
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=10000")
        page = int(self.db.execute("PRAGMA page_size").fetchone()[0])
        self.db.execute(f"PRAGMA wal_autocheckpoint={max(1000, WAL_LIMIT_BYTES // page)}")
        self.db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        self.db.executescript(SCHEMA)
        self._checkpointer: _Checkpointer | None = None

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; inside another it simply joins it (the outer one commits)."""
        if self.db.in_transaction:
            yield self.db
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def written(self, nbytes: int) -> None:
        """Note bytes committed to the WAL; the background checkpoint runs when enough have piled up."""
        if self._checkpointer is None:
            self._checkpointer = _Checkpointer(self.path)
        self._checkpointer.add(nbytes)

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

    def insert_transfer(self, node: str, batch: FeatureBatch, wire_bytes: int) -> None:
        """Write a verified transfer's samples, skipped samples and its row; call inside
        :meth:`transaction`. Feature bytes are bound as views of ``batch.data``: written once."""
        db = self.db
        layout = json.dumps([f.model_dump() for f in batch.layout])
        size = batch.sample_bytes
        data = memoryview(batch.data)
        # Named columns: a spool written before sample keys left the wire still has a key column.
        db.executemany(
            "INSERT OR IGNORE INTO samples (node, id, bits, layout, label, features) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (node, sid, batch.bits, layout, label, data[i * size : (i + 1) * size])
                for i, (sid, label) in enumerate(zip(batch.ids, batch.labels, strict=True))
            ],
        )
        if batch.skipped:
            db.executemany(
                "INSERT OR IGNORE INTO skipped (node, id, reason) VALUES (?, ?, ?)",
                [(node, s.id, s.reason) for s in batch.skipped],
            )
        db.execute(
            "INSERT OR IGNORE INTO transfers VALUES (?, ?, ?, ?, ?)",
            (node, batch.transfer, len(batch.ids), len(batch.skipped), wire_bytes),
        )

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
        self.written(len(batch.data))

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
        """Samples by rowid, in the order asked (repeats allowed), one query per ``MAX_IN_LIST``."""
        found: dict[int, StoredSample] = {}
        for start in range(0, len(rowids), MAX_IN_LIST):
            part = rowids[start : start + MAX_IN_LIST]
            rows = self.db.execute(
                "SELECT rowid, node, id, label, bits, layout, features FROM samples "
                f"WHERE rowid IN ({','.join('?' * len(part))})",
                part,
            )
            for rowid, node, sid, label, bits, layout, features in rows:
                found[rowid] = StoredSample(node, sid, label, bits, _layout(layout), features)
        try:
            return [found[r] for r in rowids]
        except KeyError as exc:
            raise KeyError(f"no spooled sample with rowid {exc.args[0]}") from None

    # state -----------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


class SpoolFeatures(Dataset[StoredSample]):
    """Reads samples from disk on demand: memory does not grow with the data. The DataLoader asks
    for a whole batch at once (``__getitems__``): one query per batch, not one per sample."""

    def __init__(self, spool: Spool, nodes: list[str]) -> None:
        self.spool = spool
        self.rowids = spool.rowids(nodes)

    def __len__(self) -> int:
        return len(self.rowids)

    def __getitem__(self, index: int) -> StoredSample:
        return self.spool.read(self.rowids[index])

    def __getitems__(self, indices: list[int]) -> list[StoredSample]:
        rowids = self.rowids
        return self.spool.read_many([rowids[i] for i in indices])


class _Checkpointer:
    """Checkpoints the WAL from a thread of its own, on its own connection (SQLite releases the GIL
    meanwhile): PASSIVE, so it never blocks the writer or readers, and copies only what is committed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pending = 0
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="spool-checkpoint", daemon=True)
        self.thread.start()

    def add(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= CHECKPOINT_BYTES:
            self.wake.set()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join()

    def _run(self) -> None:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            log.warning("background checkpoints of %s are off (%s)", self.path, exc)
            return
        try:
            db.execute("PRAGMA busy_timeout=1000")
            while not self.stopping:
                self.wake.wait(CHECKPOINT_INTERVAL_S)
                self.wake.clear()
                if self.stopping or not self.pending:
                    continue
                self.pending = 0
                db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # the writer's autocheckpoint still bounds the WAL
            log.warning("background checkpoint of %s failed (%s); SQLite's own takes over", self.path, exc)
        finally:
            db.close()


@functools.lru_cache(maxsize=64)
def _layout(text: str) -> list[FeatureLayout]:
    """Parsed once per distinct layout: samples that share one get the same list object."""
    return [FeatureLayout.model_validate(f) for f in json.loads(text)]
