"""Model architectures by name and what either side needs to know of them without building one
(an edge with the onnx runtime has no torch to build a model with)."""

from __future__ import annotations

from common.errors import SpecError

YOLO_ARCHS = ("yolov5n", "yolov5s", "yolov5m", "yolov5l", "yolov5x")
ARCHS = ("lenet5", *YOLO_ARCHS)


def is_detector(arch: str) -> bool:
    return arch in YOLO_ARCHS


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
