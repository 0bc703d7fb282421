"""Receives feature chunks: verify, persist, acknowledge, and commit whole transfers.

An acknowledgement means "verified and persisted", and every feature byte is written to the spool
once:

- Each chunk is checked against its own sha256 on arrival; a corrupt one is rejected at once (so
  the edge resends it instead of waiting for its retransmission timer). Verified chunks of a
  transfer are assembled in memory. When the last one is in, the whole transfer is verified (size
  and its digest over the chunks' digests, then its msgpack and sample ids) and its samples are
  written to the spool; only after that COMMIT is the transfer acknowledged (one acknowledgement
  with ``transfer_done``, which settles all its chunks at the edge).
- The collector works in batches (:meth:`Collector.batch`: the cloud agent opens one per inbox
  drain): everything a batch stores goes into one spool transaction (its feature bytes appended
  to a segment file and fsync'd, then one SQLite COMMIT of their index rows), and the batch's
  acknowledgements (and rejections) are published after its COMMIT. Pipelined (as the cloud agent
  runs it), a batch of commits hands its fsync to a thread and the next messages are handled
  meanwhile; the batch is committed and acknowledged as soon as the fsync is done.
- Chunks of a transfer that stays incomplete longer than ``hold_s`` (an edge whose window is
  smaller than a transfer, a slow or rate-limited link, a lost chunk), or while more than
  ``max_held_bytes`` wait in memory, are written to the ``chunks`` table and acknowledged one by
  one; their transfer's commit deletes those rows. That is the only path that writes a byte twice.
- Which transfers are committed, and which chunks of unfinished transfers are persisted, is kept
  in memory and rebuilt from the spool when the cloud restarts. Chunks held in memory and not yet
  acknowledged are simply lost by a crash: the edge still has them in its window and resends them.

Duplicates are re-acknowledged, never stored twice. When chunks of a transfer arrive with another
transfer sha256 than the chunks before (an edge that restarted re-extracts a transfer with fresh
randomization), the newer version replaces the older; late chunks of the older are ignored.

With the S3 transmitter a transfer arrives as a :class:`FeatureObject` claim instead: the object is
downloaded (its size checked before reading), verified against the claim's sha256, committed and
acknowledged as the transfer's only chunk. A damaged or missing object is rejected (the edge
uploads it again); an unreachable store gets no acknowledgement, so the edge's retransmission
timer retries later.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from cloud_agent.spool import Spool, StoredChunk, StoredObject
from common.errors import ProtocolError, TransportError
from common.protocol import (
    Ack,
    AckKind,
    Chunk,
    FeatureBatch,
    FeatureObject,
    NodeState,
    NodeStatus,
    Topics,
    decode_batch,
    join_transfer,
    parse_feature_message,
)
from common.transport import Rejections

log = logging.getLogger("mistnet.cloud.collector")

# fetch(claim) -> the object's bytes (ProtocolError: damaged or missing; TransportError: store unreachable)
Fetch = Callable[[FeatureObject], bytes]

# How long chunks of an incomplete transfer may wait in memory, unacknowledged, before they are
# persisted and acknowledged one by one (far below the edge's 10 s retransmission timer).
HOLD_S = 0.2
# At most this many chunk bytes wait in memory; beyond it the oldest transfers are persisted.
MAX_HELD_BYTES = 64 * 1024 * 1024
# How often the inbox is looked at while a pipelined batch waits for its fsync (then committed).
PENDING_POLL_S = 0.001
# A batch commits (and acknowledges) at least every this many bytes of feature messages.
MAX_BATCH_BYTES = 32 * 1024 * 1024


@dataclass
class _Held:
    """A verified chunk in memory: not persisted, not acknowledged."""

    payload: bytes
    sha256: bytes  # checked on arrival; the transfer's digest is computed over these
    wire_bytes: int


@dataclass
class _Assembly:
    """One incomplete transfer: chunks held in memory and chunks already persisted."""

    node: str
    transfer: int
    total: int
    size: int
    digest: bytes
    held: dict[int, _Held] = field(default_factory=dict)
    stored: dict[int, int] = field(default_factory=dict)  # seq -> wire bytes: persisted and acknowledged
    since: float = 0.0  # when the oldest held chunk arrived (monotonic)
    superseded: set[bytes] = field(default_factory=set)  # digests of earlier versions of this transfer

    @property
    def complete(self) -> bool:
        return len(self.held) + len(self.stored) >= self.total

    @property
    def held_bytes(self) -> int:
        return sum(len(h.payload) for h in self.held.values())

    def matches(self, chunk: Chunk) -> bool:
        return (chunk.total, chunk.size, chunk.transfer_sha256) == (self.total, self.size, self.digest)


@dataclass
class _Commit:
    node: str
    batch: FeatureBatch
    wire_bytes: int
    had_stored: bool  # persisted chunks of this transfer to delete
    obj: StoredObject | None = None  # the S3 object it arrived as


@dataclass
class _Group:
    """A batch's commits whose feature bytes are appended and being fsync'd by the syncer thread:
    committed (index rows, COMMIT) and acknowledged by :meth:`Collector.settle`."""

    commits: list[_Commit]
    at: list[tuple[int, int]]  # where each commit's bytes are in the segment
    acks: list[Ack]
    synced: Future[None]


class Collector:
    def __init__(
        self,
        spool: Spool,
        job: str,
        nodes: dict[str, int],
        send_ack: Callable[[Ack], None],
        fetch: Fetch | None = None,
        object_prefix: Callable[[str], str] | None = None,
        pipeline: bool = False,
    ) -> None:
        """``nodes`` maps each expected edge to its samples per transfer (its batch size); ``fetch`` and
        ``object_prefix`` (node -> the key prefix its objects must have) enable the S3 transmitter;
        ``pipeline``: a batch of commits is committed and acknowledged at the next flush, its fsync
        running meanwhile (the cloud agent's loop flushes again at once while one is pending)."""
        self.spool = spool
        self.job = job
        self.nodes = nodes
        self.send_ack = send_ack
        self.fetch = fetch
        self.object_prefix = object_prefix
        self.rejected: Counter[str] = Counter()
        self.reject = Rejections(log, self.rejected)
        self.duplicates = 0
        self.duplicates_by_node: Counter[str] = Counter()
        self.greeted: set[str] = set()
        self.store_error = ""
        self.spilled = 0  # chunks persisted before their transfer was complete (the bytes written twice)
        self.hold_s = HOLD_S
        self.max_held_bytes = MAX_HELD_BYTES
        self.max_batch_bytes = MAX_BATCH_BYTES
        # Overlap a batch's fsync with handling the next batch's messages (see :meth:`flush`).
        self.pipeline = pipeline
        self._syncer: ThreadPoolExecutor | None = None
        self._pending: _Group | None = None
        self._settling: set[tuple[str, int]] = set()
        # Rebuilt from the spool: what is committed, and what is persisted of unfinished transfers.
        self.committed: dict[str, set[int]] = spool.committed()
        self.assemblies: dict[tuple[str, int], _Assembly] = {}
        self.held_bytes = 0
        self._depth = 0
        self._batch_bytes = 0
        self._commits: list[_Commit] = []
        self._committing: set[tuple[str, int]] = set()
        self._drops: set[tuple[str, int]] = set()  # persisted chunks to delete (superseded or corrupt)
        self._acks: list[Ack] = []
        self._dup_acked: set[tuple[str, int]] = set()
        self._rebuild(spool.stored_chunks())

    def _rebuild(self, chunks: list[StoredChunk]) -> None:
        for c in chunks:
            key = (c.node, c.transfer)
            if c.transfer in self.committed.get(c.node, ()):
                self._drops.add(key)  # left behind by an older version of the spool: never needed
                continue
            asm = self.assemblies.get(key)
            if asm is None:
                asm = self.assemblies[key] = _Assembly(c.node, c.transfer, c.total, c.size, c.digest)
            if (c.total, c.size, c.digest) != (asm.total, asm.size, asm.digest):
                self._drops.add(key)
                continue
            asm.stored[c.seq] = c.wire_bytes
        for key in self._drops:
            self.assemblies.pop(key, None)
        if self.assemblies:
            log.info("%d unfinished transfer(s) resumed from the spool", len(self.assemblies))

    # batches -------------------------------------------------------------------------------------

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Messages handled inside are committed in one transaction, acknowledged after it (nested
        batches join the outer one). Outside a batch every message is a batch of its own."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.flush()

    def wait_s(self, timeout_s: float) -> float:
        """How long the inbox may be waited on: ``timeout_s``, or less when held chunks are due; not at
        all while a batch waits to be committed."""
        if self._pending is not None:
            return min(timeout_s, PENDING_POLL_S)
        if not self.held_bytes:
            return timeout_s
        due = min(a.since for a in self.assemblies.values() if a.held) + self.hold_s
        return max(0.0, min(timeout_s, due - time.monotonic()))

    def flush(self) -> None:
        """Persist what this batch verified in one transaction, then publish its acknowledgements.
        Pipelined, a batch of commits only (the steady stream) is appended and handed to the syncer
        thread instead, and committed by the next flush."""
        self.settle()
        spills = self._due_spills()
        if not (self._commits or spills or self._drops or self._acks):
            return
        if self.pipeline and self._commits and not spills and not self._drops:
            self._start_group()
            return
        rows: list[tuple[StoredChunk, bytes]] = []
        spilled: list[tuple[_Assembly, int, _Held]] = []
        for asm in spills:
            for seq in sorted(asm.held):
                held = asm.held[seq]
                meta = StoredChunk(asm.node, asm.transfer, seq, asm.total, asm.size, asm.digest, held.wire_bytes)
                rows.append((meta, held.payload))
                spilled.append((asm, seq, held))
        commits, drops = self._commits, self._drops
        try:
            if commits or rows or drops:
                with self.spool.transaction():
                    for key in drops:
                        self.spool.drop_chunks(*key)
                    for c in commits:
                        self.spool.insert_transfer(c.node, c.batch, c.wire_bytes, c.obj)
                        if c.had_stored:
                            self.spool.drop_chunks(c.node, c.batch.transfer)
                    if rows:
                        self.spool.put_chunks(rows)
        except BaseException:
            # Nothing of this batch is acknowledged: the edges resend it. Stale rows stay to delete.
            self._reset_batch(keep_drops=True)
            raise
        # Committed: now it may be said.
        for c in commits:
            self.committed.setdefault(c.node, set()).add(c.batch.transfer)
        for asm, seq, held in spilled:
            self._drop_held(asm, seq)
            asm.stored[seq] = held.wire_bytes
            self._ack(asm.node, asm.transfer, seq, done=False)
        self.spilled += len(spilled)
        acks = self._acks
        self._reset_batch()
        for ack in acks:
            self.send_ack(ack)

    def _start_group(self) -> None:
        commits, acks = self._commits, self._acks
        try:
            at = [self.spool.append_features(c.batch) for c in commits]
        except BaseException:
            self.spool.segments.rollback()
            self._reset_batch(keep_drops=True)
            raise
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(1, thread_name_prefix="spool-sync")
        self._pending = _Group(commits, at, acks, self._syncer.submit(self.spool.segments.sync))
        self._settling = {(c.node, c.batch.transfer) for c in commits}
        self._reset_batch()

    def settle(self) -> None:
        """Commit the pending batch once its bytes are durable, then publish its acknowledgements."""
        group, self._pending = self._pending, None
        if group is None:
            return
        try:
            try:
                group.synced.result()
            except BaseException:
                self.spool.segments.rollback()
                raise
            with self.spool.transaction():
                for c, at in zip(group.commits, group.at, strict=True):
                    self.spool.insert_transfer(c.node, c.batch, c.wire_bytes, c.obj, at)
                    if c.had_stored:
                        self.spool.drop_chunks(c.node, c.batch.transfer)
        finally:
            self._settling = set()  # committed now, or never acknowledged (the edges resend)
        for c in group.commits:
            self.committed.setdefault(c.node, set()).add(c.batch.transfer)
        for ack in group.acks:
            self.send_ack(ack)

    def close(self) -> None:
        """Settle what is pending and stop the syncer thread."""
        try:
            self.settle()
        finally:
            if self._syncer is not None:
                self._syncer.shutdown()
                self._syncer = None

    def _reset_batch(self, keep_drops: bool = False) -> None:
        self._commits, self._acks = [], []
        if not keep_drops:
            self._drops = set()
        self._committing.clear()
        self._dup_acked.clear()
        self._batch_bytes = 0

    def _due_spills(self) -> list[_Assembly]:
        if not self.held_bytes:
            return []
        now = time.monotonic()
        waiting = sorted((a for a in self.assemblies.values() if a.held), key=lambda a: a.since)
        due = [a for a in waiting if now - a.since >= self.hold_s]
        excess = self.held_bytes - self.max_held_bytes - sum(a.held_bytes for a in due)
        for a in waiting:
            if excess <= 0:
                break
            if a not in due:
                due.append(a)
                excess -= a.held_bytes
        return due

    # feature messages ----------------------------------------------------------------------------

    def on_features(self, node: str, payload: bytes) -> None:
        if self._pending is not None and self._pending.synced.done():
            self.settle()  # its acknowledgements go out now, not after this whole batch
        with self.batch():
            try:
                message = self._parse(node, payload)
            except ProtocolError as exc:
                self.reject("features", Topics.features(node, self.job), exc)
                return
            if isinstance(message, FeatureObject):
                self.on_object(node, message, len(payload))
            else:
                self._on_chunk(node, message, len(payload))
            self._batch_bytes += len(payload)
            if self._batch_bytes >= self.max_batch_bytes:
                self.flush()

    def _parse(self, node: str, payload: bytes) -> Chunk | FeatureObject:
        if node not in self.nodes:
            raise ProtocolError(f"features from node {node!r}, which is not part of job {self.job}")
        message = parse_feature_message(payload)
        if message.job != self.job or message.node != node:
            raise ProtocolError(f"features of {message.job}/{message.node} on the topic of {self.job}/{node}")
        return message

    def _on_chunk(self, node: str, chunk: Chunk, wire_bytes: int) -> None:
        transfer, seq = chunk.transfer, chunk.seq
        if hashlib.sha256(chunk.payload).digest() != chunk.sha256:
            self._reject(node, transfer, seq, "chunk sha256 mismatch")
            return
        if self._is_committed(node, transfer):
            self._duplicate(node, transfer, seq)
            return
        key = (node, transfer)
        asm = self.assemblies.get(key)
        if asm is None:
            asm = self.assemblies[key] = _Assembly(node, transfer, chunk.total, chunk.size, chunk.transfer_sha256)
        elif not asm.matches(chunk):
            if chunk.transfer_sha256 in asm.superseded:
                log.info("transfer %d of %s: chunk %d of a replaced version ignored", transfer, node, seq)
                return
            log.warning(
                "transfer %d of %s: chunks of a different version arrived (the edge re-extracted it); "
                "the %d chunk(s) of the earlier one are dropped",
                transfer,
                node,
                len(asm.held) + len(asm.stored),
            )
            asm = self._supersede(asm, chunk)
        if seq in asm.stored:
            # Persisted and acknowledged before: that acknowledgement was lost.
            self._ack(node, transfer, seq, done=False)
            return
        if seq in asm.held:
            return  # a redelivery of a held chunk: acknowledged with its transfer
        if not asm.held:
            asm.since = time.monotonic()
        asm.held[seq] = _Held(chunk.payload, chunk.sha256, wire_bytes)
        self.held_bytes += len(chunk.payload)
        if asm.complete:
            self._complete(asm, seq)

    def _supersede(self, old: _Assembly, chunk: Chunk) -> _Assembly:
        key = (old.node, old.transfer)
        self.held_bytes -= old.held_bytes
        if old.stored:
            self._drops.add(key)
        new = _Assembly(old.node, old.transfer, chunk.total, chunk.size, chunk.transfer_sha256)
        new.superseded = old.superseded | {old.digest}
        self.assemblies[key] = new
        return new

    def _drop_held(self, asm: _Assembly, seq: int) -> None:
        held = asm.held.pop(seq)
        self.held_bytes -= len(held.payload)
        if not asm.held:
            asm.since = 0.0

    def _complete(self, asm: _Assembly, last_seq: int) -> None:
        node, transfer = asm.node, asm.transfer
        from_spool = self.spool.chunk_payloads(node, transfer) if asm.stored else {}
        parts = [asm.held[s].payload if s in asm.held else from_spool.get(s, b"") for s in range(asm.total)]
        digests = [asm.held[s].sha256 if s in asm.held else hashlib.sha256(parts[s]).digest() for s in range(asm.total)]
        try:
            batch = decode_batch(join_transfer(parts, digests, asm.size, asm.digest))
            if batch.transfer != transfer:
                raise ProtocolError(f"the chunks of transfer {transfer} hold transfer {batch.transfer}")
            self._check_ids(node, batch)
        except ProtocolError as exc:
            self._corrupt(asm, str(exc))
            return
        wire = sum(h.wire_bytes for h in asm.held.values()) + sum(asm.stored.values())
        self._forget(asm)
        self._queue_commit(_Commit(node, batch, wire, bool(asm.stored)), last_seq)

    def _corrupt(self, asm: _Assembly, reason: str) -> None:
        """Every chunk verified, the transfer did not: ask for all of it again."""
        log.warning("transfer %d from %s is corrupt (%s): asking for all of it again", asm.transfer, asm.node, reason)
        self.rejected["corrupt transfer"] += 1
        self._forget(asm)
        if asm.stored:
            self._drops.add((asm.node, asm.transfer))
        for seq in range(asm.total):
            self._acks.append(
                Ack(job=self.job, node=asm.node, kind=AckKind.REJECTED, transfer=asm.transfer, seq=seq, reason=reason)
            )

    def _forget(self, asm: _Assembly) -> None:
        self.held_bytes -= asm.held_bytes
        self.assemblies.pop((asm.node, asm.transfer), None)

    def _queue_commit(self, commit: _Commit, seq: int) -> None:
        key = (commit.node, commit.batch.transfer)
        stray = self.assemblies.get(key)  # chunks of a transfer that arrived whole otherwise (S3)
        if stray is not None:
            self._forget(stray)
            commit.had_stored = commit.had_stored or bool(stray.stored)
        self._commits.append(commit)
        self._committing.add(key)
        self._ack(commit.node, commit.batch.transfer, seq, done=True)

    def _is_committed(self, node: str, transfer: int) -> bool:
        key = (node, transfer)
        return transfer in self.committed.get(node, ()) or key in self._committing or key in self._settling

    def _duplicate(self, node: str, transfer: int, seq: int) -> None:
        self.duplicates += 1
        self.duplicates_by_node[node] += 1
        if (node, transfer) not in self._dup_acked:  # one acknowledgement per transfer and batch settles it
            self._dup_acked.add((node, transfer))
            self._ack(node, transfer, seq, done=True)

    # S3 transmitter ----------------------------------------------------------------------------

    def on_object(self, node: str, claim: FeatureObject, message_bytes: int) -> None:
        if self.fetch is None or self.object_prefix is None:
            self.reject("features", Topics.features(node, self.job), "an object claim, but this job does not use S3")
            return
        prefix = self.object_prefix(node)
        if not claim.key.startswith(prefix) or ".." in claim.key:
            self.reject("features", Topics.features(node, self.job), f"object key {claim.key!r} is outside {prefix}")
            return
        if self._is_committed(node, claim.transfer):
            self._duplicate(node, claim.transfer, 0)
            return
        try:
            blob = self.fetch(claim)
            if hashlib.sha256(blob).digest() != claim.sha256:
                raise ProtocolError(f"object {claim.key}: sha256 mismatch")
            batch = decode_batch(blob)
            if batch.transfer != claim.transfer:
                raise ProtocolError(f"object {claim.key} holds transfer {batch.transfer}, not {claim.transfer}")
            self._check_ids(node, batch)
        except TransportError as exc:
            # No acknowledgement: the edge's retransmission timer asks again, with backoff.
            self.store_error = str(exc)
            log.warning("transfer %d of %s: %s (waiting for the edge to ask again)", claim.transfer, node, exc)
            return
        except ProtocolError as exc:
            self._reject(node, claim.transfer, 0, str(exc), label="damaged object")
            return
        self.store_error = ""
        obj = StoredObject(node, claim.transfer, claim.key, claim.sha256, claim.size)
        self._queue_commit(_Commit(node, batch, message_bytes + claim.size, False, obj), 0)

    # ---------------------------------------------------------------------------------------------

    def _check_ids(self, node: str, batch: FeatureBatch) -> None:
        per = self.nodes[node]
        allowed = range(batch.transfer * per, (batch.transfer + 1) * per)
        ids = batch.ids + [s.id for s in batch.skipped]
        if len(set(ids)) != len(ids) or any(i not in allowed for i in ids):
            raise ProtocolError(
                f"transfer {batch.transfer} carries sample ids outside {allowed.start}..{allowed.stop - 1}"
            )

    def _ack(self, node: str, transfer: int, seq: int, done: bool) -> None:
        self._acks.append(
            Ack(job=self.job, node=node, kind=AckKind.CHUNK, transfer=transfer, seq=seq, transfer_done=done)
        )

    def _reject(self, node: str, transfer: int, seq: int, reason: str, label: str = "") -> None:
        self.rejected[label or reason] += 1
        log.warning("rejected transfer %d/%d of %s: %s", transfer, seq, node, reason)
        self._acks.append(
            Ack(job=self.job, node=node, kind=AckKind.REJECTED, transfer=transfer, seq=seq, reason=reason[:500])
        )

    def on_hello(self, status: NodeStatus) -> None:
        """Tell an edge where to resume: when it is ready (first start or restart), and once to an edge
        already streaming when this cloud process starts (the cloud restarted under it)."""
        if status.job != self.job or status.node not in self.nodes:
            return
        if status.state == NodeState.READY:
            pass
        elif status.state == NodeState.EXTRACTING and status.node not in self.greeted:
            log.info("%s is streaming to a restarted cloud: sending it the resume point", status.node)
        else:
            return
        self.flush()  # the resume point includes everything verified so far, committed
        self.settle()
        self.greeted.add(status.node)
        if status.total is not None:
            self.spool.set_total(status.node, status.total)
        nxt, beyond = self.spool.resume_point(status.node)
        # An edge resends what the list leaves out; the cap only costs duplicates, never data.
        self.send_ack(
            Ack(job=self.job, node=status.node, kind=AckKind.RESUME, next_transfer=nxt, committed=beyond[:4096])
        )

    def summary(self) -> str:
        dup = ", ".join(f"{n} {c}" for n, c in sorted(self.duplicates_by_node.items())) or "none"
        return (
            f"duplicate chunks re-acknowledged: {dup}; chunks persisted before their transfer was complete: "
            f"{self.spilled}; {self.reject.summary()}"
        )
