"""Model architectures by name, so a job spec can say ``arch: yolov5s`` and both sides agree."""

from __future__ import annotations

from torch import nn

from common.errors import SpecError
from common.models.archs import ARCHS, YOLO_ARCHS
from common.models.archs import default_image_size as default_image_size
from common.models.archs import input_channels as input_channels
from common.models.archs import is_detector as is_detector
from common.models.archs import layer_count as layer_count
from common.models.lenet import LeNet5


def build(arch: str, num_classes: int) -> nn.Module:
    if arch == "lenet5":
        return LeNet5(num_classes or 10)
    if arch in YOLO_ARCHS:
        from common.models.yolo import build_model

        return build_model(arch, num_classes or 80)
    raise SpecError(f"unknown model arch {arch!r}; choose one of {', '.join(ARCHS)}")
