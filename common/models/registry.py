"""Model architectures by name, so a job spec can say ``arch: yolov5s`` and both sides agree."""

from __future__ import annotations

from torch import nn

from common.errors import SpecError
from common.models.lenet import LeNet5

YOLO_ARCHS = ("yolov5n", "yolov5s", "yolov5m", "yolov5l", "yolov5x")
ARCHS = ("lenet5", *YOLO_ARCHS)


def is_detector(arch: str) -> bool:
    return arch in YOLO_ARCHS


def build(arch: str, num_classes: int) -> nn.Module:
    if arch == "lenet5":
        return LeNet5(num_classes or 10)
    if arch in YOLO_ARCHS:
        from common.models.yolo import build_model

        return build_model(arch, num_classes or 80)
    raise SpecError(f"unknown model arch {arch!r}; choose one of {', '.join(ARCHS)}")


def layer_count(arch: str) -> int:
    """Number of routed layers; a cut is valid in 1..layer_count-1 (YOLO: up to the backbone end)."""
    if arch == "lenet5":
        return 8
    if arch in YOLO_ARCHS:
        return 25
    raise SpecError(f"unknown model arch {arch!r}; choose one of {', '.join(ARCHS)}")


def default_image_size(arch: str) -> int:
    return 28 if arch == "lenet5" else 640


def input_channels(arch: str) -> int:
    return 1 if arch == "lenet5" else 3
