"""Reading pretrained weights and writing the trained model, never executing anything."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save as st_save
from torch import nn


from common.errors import CheckpointError
from common.spec import JobSpec
from common.storage import is_s3


def load_pretrained(url: str, arch: str, num_classes: int, model: nn.Module) -> nn.Module:
    """Pretrained weights into ``model``; a fresh model is built if the class count differs."""
    if is_s3(url):
        raise CheckpointError(f"pretrained weights from {url}: fetch them to a local path first")
    from common.checkpoint import load_weights

    loaded = load_weights(Path(url))
    if loaded.arch != arch:
        raise CheckpointError(f"{url} holds a {loaded.arch} model, the job says {arch}")
    if num_classes and loaded.num_classes != num_classes:
        raise CheckpointError(f"{url} has {loaded.num_classes} classes, the job says {num_classes}")
    from common.models.registry import build

    model = build(arch, loaded.num_classes)
    missing, unexpected = model.load_state_dict(loaded.state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{url} does not fit {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def save_model(model: nn.Module, spec: JobSpec, num_classes: int, image_size: int) -> bytes:
    """The whole model (head + tail) with the MistNet settings ``mistnet eval`` needs to replay it."""
    meta = {
        "arch": spec.model.arch,
        "num_classes": num_classes,
        "image_size": image_size,
        "cut_layer": spec.cut_layer,
        "epsilon": spec.privacy.epsilon,
        "bits": spec.privacy.bits,
        "job": spec.name,
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return bytes(st_save(state, metadata={"mistnet": json.dumps(meta)}))
