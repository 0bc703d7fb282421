"""The job's model in and out of files: its pretrained weights read, the trained model written with the
job's settings. The file format and its untrusting reader are :mod:`common.checkpoint`; nothing is executed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from common.checkpoint import load_model, save_checkpoint
from common.errors import CheckpointError
from common.jobspec import JobSpec
from common.storage import is_s3


def load_pretrained(url: str, arch: str, num_classes: int) -> nn.Module:
    """The job's model with its pretrained weights; a file of another arch or class count is refused."""
    if is_s3(url):
        raise CheckpointError(f"pretrained weights from {url}: fetch them to a local path first")
    model, _ = load_model(Path(url), arch, num_classes or None)
    return model


def save_model(
    model: nn.Module,
    spec: JobSpec,
    num_classes: int,
    image_size: int,
    encoding: Mapping[str, Any],
    path: Path,
    privacy: Mapping[str, Any] | None = None,
) -> bytes:
    """The whole model (head + cut decoder + tail) with the MistNet settings ``mistnet eval`` needs
    to replay the deployed path: cut, ε, bits, thresholds, the decoder's configuration and where the
    head's BatchNorm statistics come from; and the
    record of what the edges' data cost in privacy (``privacy``: per edge, its PrivacyAccount)."""
    meta = {
        **encoding,
        "arch": spec.model.arch,
        "num_classes": num_classes,
        "image_size": image_size,
        "cut_layer": spec.cut_layer,
        "head_statistics": spec.model.head_statistics.value,
        "epsilon": spec.privacy.epsilon,
        "job": spec.name,
        **({"privacy": dict(privacy)} if privacy is not None else {}),
    }
    save_checkpoint(path, model.state_dict(), meta)
    return path.read_bytes()
