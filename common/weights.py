"""Head weights as bytes: safetensors, so the edge never unpickles anything the cloud sends."""

from __future__ import annotations

import hashlib

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from common.errors import ProtocolError
from common.protocol import HeadChunk, HeadManifest
from common.split import head_state_dict


def pack_state(state: dict[str, torch.Tensor]) -> bytes:
    return bytes(st_save({k: v.detach().contiguous().cpu() for k, v in state.items()}))


def unpack_state(blob: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(blob)
    except (SafetensorError, ValueError) as exc:
        raise ProtocolError(f"head weights are not valid safetensors: {exc}") from None


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
        raise ProtocolError("head weights fail their sha256 check")
    return blob


def load_head(model: nn.Module, state: dict[str, torch.Tensor], cut: int) -> None:
    """Load exactly the head's tensors; anything missing, extra or misshapen is refused."""
    expected = head_state_dict(model, cut)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ProtocolError(f"head weights do not fit cut {cut}: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ProtocolError(f"head tensor {k} has shape {list(v.shape)}, expected {list(expected[k].shape)}")
    model.load_state_dict(state, strict=False)
