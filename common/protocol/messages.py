"""The wire protocol, in one place: the topic tree and every message that travels on it.

Topic tree (``{root}`` is ``mistnet/v1``; a node id always sits on its own level so broker ACL
patterns can substitute ``%u``):

===============================================  =========  ======  =====================================
topic                                            direction  format  meaning
===============================================  =========  ======  =====================================
``{root}/node/{node}/status``                    edge→all   JSON    retained birth / progress / last will
``{root}/node/{node}/jobs/{job}``                cloud→edge JSON    retained job assignment (empty = withdrawn)
``{root}/node/{node}/head/{job}/{seq}``          cloud→edge msgpack retained head-weight chunks
``{root}/node/{node}/head/{job}/onnx/{seq}``     cloud→edge msgpack retained chunks of the head as ONNX
``{root}/node/{node}/features/{job}``            edge→cloud msgpack feature chunks, or object claims (S3)
``{root}/node/{node}/ack/{job}``                 cloud→edge JSON    acknowledgements and resume points
``{root}/job/{job}/status``                      cloud→all  JSON    retained job status
``{root}/job/{job}/checkpoint``                  cloud→all  JSON    retained checkpoint announcement
``{root}/job/{job}/control``                     ops→cloud  JSON    operator commands (cancel)
===============================================  =========  ======  =====================================

Feature chunks are msgpack envelopes carrying raw bytes; nothing on the wire is ever pickled. With
the S3 transmitter a transfer's bytes go to an object store and the features topic carries only a
:class:`FeatureObject` claim (key, size, sha256).
Status, acknowledgement and checkpoint messages are JSON so any MQTT tool can read them.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Iterable, Iterator
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common import constants as C
from common.errors import ProtocolError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
_NAME = re.compile(NAME_PATTERN)
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Digest = Annotated[bytes, Field(min_length=32, max_length=32)]


def check_name(kind: str, value: str) -> str:
    """Node and job ids become topic levels: no wildcards, slashes or empties."""
    if not _NAME.match(value):
        raise ProtocolError(f"{kind} {value!r} is not a valid name (letters, digits, '_', '.', '-'; max 63)")
    return value


# Topic tree ------------------------------------------------------------------------------------


class Topics:
    """Builds and parses every topic of the tree; nothing else formats topic strings."""

    root = C.TOPIC_ROOT

    @classmethod
    def node_status(cls, node: str) -> str:
        return f"{cls.root}/node/{node}/status"

    @classmethod
    def all_node_status(cls) -> str:
        return f"{cls.root}/node/+/status"

    @classmethod
    def job_assignment(cls, node: str, job: str) -> str:
        return f"{cls.root}/node/{node}/jobs/{job}"

    @classmethod
    def node_jobs(cls, node: str) -> str:
        return f"{cls.root}/node/{node}/jobs/+"

    @classmethod
    def head_chunk(cls, node: str, job: str, seq: int) -> str:
        return f"{cls.root}/node/{node}/head/{job}/{seq}"

    @classmethod
    def node_heads(cls, node: str) -> str:
        return f"{cls.root}/node/{node}/head/#"

    @classmethod
    def onnx_chunk(cls, node: str, job: str, seq: int) -> str:
        return f"{cls.root}/node/{node}/head/{job}/onnx/{seq}"

    @classmethod
    def node_head_form(cls, node: str, runtime: str) -> str:
        """The head chunks an edge of this runtime reads: weights (torch) or the ONNX graph (onnx)."""
        return f"{cls.root}/node/{node}/head/+/onnx/+" if runtime == "onnx" else f"{cls.root}/node/{node}/head/+/+"

    @classmethod
    def features(cls, node: str, job: str) -> str:
        return f"{cls.root}/node/{node}/features/{job}"

    @classmethod
    def all_features(cls, job: str) -> str:
        return f"{cls.root}/node/+/features/{job}"

    @classmethod
    def ack(cls, node: str, job: str) -> str:
        return f"{cls.root}/node/{node}/ack/{job}"

    @classmethod
    def node_acks(cls, node: str) -> str:
        return f"{cls.root}/node/{node}/ack/+"

    @classmethod
    def job_status(cls, job: str) -> str:
        return f"{cls.root}/job/{job}/status"

    @classmethod
    def all_job_status(cls) -> str:
        return f"{cls.root}/job/+/status"

    @classmethod
    def checkpoint(cls, job: str) -> str:
        return f"{cls.root}/job/{job}/checkpoint"

    @classmethod
    def control(cls, job: str) -> str:
        return f"{cls.root}/job/{job}/control"

    @classmethod
    def parse(cls, topic: str) -> tuple[str, dict[str, str]]:
        """(kind, ids) of a topic of the tree; ProtocolError for anything else."""
        parts = topic.split("/")
        root = cls.root.split("/")
        if parts[: len(root)] != root:
            raise ProtocolError(f"topic {topic!r} is outside {cls.root}")
        rest = parts[len(root) :]
        match rest:
            case ["node", node, "status"]:
                return "node_status", {"node": node}
            case ["node", node, "jobs", job]:
                return "job_assignment", {"node": node, "job": job}
            case ["node", node, "head", job, seq]:
                return "head_chunk", {"node": node, "job": job, "seq": seq}
            case ["node", node, "head", job, "onnx", seq]:
                return "onnx_chunk", {"node": node, "job": job, "seq": seq}
            case ["node", node, "features", job]:
                return "features", {"node": node, "job": job}
            case ["node", node, "ack", job]:
                return "ack", {"node": node, "job": job}
            case ["job", job, "status"]:
                return "job_status", {"job": job}
            case ["job", job, "checkpoint"]:
                return "checkpoint", {"job": job}
            case ["job", job, "control"]:
                return "control", {"job": job}
        raise ProtocolError(f"topic {topic!r} is not part of the protocol")


# Messages --------------------------------------------------------------------------------------


class Message(BaseModel):
    """Strict, closed schemas: unknown fields, wrong types and non-finite floats (NaN, ±Infinity,
    which JSON parsers accept as literals) are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class NodeState(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    READY = "ready"
    EXTRACTING = "extracting"
    DONE = "done"
    ERROR = "error"
    CANCELLED = "cancelled"
    REFUSED = "refused"  # the edge's own policy refused the job's assignment; ``message`` says why


class NodeStatus(Message):
    """Retained on the node's status topic: birth, progress, and (as last will) offline."""

    v: Literal[1] = C.PROTOCOL_VERSION
    node: Name
    state: NodeState
    job: Name | None = None
    total: int | None = Field(default=None, ge=0)
    extracted: int = Field(default=0, ge=0)
    acked: int = Field(default=0, ge=0)
    skipped: int = Field(default=0, ge=0)
    wire_bytes: int = Field(default=0, ge=0)
    resent_chunks: int = Field(default=0, ge=0)
    resent_bytes: int = Field(default=0, ge=0)
    message: str = ""
    time: float = 0.0


class ModelRef(Message):
    """What the edge needs to rebuild the head: architecture, cut and input geometry."""

    arch: str
    num_classes: int = Field(ge=1)
    cut_layer: int = Field(ge=1)
    image_size: int = Field(default=0, ge=0)
    options: dict[str, Any] = Field(default_factory=dict)


class LayerThresholds(Message):
    """Quantisation thresholds of one head output: per channel, ``2^bits - 1`` ascending values
    (an activation's level is how many of its channel's thresholds it exceeds)."""

    layer: int = Field(ge=0)
    values: list[list[float]] = Field(min_length=1, max_length=C.MAX_THRESHOLD_CHANNELS)

    @model_validator(mode="after")
    def _ascending_rows(self) -> LayerThresholds:
        widths = {len(row) for row in self.values}
        if len(widths) != 1:
            raise ValueError("every channel needs the same number of thresholds")
        for c, row in enumerate(self.values):
            if any(not math.isfinite(v) for v in row) or any(a > b for a, b in itertools.pairwise(row)):
                raise ValueError(f"channel {c}: thresholds must be finite and ascending")
        return self


class PrivacyParams(Message):
    """How activations become bits: the local-DP mechanism both sides must agree on. Without
    ``thresholds`` a 1-bit activation is ``x > 0`` (the reference system's binarization)."""

    epsilon: float = Field(gt=0)
    bits: int = Field(default=1, ge=1, le=8)
    thresholds: list[LayerThresholds] | None = None

    @model_validator(mode="after")
    def _thresholds_match_bits(self) -> PrivacyParams:
        for t in self.thresholds or []:
            if len(t.values[0]) != 2**self.bits - 1:
                raise ValueError(f"layer {t.layer}: {self.bits} bits need {2**self.bits - 1} thresholds per channel")
        if self.bits > 1 and not self.thresholds:
            raise ValueError(f"{self.bits}-bit features need thresholds")
        return self


class HeadManifest(Message):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=1, le=C.MAX_HEAD_BYTES)
    chunks: int = Field(ge=1)


