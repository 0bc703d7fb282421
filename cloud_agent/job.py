"""One cloud job's state, which every phase reads: its spec, work directory, spool, model and the
feature encoding edges use. Rank 0 (the cloud agent) and the other training ranks both hold one.

The state lives in ``workdir`` (spool, phase, per-epoch training state), so a restarted cloud
picks up where it stopped: spooled features are kept and training resumes after the last
completed epoch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import ValidationError
from torch import nn

from cloud_agent.adaptation import Adaptation
from cloud_agent.feature_store import store_options
from cloud_agent.model_io import load_pretrained
from cloud_agent.spool import Spool
from cloud_agent.trainer import History
from common.errors import SpecError
from common.jobspec import JobSpec
from common.models.cutdecoder import attach
from common.models.registry import build, default_image_size, input_channels, is_detector
from common.privacy import feature_transform
from common.protocol import FeatureObject, JobPhase, ObjectStoreRef
from common.split import check_cut, head_activations, tail_inputs
from common.storage import ObjectStore, S3Options, split_s3

if TYPE_CHECKING:
    from cloud_agent.distributed import Ranks

Features = dict[int, torch.Tensor]
Pump = Callable[[float], None]  # handles the inbox, waiting up to that many seconds for a first message


@dataclass
class Job:
    """``ranks``: the training processes when torchrun started this one (docs/deploy.md); ``store_ref``
    and ``store``: the S3 transmitter, when the job names one (what edges are told, and the cloud's client)."""

    spec: JobSpec
    workdir: Path
    device: str
    ranks: Ranks | None
    spool: Spool
    model: nn.Module
    adaptation: Adaptation
    store_ref: ObjectStoreRef | None
    store: ObjectStore | None
    # built on first use: a job of more than 1 bit has no levels before its thresholds are calibrated
    transform: Callable[[Features], Features] | None = None

    @classmethod
    def open(cls, spec: JobSpec, workdir: Path, device: str, ranks: Ranks | None) -> Job:
        spool = Spool(workdir / "spool.sqlite")
        model = starting_model(spec)
        adaptation = Adaptation(spec.bits, {}, None)
        return cls(spec, workdir, device, ranks, spool, model, adaptation, *object_store(spec))

    @property
    def cut(self) -> int:
        return self.spec.cut_layer

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or self.spec.model.num_classes or 0) or (
            80 if is_detector(self.spec.model.arch) else 10
        )

    @property
    def image_size(self) -> int:
        return self.spec.model.image_size or default_image_size(self.spec.model.arch)

    @property
    def phase(self) -> JobPhase:
        return JobPhase(self.spool.get_meta("phase") or JobPhase.PENDING)

    @property
    def adaptation_path(self) -> Path:
        return self.workdir / "adaptation.safetensors"

    def load_adaptation(self) -> bool:
        """The adaptation saved in the work directory, if there is one (a restarted cloud, a rank > 0)."""
        if not self.adaptation_path.exists():
            return False
        self.use_adaptation(Adaptation.load(self.adaptation_path))
        return True

    def use_adaptation(self, adaptation: Adaptation) -> None:
        """The thresholds edges encode with, and the cut decoder in front of the tail if it has one."""
        self.adaptation = adaptation
        self.transform = None
        if adaptation.decoder is not None:
            attach(self.model, adaptation.decoder.to(self.device))

    def privatize(self, features: Features) -> Features:
        """Held-out inputs take the deployed path: the job's quantisation, no randomization."""
        if self.transform is None:
            self.transform = feature_transform(self.adaptation.encoding())
        return self.transform(features)

    def released_activations(self) -> int:
        """Activations an edge releases per sample: the head's outputs the tail reads, their shapes
        from a skeleton of the model on the meta device (nothing allocated or computed)."""
        with torch.device("meta"):
            skeleton = build(self.spec.model.arch, self.num_classes)
        size = self.image_size
        return head_activations(skeleton, self.cut, (input_channels(self.spec.model.arch), size, size))

    def delivered(self) -> list[str]:
        return [e.node for e in self.spec.edges if self.spool.counts(e.node).samples > 0]

    def training_samples(self) -> int:
        return sum(self.spool.counts(e.node).samples for e in self.spec.edges)

    def metrics(self) -> dict[str, float]:
        """Held-out metrics of the shipped model (the selected epoch's, else the last evaluated) and before."""
        history = History.from_json(self.spool.get_meta("history"))
        with_metrics = [e for e in history.epochs if e.metrics]
        before = json.loads(self.spool.get_meta("metrics_before") or "{}")
        after = with_metrics[-1].metrics if with_metrics else {}
        selection = self.spool.get_meta("selection")
        if selection:
            after = json.loads(selection)["metrics"]
        return {**after, **{f"{k}_before": v for k, v in before.items()}}

    @property
    def selected_epoch(self) -> int | None:
        selection = self.spool.get_meta("selection")
        return int(json.loads(selection)["epoch"]) if selection else None

    def s3_options(self) -> S3Options | None:
        """The S3 transmitter's settings (its Sedna Secret's keys) over the MISTNET_S3_* environment; None
        without one."""
        return store_options(self.spec) if self.spec.transmitter.s3 is not None else None

    def fetch_object(self, claim: FeatureObject) -> bytes:
        assert self.store is not None
        return self.store.get(claim.key, claim.size)


def starting_model(spec: JobSpec) -> nn.Module:
    """The job's model before training: its pretrained weights, or fresh ones without any."""
    m = spec.model
    model = load_pretrained(m.pretrained, m.arch, m.num_classes) if m.pretrained else build(m.arch, m.num_classes)
    check_cut(model, spec.cut_layer)
    tail_inputs(model, spec.cut_layer)
    return model


def object_store(spec: JobSpec) -> tuple[ObjectStoreRef | None, ObjectStore | None]:
    """The S3 transmitter, when the job names one: what edges are told, and the cloud's client."""
    s3 = spec.transmitter.s3
    if s3 is None:
        return None, None
    bucket, prefix = split_s3(s3.bucket_path)
    try:
        ref = ObjectStoreRef(bucket=bucket, prefix=prefix.strip("/"), endpoint_url=s3.endpoint_url, region=s3.region)
    except ValidationError as exc:
        raise SpecError(
            f"transmitter.s3: {s3.bucket_path!r} is not a usable bucket/prefix ({exc.errors()[0]['msg']})"
        ) from None
    return ref, ObjectStore(bucket, store_options(spec))
