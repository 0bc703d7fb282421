"""The cloud's on-disk spool (SQLite): exactly-once storage of every edge's samples.

A chunk is acknowledged only after it is stored here, and a transfer's samples are committed in
one transaction keyed by (node, sample id), so redelivered chunks and restarted edges or clouds
can never store a sample twice or lose one already acknowledged. Training streams from here, so
cloud memory does not grow with the data.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from common.protocol import Chunk, FeatureBatch, FeatureLayout

SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    node TEXT, transfer INTEGER, seq INTEGER, total INTEGER, size INTEGER, digest BLOB,
    wire_bytes INTEGER, payload BLOB, PRIMARY KEY (node, transfer, seq));
CREATE TABLE IF NOT EXISTS transfers (
    node TEXT, transfer INTEGER, samples INTEGER, skipped INTEGER, wire_bytes INTEGER,
    PRIMARY KEY (node, transfer));
CREATE TABLE IF NOT EXISTS samples (
    node TEXT, id INTEGER, key TEXT, bits INTEGER, layout TEXT, label BLOB, features BLOB,
    PRIMARY KEY (node, id));
CREATE TABLE IF NOT EXISTS skipped (
    node TEXT, id INTEGER, key TEXT, reason TEXT, PRIMARY KEY (node, id));
CREATE TABLE IF NOT EXISTS nodes (node TEXT PRIMARY KEY, total INTEGER);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


@dataclass(frozen=True)
class NodeCounts:
    samples: int
    skipped: int
    wire_bytes: int
    total: int | None

    @property
    def complete(self) -> bool:
        return self.total is not None and self.samples + self.skipped >= self.total


@dataclass(frozen=True)
class StoredSample:
    node: str
    id: int
    label: bytes
    bits: int
    layout: list[FeatureLayout]
    features: bytes


class Spool:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # collection ------------------------------------------------------------------------------

    def is_committed(self, node: str, transfer: int) -> bool:
        row = self.db.execute("SELECT 1 FROM transfers WHERE node=? AND transfer=?", (node, transfer)).fetchone()
        return row is not None

    def put_chunk(self, chunk: Chunk, wire_bytes: int) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                chunk.node,
                chunk.transfer,
                chunk.seq,
                chunk.total,
                chunk.size,
                chunk.transfer_sha256,
                wire_bytes,
                chunk.payload,
            ),
        )

    def stored_chunks(self, node: str, transfer: int) -> int:
        return int(
            self.db.execute("SELECT COUNT(*) FROM chunks WHERE node=? AND transfer=?", (node, transfer)).fetchone()[0]
        )

    def assembled(self, node: str, transfer: int) -> tuple[list[bytes], int, bytes]:
        """Payloads in seq order, with the size and digest that chunk 0 claims for the whole."""
        rows = self.db.execute(
            "SELECT payload, size, digest FROM chunks WHERE node=? AND transfer=? ORDER BY seq", (node, transfer)
        ).fetchall()
        return [bytes(r[0]) for r in rows], int(rows[0][1]), bytes(rows[0][2])

    def drop_chunks(self, node: str, transfer: int) -> None:
        self.db.execute("DELETE FROM chunks WHERE node=? AND transfer=?", (node, transfer))

    def commit_transfer(self, node: str, batch: FeatureBatch, wire_bytes: int | None = None) -> None:
        """Store a verified transfer's samples and forget its chunks, atomically. ``wire_bytes``: what
        the transfer cost (default: the sum over its stored chunks)."""
        with self.transaction() as db:
            wire = wire_bytes
            if wire is None:
                wire = db.execute(
                    "SELECT COALESCE(SUM(wire_bytes), 0) FROM chunks WHERE node=? AND transfer=?",
                    (node, batch.transfer),
                ).fetchone()[0]
            layout = json.dumps([f.model_dump() for f in batch.layout])
            keys = batch.keys or [""] * len(batch.ids)
            db.executemany(
                "INSERT OR IGNORE INTO samples VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (node, sid, key, batch.bits, layout, label, batch.sample_data(i))
                    for i, (sid, key, label) in enumerate(zip(batch.ids, keys, batch.labels, strict=True))
                ],
            )
            db.executemany(
                "INSERT OR IGNORE INTO skipped VALUES (?, ?, ?, ?)",
                [(node, s.id, s.key, s.reason) for s in batch.skipped],
            )
            db.execute(
                "INSERT OR IGNORE INTO transfers VALUES (?, ?, ?, ?, ?)",
                (node, batch.transfer, len(batch.ids), len(batch.skipped), wire),
            )
            db.execute("DELETE FROM chunks WHERE node=? AND transfer=?", (node, batch.transfer))

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
        node, sid, bits, layout, label, features = self.db.execute(
            "SELECT node, id, bits, layout, label, features FROM samples WHERE rowid=?", (rowid,)
        ).fetchone()
        return StoredSample(node, int(sid), bytes(label), int(bits), _layout(layout), bytes(features))

    # state -----------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


class SpoolFeatures(Dataset[StoredSample]):
    """Reads samples from disk on demand: memory does not grow with the data."""

    def __init__(self, spool: Spool, nodes: list[str]) -> None:
        self.spool = spool
        self.rowids = spool.rowids(nodes)

    def __len__(self) -> int:
        return len(self.rowids)

    def __getitem__(self, index: int) -> StoredSample:
        return self.spool.read(self.rowids[index])


@functools.lru_cache(maxsize=64)
def _layout(text: str) -> list[FeatureLayout]:
    return [FeatureLayout.model_validate(f) for f in json.loads(text)]
