"""Job specifications: the one source of truth for what a job is.

Two input forms are accepted and produce the same :class:`JobSpec`: the compact native YAML
(``kind: MistNetJob``, see ``common.jobspec.jobfile`` and ``docs/job-spec.md``) and the KubeEdge Sedna
multi-document manifest (see ``common.jobspec.sedna``).

Build a spec from untrusted data with :func:`build_job`: it runs the pydantic model *and* the checks
that need the model registry (the architecture exists, the cut layer is in range) and raises
:class:`JobSpecInvalid` (a :class:`~common.errors.SpecError`) whose ``issues`` name each bad field by
its path in the spec (``edges[1].epsilon``). Loaders map those paths back to where the value came from
in the user's file.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common import constants as C
from common.errors import SpecError

# Node and job ids: they become MQTT topic levels and client ids (common.protocol.topics), so no
# wildcards, slashes or empties. The one definition, shared with the protocol's messages.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
NAME_RULE = "letters, digits, '_', '.', '-'; starts with a letter or digit; at most 63 characters"

Loc = tuple[str | int, ...]
LayerCount = Callable[[str], int]

# Architectures whose cut is limited to the backbone: a YOLOv5 v6 model has 25 routed layers
# (0..24) and its backbone ends at layer 9, so the edge may run at most layers 0..9 (cut 10).
YOLO_BACKBONE_END = 9
_FALLBACK_LAYERS = {"lenet5": 8, **{f"yolov5{s}": 25 for s in "nsmlx"}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class HeadStatistics(StrEnum):
    LOCAL = "local"
    PRETRAINED = "pretrained"


class ModelSpec(Strict):
    arch: str = Field(description="lenet5, yolov5n, yolov5s, yolov5m, yolov5l or yolov5x")
    num_classes: int = Field(default=0, ge=0, description="0: taken from the pretrained weights")
    pretrained: str | None = Field(default=None, description="local path or s3:// URL of the weights")
    image_size: int = Field(default=0, ge=0, description="input size in pixels; 0: the model's default")
    head_statistics: HeadStatistics = Field(
        default=HeadStatistics.LOCAL,
        description="local: each edge re-estimates its head's BatchNorm statistics on its own images "
        "before extracting (kept on the edge), and the model is evaluated with the statistics of the "
        "images it scores; pretrained: the weights' statistics everywhere",
    )


class Thresholding(StrEnum):
    AUTO = "auto"
    ZERO = "zero"
    CALIBRATED = "calibrated"


class PrivacySpec(Strict):
    epsilon: float = Field(
        default=C.DEFAULT_EPSILON,
        gt=0,
        allow_inf_nan=False,
        description="LDP budget per bit (the reference implementation's ε: twice the paper's)",
    )
    bits: Annotated[int, Field(ge=1, le=8)] | Literal["auto"] = Field(
        default="auto",
        description="bits per activation on the wire; auto: with calibrated thresholds, the most of 1, 2 and 4 "
        "at which randomized response at the smallest edge ε replaces no more levels than 1 bit at ε 4 (4 bits "
        "from ε 9.4, 2 from ε 6.2), else 1",
    )
    thresholds: Thresholding = Field(
        default=Thresholding.AUTO,
        description="zero: a bit is x > 0 (the reference); calibrated: per-channel quantiles of the "
        "pretrained head's activations on cloud.public, equally likely levels; auto: calibrated when "
        "cloud.public is set",
    )

    @field_validator("bits", mode="before")
    @classmethod
    def _bits(cls, value: object) -> object:
        """One plain error for a bad value instead of one per member of the union."""
        if value == "auto" or (type(value) is int and 1 <= value <= 8):
            return value
        raise ValueError("must be auto or a whole number of bits from 1 to 8")


class EdgeSpec(Strict):
    node: Name = Field(description="the edge node's id; also its MQTT client id and topic level")
    dataset: str = Field(min_length=1, description="where this node's data lives, as seen by the edge")
    batch_size: int = Field(
        default=C.DEFAULT_BATCH_SIZE,
        ge=1,
        le=C.MAX_SAMPLES_PER_TRANSFER,
        description="samples per feature transfer",
    )
    epsilon: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="overrides privacy.epsilon for this edge"
    )
    epochs: int | None = Field(
        default=None,
        ge=0,
        description="recorded only (Sedna trainingWorker env): MistNet edges run the head once, they do not train",
    )


class OnTimeout(StrEnum):
    PROCEED = "proceed"
    FAIL = "fail"


class CollectSpec(Strict):
    timeout_s: float = Field(
        default=C.DEFAULT_COLLECT_TIMEOUT_S,
        gt=0,
        allow_inf_nan=False,
        description="how long the cloud waits for edges' features",
    )
    min_edges: int = Field(default=1, ge=1, description="edges that must deliver before training starts")
    on_timeout: OnTimeout = Field(
        default=OnTimeout.PROCEED, description="proceed with the edges that delivered, or fail the job"
    )


class AdaptSpec(Strict):
    """The cut decoder: a small network the cloud trains on public images, before the job, to map the
    (randomized) levels that cross the cut back to the activations the pretrained tail expects."""

    decoder: bool = Field(default=True, description="train a cut decoder when cloud.public is set")
    epochs: int = Field(default=C.DEFAULT_DECODER_EPOCHS, ge=1, description="passes over the public features")
    width: int = Field(default=C.DEFAULT_DECODER_WIDTH, ge=8, le=1024, description="hidden channels")
    learning_rate: float = Field(default=C.DEFAULT_DECODER_LEARNING_RATE, gt=0, allow_inf_nan=False)
    distill: float = Field(
        default=1.0,
        ge=0,
        allow_inf_nan=False,
        description="weight of distillation from the pretrained tail (its first distill_layers outputs on "
        "decoded vs real activations); 0: off",
    )
    distill_layers: int = Field(default=3, ge=1, description="tail layers whose outputs are distilled")


def s3_url(value: str) -> str:
    if not value.startswith("s3://") or len(value) <= len("s3://") or value[5] == "/":
        raise ValueError("must be an s3://bucket[/prefix] URL")
    return value


class CloudSpec(Strict):
    node: str = Field(default="cloud", min_length=1, description="the node that trains the tail")
    epochs: int = Field(default=C.DEFAULT_EPOCHS, ge=0, description="training epochs of the tail")
    batch_size: int = Field(default=C.DEFAULT_BATCH_SIZE, ge=1, description="training batch size")
    learning_rate: float = Field(default=C.DEFAULT_LEARNING_RATE, gt=0, allow_inf_nan=False)
    validation: str | None = Field(default=None, description="held-out data the cloud evaluates on")
    output: str = Field(default="", description="checkpoint URL: a local path or s3://bucket/key")
    eval_interval: int = Field(default=1, ge=1, description="evaluate every this many epochs")
    public: str | None = Field(
        default=None,
        description="unlabelled public images (a folder) the cloud adapts the tail with before the job: "
        "threshold calibration and the cut decoder; never edge data",
    )
    adapt: AdaptSpec = Field(default_factory=AdaptSpec)
    tail_layers: int | None = Field(
        default=None,
        ge=0,
        description="train only this many tail layers next to the cut; none: the whole tail",
    )
    train_decoder: bool = Field(
        default=True,
        description="also train the cut decoder on the edges' levels, with the tail: it learns what the edges' "
        "conditions do to the features (coco-person contrast:5: 0.176 held-out mAP50-95 at ε 100 and 0.162 at ε 4, "
        "against 0.159 and 0.149 with the decoder kept as adapted, docs/privacy-utility.md)",
    )
    translate: int = Field(
        default=C.DEFAULT_TRANSLATE_CELLS,
        ge=0,
        description="detection: each training batch's feature maps move by a random whole number of cells, up to "
        "this many each way, with their boxes (what the edge would send for the image moved by as many strides); "
        "0: no augmentation",
    )
    selection_fraction: float = Field(
        default=C.DEFAULT_SELECTION_FRACTION,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="share of the received samples held back from training to choose the epoch that ships "
        "(lowest loss; epoch 0, the model before training, included); 0: train on all, ship the last epoch",
    )
    held_out_veto: bool = Field(
        default=True,
        description="with cloud.validation: when the epoch the held-back received samples chose scores below the "
        "model before training on the held-out data, the model before training ships (and the job says so)",
    )
    feature_store: str | None = Field(
        default=None,
        description="s3://bucket[/prefix] where the cloud puts the committed samples after collection (objects "
        "plus an index), so training ranks on any node read them there instead of from the spool on rank 0's "
        "disk; with the S3 transmitter and none named, the edges' own objects are the store",
    )

    @field_validator("feature_store")
    @classmethod
    def _store_url(cls, value: str | None) -> str | None:
        return None if value is None else s3_url(value)


class S3Spec(Strict):
    endpoint_url: str | None = Field(default=None, description="e.g. https://minio:9000; None: AWS")
    bucket_path: str = Field(description="s3://bucket/prefix for feature objects")
    access_key: str | None = Field(default=None, repr=False)
    secret_key: str | None = Field(default=None, repr=False)
    region: str | None = None
    cleanup: bool = Field(default=True, description="delete feature objects once the cloud has them")

    @field_validator("bucket_path")
    @classmethod
    def _s3_url(cls, value: str) -> str:
        return s3_url(value)


class TransmitterSpec(Strict):
    s3: S3Spec | None = Field(default=None, description="None: features travel over MQTT (the default)")


class JobSpec(Strict):
    name: Name
    model: ModelSpec
    cut_layer: int = Field(ge=1, description="the edge runs layers [0, cut_layer), the cloud the rest")
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    edges: list[EdgeSpec] = Field(min_length=1)
    cloud: CloudSpec = Field(default_factory=CloudSpec)
    collect: CollectSpec = Field(default_factory=CollectSpec)
    transmitter: TransmitterSpec = Field(default_factory=TransmitterSpec)
    seed: int = 0

    @field_validator("edges")
    @classmethod
    def _distinct_nodes(cls, edges: list[EdgeSpec]) -> list[EdgeSpec]:
        seen: set[str] = set()
        for edge in edges:
            if edge.node in seen:
                raise ValueError(f"duplicate node {edge.node!r} in edges")
            seen.add(edge.node)
        return edges

    @model_validator(mode="after")
    def _enough_edges(self) -> JobSpec:
        if self.collect.min_edges > len(self.edges):
            raise ValueError(f"collect.min_edges {self.collect.min_edges} exceeds the {len(self.edges)} edges")
        return self

    @model_validator(mode="after")
    def _calibration_has_data(self) -> JobSpec:
        many_bits = self.privacy.bits != "auto" and self.privacy.bits > 1
        if self.cloud.public is None and (self.privacy.thresholds == Thresholding.CALIBRATED or many_bits):
            raise ValueError(
                "calibrated thresholds (and any privacy.bits above 1) need public images: set cloud.public"
            )
        return self

    @property
    def calibrated(self) -> bool:
        """Whether the cloud calibrates thresholds on public images before assigning the job."""
        return self.privacy.thresholds == Thresholding.CALIBRATED or (
            self.privacy.thresholds == Thresholding.AUTO and self.cloud.public is not None
        )

    @property
    def bits(self) -> int:
        """Bits per activation every edge of the job sends: ``privacy.bits``, or what ``auto`` resolves to."""
        if self.privacy.bits != "auto":
            return self.privacy.bits
        if not self.calibrated:
            return 1  # more levels need thresholds calibrated on public images
        return auto_bits(self.smallest_epsilon)

    @property
    def smallest_epsilon(self) -> float:
        """The strongest randomization any edge of the job applies: what every edge's data must bear."""
        return min(self.epsilon_for(edge.node) for edge in self.edges)

    def epsilon_for(self, node: str) -> float:
        edge = self.edge(node)
        return edge.epsilon if edge.epsilon is not None else self.privacy.epsilon

    def edge(self, node: str) -> EdgeSpec:
        for edge in self.edges:
            if edge.node == node:
                return edge
        raise KeyError(node)


