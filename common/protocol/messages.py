"""The schemas of what drives a job over the broker: assignments, head and feature chunks,
object claims, acknowledgements and operator commands (status reports are in :mod:`.status`)."""

from __future__ import annotations

import itertools
import math
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from common import constants as C
from common.jobspec.spec import HeadStatistics, Name

Digest = Annotated[bytes, Field(min_length=32, max_length=32)]


class Message(BaseModel):
    """Strict, closed schemas: unknown fields, wrong types and non-finite floats (NaN, ±Infinity,
    which JSON parsers accept as literals) are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelRef(Message):
    """What the edge needs to rebuild the head: architecture, cut and input geometry."""

    arch: str
    num_classes: int = Field(ge=1)
    cut_layer: int = Field(ge=1)
    image_size: int = Field(default=0, ge=0)
    options: dict[str, Any] = Field(default_factory=dict)
    # Absent from an older cloud's assignment: the pretrained statistics, as edges then ran.
    head_statistics: HeadStatistics = HeadStatistics.PRETRAINED


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


class ControlAction(StrEnum):
    CANCEL = "cancel"


class Control(Message):
    """An operator's command to a job's cloud agent (``mistnet job cancel``)."""

    v: Literal[1] = C.PROTOCOL_VERSION
    job: Name
    action: ControlAction
    reason: str = Field(default="", max_length=500)
