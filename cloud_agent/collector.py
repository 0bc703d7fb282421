"""Receives feature chunks: verify, persist, acknowledge, and commit whole transfers.

The acknowledgement of a chunk is sent only after it is stored in the spool, so it means
"verified and persisted". Duplicates are re-acknowledged, never stored twice; corrupt chunks are
rejected so the edge resends them at once instead of waiting for its retransmission timer.

With the S3 transmitter a transfer arrives as a :class:`FeatureObject` claim instead: the object is
downloaded (its size checked before reading), verified against the claim's sha256, committed and
acknowledged as the transfer's only chunk. A damaged or missing object is rejected (the edge
uploads it again); an unreachable store gets no acknowledgement, so the edge's retransmission
timer retries later.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable

from cloud_agent.spool import Spool
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
    decode_features,
    join_transfer,
)
from common.transport import Rejections

log = logging.getLogger("mistnet.cloud.collector")

# fetch(claim) -> the object's bytes (ProtocolError: damaged or missing; TransportError: store unreachable)
Fetch = Callable[[FeatureObject], bytes]


class Collector:
    def __init__(
        self,
        spool: Spool,
        job: str,
        nodes: dict[str, int],
        send_ack: Callable[[Ack], None],
        fetch: Fetch | None = None,
        object_prefix: Callable[[str], str] | None = None,
    ) -> None:
        """``nodes`` maps each expected edge to its samples per transfer (its batch size); ``fetch`` and
        ``object_prefix`` (node -> the key prefix its objects must have) enable the S3 transmitter."""
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

    def on_features(self, node: str, payload: bytes) -> None:
        try:
            message = self._parse(node, payload)
        except ProtocolError as exc:
            self.reject("features", Topics.features(node, self.job), exc)
            return
        if isinstance(message, FeatureObject):
            self.on_object(node, message, len(payload))
            return
        chunk = message
        if hashlib.sha256(chunk.payload).digest() != chunk.sha256:
            self._reject(chunk.node, chunk.transfer, chunk.seq, "chunk sha256 mismatch")
            return
        if self.spool.is_committed(node, chunk.transfer):
            self.duplicates += 1
            self.duplicates_by_node[node] += 1
            self._ack(node, chunk.transfer, chunk.seq, done=True)
            return
        self.spool.put_chunk(chunk, len(payload))
        if self.spool.stored_chunks(node, chunk.transfer) < chunk.total:
            self._ack(node, chunk.transfer, chunk.seq, done=False)
            return
        self._commit(node, chunk)

    def _parse(self, node: str, payload: bytes) -> Chunk | FeatureObject:
        if node not in self.nodes:
            raise ProtocolError(f"features from node {node!r}, which is not part of job {self.job}")
        message = decode_features(payload)
        if message.job != self.job or message.node != node:
            raise ProtocolError(f"features of {message.job}/{message.node} on the topic of {self.job}/{node}")
        return message

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
        self._ack(node, last.transfer, last.seq, done=True)

    # S3 transmitter ----------------------------------------------------------------------------

    def on_object(self, node: str, claim: FeatureObject, message_bytes: int) -> None:
        if self.fetch is None or self.object_prefix is None:
            self.reject("features", Topics.features(node, self.job), "an object claim, but this job does not use S3")
            return
        prefix = self.object_prefix(node)
        if not claim.key.startswith(prefix) or ".." in claim.key:
            self.reject("features", Topics.features(node, self.job), f"object key {claim.key!r} is outside {prefix}")
            return
        if self.spool.is_committed(node, claim.transfer):
            self.duplicates += 1
            self.duplicates_by_node[node] += 1
            self._ack(node, claim.transfer, 0, done=True)
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
        self.spool.commit_transfer(node, batch, wire_bytes=message_bytes + claim.size)
        self._ack(node, claim.transfer, 0, done=True)

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
        self.send_ack(Ack(job=self.job, node=node, kind=AckKind.CHUNK, transfer=transfer, seq=seq, transfer_done=done))

    def _reject(self, node: str, transfer: int, seq: int, reason: str, label: str = "") -> None:
        self.rejected[label or reason] += 1
        log.warning("rejected transfer %d/%d of %s: %s", transfer, seq, node, reason)
        self.send_ack(
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
        return f"duplicate chunks re-acknowledged: {dup}; {self.reject.summary()}"