def auto_bits(epsilon: float) -> int:
    """The most bits of ``AUTO_BITS_CHOICES`` whose randomized response at ``epsilon`` replaces a level no
    more often than 1 bit does at ``AUTO_BITS_EPSILON``. K levels are replaced with probability
    ``(K - 1) / (e^(ε/2) + K - 1)`` (:func:`common.mechanism.flip_probability`), which is at most 1 bit's
    at ε0 exactly when ``ε ≥ ε0 + 2 ln(K - 1)``."""
    fits = [b for b in C.AUTO_BITS_CHOICES if epsilon >= C.AUTO_BITS_EPSILON + 2 * math.log(2**b - 1)]
    return max(fits, default=1)


# Checks that need the model registry ---------------------------------------------------------------


def registry_layer_count(arch: str) -> int:
    """``common.models.registry.layer_count`` when importable, else a small built-in table."""
    try:
        from common.models.archs import layer_count
    except ImportError:
        if arch not in _FALLBACK_LAYERS:
            raise SpecError(f"unknown model arch {arch!r}; choose one of {', '.join(_FALLBACK_LAYERS)}") from None
        return _FALLBACK_LAYERS[arch]
    return layer_count(arch)


def known_archs() -> tuple[str, ...]:
    """Architecture names the registry knows (the built-in table when it cannot be imported)."""
    try:
        from common.models.archs import ARCHS
    except ImportError:
        return tuple(_FALLBACK_LAYERS)
    return tuple(ARCHS)


