"""What nodes and jobs report: node and job status (retained), checkpoint announcements, and the
summary ``mistnet cloud --json`` prints."""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Literal

from pydantic import Field

from common import constants as C
from common.jobspec.spec import Name
from common.protocol.messages import Message


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


class CheckpointAnnouncement(Message):
    v: Literal[1] = C.PROTOCOL_VERSION
    job: Name
    epoch: int = Field(ge=0)
    url: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)
    final: bool = False


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
