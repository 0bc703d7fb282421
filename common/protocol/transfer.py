"""Feature transfers over chunks: cutting a transfer's bytes into verified chunks, the
transfer's digest (a hash list over the chunks' digests), and reassembly with verification."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

from common import constants as C
from common.errors import ProtocolError
from common.protocol.messages import Chunk


def transfer_digest(chunk_digests: Iterable[bytes]) -> bytes:
    """A chunked transfer's digest: sha256 over its chunks' sha256 digests, in order (a hash list).

    Each chunk is checked against its own digest on arrival, and the transfer against this one, so
    every byte is hashed once on each side instead of twice (hashing was half the CPU of sending
    and receiving features; docs/benchmarks.md)."""
    return hashlib.sha256(b"".join(chunk_digests)).digest()


def split_transfer(job: str, node: str, transfer: int, blob: bytes, chunk_bytes: int) -> Iterator[Chunk]:
    """Cut one transfer's bytes into verified chunks of at most ``chunk_bytes``."""
    if not blob:
        raise ProtocolError("a transfer cannot be empty")
    if len(blob) > C.MAX_TRANSFER_BYTES:
        raise ProtocolError(f"transfer of {len(blob)} bytes exceeds {C.MAX_TRANSFER_BYTES}")
    view = memoryview(blob)
    parts = [view[start : start + chunk_bytes] for start in range(0, len(blob), chunk_bytes)]
    digests = [hashlib.sha256(part).digest() for part in parts]
    digest = transfer_digest(digests)
    for seq, (part, sha) in enumerate(zip(parts, digests, strict=True)):
        yield Chunk(
            job=job,
            node=node,
            transfer=transfer,
            seq=seq,
            total=len(parts),
            size=len(blob),
            sha256=sha,
            transfer_sha256=digest,
            payload=bytes(part),
        )


def join_transfer(payloads: list[bytes], chunk_digests: list[bytes], size: int, digest: bytes) -> bytes:
    """Reassemble a complete transfer (payloads in seq order) and verify its digest.

    ``chunk_digests`` are the payloads' sha256 digests, each already checked against its payload
    when the chunk arrived, so no byte is hashed again here."""
    blob = b"".join(payloads)
    if len(blob) != size or transfer_digest(chunk_digests) != digest:
        raise ProtocolError("whole-transfer sha256 or size mismatch")
    return blob