def is_yolo(arch: str) -> bool:
    return arch.startswith("yolov5")


def max_cut(arch: str, layer_count: LayerCount | None = None) -> int:
    """Largest valid cut: ``n - 1`` (the cloud keeps at least one layer), capped for YOLOv5 at the
    end of the backbone (``YOLO_BACKBONE_END + 1``). Raises SpecError for an unknown arch."""
    n = (layer_count or registry_layer_count)(arch)
    top = n - 1
    if is_yolo(arch):
        top = min(top, YOLO_BACKBONE_END + 1)
    return top


@dataclass(frozen=True)
class Issue:
    """One problem with one field: ``loc`` is the field's path in the JobSpec (``()`` = the job)."""

    loc: Loc
    problem: str
    value: Any = None
    has_value: bool = False

    def text(self) -> str:
        where = format_loc(self.loc) or "job"
        shown = f"{show_value(self.value)} " if self.has_value else ""
        return f"{where}: {shown}{self.problem}"


class JobSpecInvalid(SpecError):
    """A JobSpec could not be built; ``issues`` says which fields are wrong and why."""

    def __init__(self, issues: Sequence[Issue]):
        self.issues = list(issues)
        super().__init__(join_problems([i.text() for i in self.issues]))


def join_problems(texts: Sequence[str], limit: int = 5) -> str:
    shown = "; ".join(texts[:limit])
    if len(texts) > limit:
        shown += f" (and {len(texts) - limit} more)"
    return shown


