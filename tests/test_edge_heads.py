"""The edge's head buffer: damaged pieces refused, stale pieces never start a job, memory bounded."""

from __future__ import annotations

import hashlib

from common import constants as C
from common.heads import head_chunks
from common.protocol import HeadChunk, JobAssignment, ModelRef, PrivacyParams, Topics, encode_head_chunk, to_json
from common.transport import BrokerOptions, Inbound
from edge_agent.agent import EdgeAgent


def agent() -> EdgeAgent:
    a = EdgeAgent("edge1", BrokerOptions())
    a.link.publish = lambda *args, **kw: None  # type: ignore[method-assign,assignment]
    return a


def assignment(head: bytes, job: str = "j") -> tuple[JobAssignment, list[HeadChunk]]:
    manifest, parts = head_chunks(job, head, 1024)
    a = JobAssignment(
        job=job,
        node="edge1",
        model=ModelRef(arch="lenet5", num_classes=10, cut_layer=2),
        privacy=PrivacyParams(epsilon=100),
        dataset="x",
        batch_size=64,
        head=manifest,
    )
    return a, parts


def send(edge: EdgeAgent, topic: str, payload: bytes) -> None:
    edge.dispatch(Inbound(topic, payload, retain=True))


def test_stale_or_damaged_head_pieces_never_start_a_job():
    edge = agent()
    old_job, old_parts = assignment(b"A" * 3000)
    new_job, new_parts = assignment(b"B" * 2500)
    for part in old_parts:
        send(edge, Topics.head_chunk("edge1", "j", part.seq), encode_head_chunk(part))
    send(edge, Topics.job_assignment("edge1", "j"), to_json(old_job))
    assert edge.next_runnable() == old_job
    # the cloud republishes a different head: its assignment may come before its pieces
    send(edge, Topics.job_assignment("edge1", "j"), to_json(new_job))
    assert edge.next_runnable() is None  # old pieces fail the new manifest's sha256
    damaged = new_parts[0].model_copy(update={"payload": b"C" + new_parts[0].payload[1:]})
    send(edge, Topics.head_chunk("edge1", "j", 0), encode_head_chunk(damaged))
    assert edge.rejected["head_chunk"] == 1
    for part in new_parts:
        send(edge, Topics.head_chunk("edge1", "j", part.seq), encode_head_chunk(part))
    assert edge.next_runnable() == new_job


def test_heads_of_unassigned_jobs_are_bounded():
    edge = agent()
    piece = b"x" * C.MAX_CHUNK_BYTES
    chunk = HeadChunk(job="j0", seq=0, total=100, sha256=hashlib.sha256(piece).digest(), payload=piece)
    jobs = C.MAX_UNASSIGNED_HEAD_BYTES // C.MAX_CHUNK_BYTES
    for k in range(jobs + 3):
        send(edge, Topics.head_chunk("edge1", f"j{k}", 0), encode_head_chunk(chunk.model_copy(update={"job": f"j{k}"})))
    assert edge.rejected["head_chunk"] == 3
    assert edge.unassigned_head_bytes() == C.MAX_UNASSIGNED_HEAD_BYTES
