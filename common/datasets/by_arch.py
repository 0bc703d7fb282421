"""What differs between scenarios on the edge: how local data is read for a given architecture."""

from __future__ import annotations

from pathlib import Path

from common.datasets.base import EdgeDataset
from common.datasets.mnist import MnistShard
from common.errors import DatasetError
from common.models.archs import YOLO_ARCHS, default_image_size


def open_edge_dataset(arch: str, path: Path, image_size: int = 0) -> EdgeDataset:
    if arch == "lenet5":
        return MnistShard(path)
    if arch in YOLO_ARCHS:
        from common.datasets.yolo import YoloEdgeDataset

        return YoloEdgeDataset(path, image_size or default_image_size(arch))
    raise DatasetError(f"no dataset reader for model arch {arch!r}")