def format_loc(loc: Sequence[str | int]) -> str:
    """``("edges", 1, "epsilon")`` → ``edges[1].epsilon``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def show_value(value: Any) -> str:
    """A scalar as the user wrote it (strings quoted), a container by its kind only."""
    if isinstance(value, Mapping):
        return "(a mapping)"
    if isinstance(value, list | tuple | set):
        return "(a list)"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_job(spec: JobSpec, layer_count: LayerCount | None = None) -> list[Issue]:
    """Problems a valid-looking spec can still have: unknown arch, cut out of range, bad image size."""
    arch = spec.model.arch
    try:
        top = max_cut(arch, layer_count)
    except SpecError as exc:
        return [Issue(("model", "arch"), str(exc))]
    issues = []
    if not 1 <= spec.cut_layer <= top:
        issues.append(
            Issue(
                ("cut_layer",),
                f"is out of range for {arch}: valid 1..{top}",
                spec.cut_layer,
                has_value=True,
            )
        )
    if is_yolo(arch) and spec.model.image_size % 32:
        issues.append(
            Issue(("model", "image_size"), "must be a multiple of 32 for YOLOv5", spec.model.image_size, True)
        )
    return issues


def build_job(data: Any, layer_count: LayerCount | None = None) -> JobSpec:
    """Validate ``data`` (a mapping in the native form) into a JobSpec, or raise JobSpecInvalid."""
    if not isinstance(data, Mapping):
        raise JobSpecInvalid([Issue((), "a job must be a mapping of fields")])
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise JobSpecInvalid(issues_from(exc)) from None
    issues = check_job(spec, layer_count)
    if issues:
        raise JobSpecInvalid(issues)
    return spec


# Pydantic errors → plain words ---------------------------------------------------------------------

_PHRASES: dict[str, str] = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "missing": "is required",
    "int_parsing": "is not an integer",
    "int_type": "is not an integer",
    "int_from_float": "is not an integer",
    "float_parsing": "is not a number",
    "float_type": "is not a number",
    "finite_number": "is not a finite number",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "too_short": "must have at least {min_length} items",
    "enum": "must be one of {expected}",
    "string_pattern_mismatch": "is not a valid name (" + NAME_RULE + ")",
}


def issues_from(exc: ValidationError, model: type[BaseModel] = JobSpec) -> list[Issue]:
    issues = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if isinstance(p, str | int))
        kind = err["type"]
        ctx = err.get("ctx") or {}
        if kind == "extra_forbidden":
            issues.append(Issue(loc, _unknown_field(model, loc)))
            continue
        if kind == "too_short" and ctx.get("min_length") == 1:
            problem = "must not be empty"
        elif kind in _PHRASES:
            try:
                problem = _PHRASES[kind].format(**{k: _plain(v) for k, v in ctx.items()})
            except (KeyError, IndexError):
                problem = err["msg"]
        elif kind == "value_error":
            problem = str(ctx.get("error", err["msg"]))
        else:
            problem = err["msg"][:1].lower() + err["msg"][1:]
        value = err.get("input")
        has_value = kind != "missing" and "input" in err and (value is None or isinstance(value, str | int | float))
        issues.append(Issue(loc, problem, value, has_value))
    return issues


def _plain(value: Any) -> Any:
    """``0.0`` → ``0`` in messages."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _unknown_field(model: type[BaseModel], loc: Loc) -> str:
    known = fields_at(model, loc[:-1])
    problem = "is not a known field"
    if known and loc and isinstance(loc[-1], str):
        close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
        if close:
            return f"{problem} (did you mean {close[0]!r}?)"
        return f"{problem}; known: {', '.join(known)}"
    return problem


def fields_at(model: type[BaseModel], loc: Loc) -> list[str]:
    """Field names of the model found at ``loc`` (list indices skipped), [] if there is none."""
    target: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(target, type) and issubclass(target, BaseModel)) or part not in target.model_fields:
            return []
        target = _model_in(target.model_fields[part].annotation)
    if isinstance(target, type) and issubclass(target, BaseModel):
        return list(target.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    """The BaseModel inside ``X``, ``X | None`` or ``list[X]``; the annotation otherwise."""
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if isinstance(found, type) and issubclass(found, BaseModel):
                return found
    return annotation