class OnnxHead(Message):
    """The head as an ONNX graph, for edges without torch (``mistnet edge --runtime onnx``): its
    chunks, and the shapes it must have, per sample: input ``input`` of ``input_shape`` and one
    output ``layer{i}`` per entry of ``outputs`` (the head outputs the tail reads). The batch axis
    is the graph's only free dimension."""

    manifest: HeadManifest
    input_shape: list[int] = Field(min_length=1, max_length=3)
    outputs: list[FeatureLayout] = Field(min_length=1, max_length=64)


class JobState(StrEnum):
    ACTIVE = "active"
    CANCELLED = "cancelled"


class ObjectStoreRef(Message):
    """Where an edge puts its transfers when the job uses the S3 transmitter (claim-check).

    Never credentials: an edge signs its uploads with keys from its own environment or
    credentials file, so no secret ever crosses the broker.
    """

    bucket: str = Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]+[a-z0-9]$")
    prefix: str = Field(default="", max_length=256, pattern=r"^[A-Za-z0-9_.\-/]*$")
    endpoint_url: str | None = Field(default=None, max_length=512)
    region: str | None = Field(default=None, max_length=64)

    def object_prefix(self, job: str, node: str) -> str:
        """Every object of one edge for one job lives under this key prefix."""
        return "/".join(p for p in (self.prefix.strip("/"), job, node) if p) + "/"

    def job_prefix(self, job: str) -> str:
        return "/".join(p for p in (self.prefix.strip("/"), job) if p) + "/"


