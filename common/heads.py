"""A head (weights or ONNX graph) as retained chunks, each with its digest, and back: no torch needed."""

from __future__ import annotations

import hashlib

from common.errors import ProtocolError
from common.protocol import HeadChunk, HeadManifest


def head_chunks(job: str, blob: bytes, chunk_bytes: int) -> tuple[HeadManifest, list[HeadChunk]]:
    total = -(-len(blob) // chunk_bytes)
    manifest = HeadManifest(sha256=hashlib.sha256(blob).hexdigest(), size=len(blob), chunks=total)
    pieces = [blob[i * chunk_bytes : (i + 1) * chunk_bytes] for i in range(total)]
    parts = [
        HeadChunk(job=job, seq=i, total=total, sha256=hashlib.sha256(piece).digest(), payload=piece)
        for i, piece in enumerate(pieces)
    ]
    return manifest, parts


def join_head(manifest: HeadManifest, parts: dict[int, bytes]) -> bytes:
    if len(parts) != manifest.chunks:
        raise ProtocolError(f"head has {len(parts)} of {manifest.chunks} chunks")
    blob = b"".join(parts[i] for i in range(manifest.chunks))
    if len(blob) != manifest.size or hashlib.sha256(blob).hexdigest() != manifest.sha256:
        raise ProtocolError("head fails its sha256 check")
    return blob
