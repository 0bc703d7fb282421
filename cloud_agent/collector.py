"""Receives feature chunks: verify, persist, acknowledge, and commit whole transfers.

The acknowledgement of a chunk is sent only after it is stored in the spool, so it means
"verified and persisted". Duplicates are re-acknowledged, never stored twice; corrupt chunks are
rejected so the edge resends them at once instead of waiting for its retransmission timer.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable

from cloud_agent.spool import Spool
from common import constants as C
from common.errors import ProtocolError
from common.protocol import (
    Ack,
    AckKind,
    Chunk,
    FeatureBatch,
    NodeState,
    NodeStatus,
    decode_batch,
    from_msgpack,
    join_transfer,
)

log = logging.getLogger("mistnet.cloud.collector")


class Collector:
    def __init__(self, spool: Spool, job: str, nodes: dict[str, int], send_ack: Callable[[Ack], None]) -> None:
        """``nodes`` maps each expected edge to its samples per transfer (its batch size)."""
        self.spool = spool
        self.job = job
        self.nodes = nodes
        self.send_ack = send_ack
        self.rejected: Counter[str] = Counter()
        self.duplicates = 0

    def on_features(self, node: str, payload: bytes) -> None:
        try:
            chunk = self._parse(node, payload)
        except ProtocolError as exc:
            self._count_rejection(node, exc)
            return
        if hashlib.sha256(chunk.payload).digest() != chunk.sha256:
            self._reject(chunk, "chunk sha256 mismatch")
            return
        if self.spool.is_committed(node, chunk.transfer):
            self.duplicates += 1
            self._ack(chunk, done=True)
            return
        self.spool.put_chunk(chunk, len(payload))
        if self.spool.stored_chunks(node, chunk.transfer) < chunk.total:
            self._ack(chunk, done=False)
            return
        self._commit(node, chunk)

    def _parse(self, node: str, payload: bytes) -> Chunk:
        if node not in self.nodes:
            raise ProtocolError(f"features from node {node!r}, which is not part of job {self.job}")
        chunk = from_msgpack(Chunk, payload, C.MAX_CHUNK_BYTES + C.ENVELOPE_OVERHEAD_BYTES)
        if chunk.job != self.job or chunk.node != node:
            raise ProtocolError(f"chunk of {chunk.job}/{chunk.node} on the topic of {self.job}/{node}")
        if chunk.seq >= chunk.total:
            raise ProtocolError(f"chunk seq {chunk.seq} is not below total {chunk.total}")
        return chunk

    def _commit(self, node: str, last: Chunk) -> None:
        payloads, size, digest = self.spool.assembled(node, last.transfer)
        try:
            batch = decode_batch(join_transfer(payloads, size, digest))
            self._check_ids(node, batch)
        except ProtocolError as exc:
            log.warning("transfer %d from %s is corrupt (%s): asking for all of it again", last.transfer, node, exc)
            self.rejected["corrupt transfer"] += 1
            self.spool.drop_chunks(node, last.transfer)
            for seq in range(last.total):
                self.send_ack(
                    Ack(
                        job=self.job, node=node, kind=AckKind.REJECTED, transfer=last.transfer, seq=seq, reason=str(exc)
                    )
                )
            return
        self.spool.commit_transfer(node, batch)
        self._ack(last, done=True)

    def _check_ids(self, node: str, batch: FeatureBatch) -> None:
        per = self.nodes[node]
        allowed = range(batch.transfer * per, (batch.transfer + 1) * per)
        ids = batch.ids + [s.id for s in batch.skipped]
        if len(set(ids)) != len(ids) or any(i not in allowed for i in ids):
            raise ProtocolError(
                f"transfer {batch.transfer} carries sample ids outside {allowed.start}..{allowed.stop - 1}"
            )

    def _ack(self, chunk: Chunk, done: bool) -> None:
        self.send_ack(
            Ack(
                job=self.job,
                node=chunk.node,
                kind=AckKind.CHUNK,
                transfer=chunk.transfer,
                seq=chunk.seq,
                transfer_done=done,
            )
        )

    def _reject(self, chunk: Chunk, reason: str) -> None:
        self.rejected[reason] += 1
        self.send_ack(
            Ack(
                job=self.job,
                node=chunk.node,
                kind=AckKind.REJECTED,
                transfer=chunk.transfer,
                seq=chunk.seq,
                reason=reason,
            )
        )

    def _count_rejection(self, node: str, exc: ProtocolError) -> None:
        self.rejected[str(exc).split(":")[0]] += 1
        log.warning("rejected a features message from %s: %s", node, exc)

    def on_hello(self, status: NodeStatus) -> None:
        """An edge is ready (first start or restart): tell it where to resume."""
        if status.state != NodeState.READY or status.job != self.job or status.node not in self.nodes:
            return
        if status.total is not None:
            self.spool.set_total(status.node, status.total)
        nxt, beyond = self.spool.resume_point(status.node)
        self.send_ack(Ack(job=self.job, node=status.node, kind=AckKind.RESUME, next_transfer=nxt, committed=beyond))