class JobAssignment(Message):
    """Retained per node: everything an edge needs to run its part of a job."""

    v: Literal[1] = C.PROTOCOL_VERSION
    job: Name
    node: Name
    state: JobState = JobState.ACTIVE
    model: ModelRef
    privacy: PrivacyParams
    dataset: str
    batch_size: int = Field(ge=1, le=C.MAX_SAMPLES_PER_TRANSFER)
    chunk_bytes: int = Field(default=C.DEFAULT_CHUNK_BYTES, ge=C.MIN_CHUNK_BYTES, le=C.MAX_CHUNK_BYTES)
    window: int = Field(default=C.DEFAULT_WINDOW_CHUNKS, ge=1, le=1024)
    head: HeadManifest
    onnx: OnnxHead | None = None  # absent when the cloud could not export the head
    seed: int = 0
    store: ObjectStoreRef | None = None


class HeadChunk(Message):
    """One piece of the head's weights; its own digest lets an edge refuse a damaged piece at once."""

    v: Literal[1] = C.PROTOCOL_VERSION
    job: Name
    seq: int = Field(ge=0)
    total: int = Field(ge=1, le=-(-C.MAX_HEAD_BYTES // C.MIN_CHUNK_BYTES))
    sha256: Digest
    payload: bytes = Field(max_length=C.MAX_CHUNK_BYTES)

    @model_validator(mode="after")
    def _in_range(self) -> HeadChunk:
        if self.seq >= self.total:
            raise ValueError(f"seq {self.seq} is not below total {self.total}")
        return self


class Chunk(Message):
    """One piece of a feature transfer (a batch of samples), verified on its own and as a whole."""

    v: Literal[1] = C.PROTOCOL_VERSION
    job: Name
    node: Name
    transfer: int = Field(ge=0)
    seq: int = Field(ge=0)
    total: int = Field(ge=1, le=C.MAX_CHUNKS_PER_TRANSFER)
    size: int = Field(ge=1, le=C.MAX_TRANSFER_BYTES)
    sha256: Digest
    transfer_sha256: Digest
    payload: bytes = Field(max_length=C.MAX_CHUNK_BYTES)

    @model_validator(mode="after")
    def _consistent(self) -> Chunk:
        # A transfer's chunk count is bounded by its claimed size (and MAX_CHUNKS_PER_TRANSFER).
        if self.seq >= self.total:
            raise ValueError(f"seq {self.seq} is not below total {self.total}")
        if self.total > self.size:
            raise ValueError(f"{self.total} chunks for a transfer of {self.size} bytes")
        if not 0 < len(self.payload) <= self.size:
            raise ValueError(f"a {len(self.payload)}-byte chunk of a {self.size}-byte transfer")
        return self


class FeatureObject(Message):
    """A claim check: one transfer's bytes (a msgpack FeatureBatch) wait in the object store.

    Sent on the features topic instead of chunks when the job uses the S3 transmitter; the cloud
    downloads the object, checks its size and sha256, commits and acknowledges it as chunk 0 of 1.
    """

    v: Literal[1] = C.PROTOCOL_VERSION
    kind: Literal["object"] = "object"
    job: Name
    node: Name
    transfer: int = Field(ge=0)
    key: str = Field(min_length=1, max_length=C.MAX_OBJECT_KEY_CHARS, pattern=r"^[A-Za-z0-9_.\-/]+$")
    size: int = Field(ge=1, le=C.MAX_TRANSFER_BYTES)
    sha256: Digest


class AckKind(StrEnum):
    CHUNK = "chunk"
    REJECTED = "rejected"
    RESUME = "resume"


class Ack(Message):
    """Cloud→edge: a chunk persisted, a chunk refused (resend it), or where to resume.

    ``next_transfer`` is the count of transfers committed without gap; ``committed`` lists the
    transfers committed beyond it, so a restarted edge resends nothing already stored.
    """

    v: Literal[1] = C.PROTOCOL_VERSION
    job: Name
    node: Name
    kind: AckKind
    transfer: int | None = Field(default=None, ge=0)
    seq: int | None = Field(default=None, ge=0)
    transfer_done: bool = False
    next_transfer: int = Field(default=0, ge=0)
    committed: list[int] = Field(default_factory=list, max_length=4096)
    reason: str = ""


class FeatureLayout(Message):
    """Shape of one head output of one sample; every sample of a transfer shares the layout."""

    layer: int = Field(ge=0)
    shape: list[int] = Field(min_length=1, max_length=4)

    def elements(self) -> int:
        n = 1
        for d in self.shape:
            if d < 1:
                raise ValueError(f"feature shape {self.shape} has a non-positive dimension")
            n *= d
            if n > C.MAX_FEATURE_ELEMENTS:
                raise ValueError(f"feature shape {self.shape} exceeds {C.MAX_FEATURE_ELEMENTS} elements")
        return n


def packed_size(layout: list[FeatureLayout], bits: int) -> list[int]:
    """Bytes of each head output of one sample: its activations' bits, padded to a whole byte."""
    return [-(-f.elements() * bits // 8) for f in layout]


class SkippedSample(Message):
    """A sample the edge could not read: its index and a category (never a path or an exception text)."""

    id: int = Field(ge=0)
    reason: str = Field(max_length=64)


class FeatureBatch(Message):
    """The content of one transfer: a run of samples with their labels and packed feature bits.

    ``data`` is the samples' packed features back to back (sample-major, then layout order), so
    the only per-sample overhead on the wire is its id (its index in the edge's dataset, which is
    stable across restarts; never a file name) and its label.
    """

    v: Literal[1] = C.PROTOCOL_VERSION
    transfer: int = Field(ge=0)
    bits: int = Field(ge=1, le=8)
    layout: list[FeatureLayout] = Field(max_length=64)
    ids: list[Annotated[int, Field(ge=0)]] = Field(max_length=C.MAX_SAMPLES_PER_TRANSFER)
    labels: list[bytes] = Field(max_length=C.MAX_SAMPLES_PER_TRANSFER)
    data: bytes
    skipped: list[SkippedSample] = Field(default_factory=list, max_length=C.MAX_SAMPLES_PER_TRANSFER)

    @model_validator(mode="after")
    def _consistent(self) -> FeatureBatch:
        n = len(self.ids)
        if len(self.labels) != n:
            raise ValueError(f"{n} ids but {len(self.labels)} labels")
        if n and not self.layout:
            raise ValueError("samples without a feature layout")
        if len(self.data) != n * self.sample_bytes:
            raise ValueError(
                f"data is {len(self.data)} bytes, {n} samples of layout {self.layout} need {n * self.sample_bytes}"
            )
        return self

    @property
    def sample_bytes(self) -> int:
        return sum(packed_size(self.layout, self.bits))

    def sample_data(self, index: int) -> bytes:
        size = self.sample_bytes
        return self.data[index * size : (index + 1) * size]


def finite(values: dict[str, float]) -> dict[str, float]:
    """The finite values only: a message never carries NaN or ±Infinity (a diverged loss is left out)."""
    return {k: v for k, v in values.items() if math.isfinite(v)}


class JobPhase(StrEnum):
    PENDING = "pending"
    ADAPTING = "adapting"
    COLLECTING = "collecting"
    TRAINING = "training"
    EVALUATING = "evaluating"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class PrivacyAccount(Message):
    """What one edge's features cost in privacy, as the mechanism (``common.privacy``) defines it.

    ``epsilon`` is the job's budget per activation (the reference implementation's ε); each released
    activation is ``activation_epsilon``-LDP (``ln(p/q) = ε/2``, the MistNet paper's ε); a sample
    releases ``activations`` of them once, so by composition (the paper's Theorem 4.1) it is
    ``sample_epsilon``-LDP. Labels, counts and timing are outside this bound (docs/security.md).
    """

    epsilon: float = Field(gt=0)
    bits: int = Field(ge=1, le=8)
    activations: int = Field(ge=0, description="activations released per sample")
    activation_epsilon: float = Field(ge=0)
    sample_epsilon: float = Field(ge=0)


class EdgeProgress(Message):
    state: str = "waiting"
    samples: int = 0
    skipped: int = 0
    total: int | None = None
    wire_bytes: int = 0
    missing_reason: str = ""
    message: str = ""  # the edge's own last word (e.g. an object-store error it keeps retrying)
    privacy: PrivacyAccount | None = None


class JobStatus(Message):
    """Retained on the job's status topic after every step of the cloud."""

    v: Literal[1] = C.PROTOCOL_VERSION
    job: Name
    phase: JobPhase
    edges: dict[str, EdgeProgress] = Field(default_factory=dict)
    epoch: int = 0
    epochs: int = 0
    loss: float | None = None
    losses: dict[str, float] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    checkpoint: str | None = None
    message: str = ""
    time: float = 0.0


class ControlAction(StrEnum):
    CANCEL = "cancel"


class Control(Message):
    """An operator's command to a job's cloud agent (``mistnet job cancel``)."""

    v: Literal[1] = C.PROTOCOL_VERSION
    job: Name
    action: ControlAction
    reason: str = Field(default="", max_length=500)


class CheckpointAnnouncement(Message):
    v: Literal[1] = C.PROTOCOL_VERSION
    job: Name
    epoch: int = Field(ge=0)
    url: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)
    final: bool = False


# Encoding --------------------------------------------------------------------------------------

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


def decode_features(payload: bytes) -> Chunk | FeatureObject:
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


def encode_batch(batch: FeatureBatch) -> bytes:
    return to_msgpack(batch)


def decode_batch(blob: bytes) -> FeatureBatch:
    return from_msgpack(FeatureBatch, blob, C.MAX_TRANSFER_BYTES)


class EdgeSummary(Message):
    samples: int
    skipped: int = 0
    wire_bytes: int
    missing_reason: str = ""
    privacy: PrivacyAccount | None = None


class JobSummary(Message):
    """What ``mistnet cloud --json`` and ``mistnet demo --json`` print: exactly one object."""

    job: Name
    phase: JobPhase
    edges: dict[str, EdgeSummary]
    metrics: dict[str, float]
    checkpoint: str | None
    duration_s: float
    message: str = ""  # why the job failed or was cancelled
    # The epoch whose weights shipped, chosen on received samples held back from training (0: none
    # beat the model before training); None: no selection (too few samples, or selection_fraction 0).
    selected_epoch: int | None = None
    world_size: int = Field(default=1, ge=1)  # training processes (torchrun ranks) that trained the tail
