"""Encoding of messages: JSON for what any MQTT tool should read, msgpack for chunks and feature
batches, always decoded within size limits and validated strictly; nothing is ever pickled."""

from __future__ import annotations

import hashlib
from typing import Any, TypeVar

import msgpack
from pydantic import ValidationError

from common import constants as C
from common.errors import ProtocolError
from common.protocol.messages import Chunk, FeatureBatch, FeatureObject, HeadChunk, Message

M = TypeVar("M", bound=Message)


def to_json(message: Message) -> bytes:
    return message.model_dump_json().encode()


def from_json(cls: type[M], payload: bytes) -> M:
    if len(payload) > C.MAX_JSON_MESSAGE_BYTES:
        raise ProtocolError(f"{cls.__name__}: {len(payload)} bytes exceeds {C.MAX_JSON_MESSAGE_BYTES}")
    try:
        return cls.model_validate_json(payload)
    except ValidationError as exc:
        raise ProtocolError(f"{cls.__name__}: {_first_error(exc)}") from None


def to_msgpack(message: Message) -> bytes:
    return bytes(msgpack.packb(message.model_dump(mode="python"), use_bin_type=True))


def from_msgpack(cls: type[M], payload: bytes, max_bytes: int) -> M:
    """Decode with msgpack limits set from the payload size, so a bomb cannot allocate."""
    return _validate(cls, _unpack(cls.__name__, payload, max_bytes))


def _unpack(what: str, payload: bytes, max_bytes: int) -> dict[str, Any]:
    if len(payload) > max_bytes:
        raise ProtocolError(f"{what}: {len(payload)} bytes exceeds {max_bytes}")
    try:
        raw = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_bytes,
            max_str_len=min(max_bytes, 1 << 20),
            max_array_len=min(len(payload), 1 << 20),
            max_map_len=min(len(payload), 1 << 16),
            max_ext_len=0,
        )
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        raise ProtocolError(f"{what}: not valid msgpack ({exc})") from None
    if not isinstance(raw, dict):
        raise ProtocolError(f"{what}: expected a map, got {type(raw).__name__}")
    return raw


def _validate(cls: type[M], raw: dict[str, Any]) -> M:
    try:
        return cls.model_validate(raw, strict=True)
    except ValidationError as exc:
        raise ProtocolError(f"{cls.__name__}: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "message"
    return f"{where}: {err['msg']} ({len(exc.errors())} problem(s))"


def encode_chunk(chunk: Chunk) -> bytes:
    return to_msgpack(chunk)


Verified = TypeVar("Verified", Chunk, HeadChunk)


def _decode_verified(cls: type[Verified], payload: bytes) -> Verified:
    """Parse a chunk-like message and verify its payload against its own digest."""
    message = from_msgpack(cls, payload, C.MAX_CHUNK_BYTES + C.ENVELOPE_OVERHEAD_BYTES)
    if hashlib.sha256(message.payload).digest() != message.sha256:
        raise ProtocolError(f"{cls.__name__} seq {message.seq}: sha256 mismatch")
    return message


def decode_chunk(payload: bytes) -> Chunk:
    return _decode_verified(Chunk, payload)


def parse_feature_message(payload: bytes) -> Chunk | FeatureObject:
    """A message of the features topic: a chunk, or (``kind: object``) an object claim.

    Only the structure is checked here; the collector verifies digests so it can answer a damaged
    chunk with a ``rejected`` acknowledgement.
    """
    raw = _unpack("features message", payload, C.MAX_CHUNK_BYTES + C.ENVELOPE_OVERHEAD_BYTES)
    if raw.get("kind") == "object":
        return _validate(FeatureObject, raw)
    return _validate(Chunk, raw)


def encode_head_chunk(chunk: HeadChunk) -> bytes:
    return to_msgpack(chunk)


def decode_head_chunk(payload: bytes) -> HeadChunk:
    return _decode_verified(HeadChunk, payload)


def encode_batch(batch: FeatureBatch) -> bytes:
    return to_msgpack(batch)


def decode_batch(blob: bytes) -> FeatureBatch:
    return from_msgpack(FeatureBatch, blob, C.MAX_TRANSFER_BYTES)
