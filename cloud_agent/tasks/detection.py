"""The detection scenario on the cloud (YOLOv5): batching boxes, the YOLOv5 loss, held-out mAP.

Edges send each image's boxes as float32 rows ``(cls, cx, cy, w, h)`` normalized to the square
letterboxed input the head saw (:func:`common.datasets.yolo.encode_labels`). ``collate`` turns a
batch of spooled samples into the decoded bit features and upstream's target layout
``[n, 6] = (image index in batch, cls, cx, cy, w, h)``.

Held-out accuracy is mAP@0.5 and mAP@0.5:0.95 on the cloud's validation folder (YOLO layout),
through the deployed path: head → binarization → tail → NMS (:func:`common.evaluation.split_predict_fn`),
with every image letterboxed to the same square the edges use (``rect=False``), at the job's image size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cloud_agent.spool import StoredSample
from cloud_agent.tasks.base import Batch, Privatize, stack_features
from cloud_agent.yolo_loss import YoloLoss
from common.datasets.yolo import YoloDataset, decode_labels
from common.evaluation import (
    CONF_THRES,
    IOU_THRES,
    MAX_DET,
    PredictFn,
    evaluate_detections,
    evaluate_model,
    predictions_of,
    split_predict_fn,
    with_local_head,
)
from common.yolo_postprocess import non_max_suppression

EVAL_BATCH_SIZE = 16


def targets_of(labels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image ``[n_i, 5]`` (cls, cx, cy, w, h) to one ``[sum n_i, 6]`` with the image index first."""
    rows = [torch.cat((torch.full((len(t), 1), float(i)), t), 1) for i, t in enumerate(labels)]
    return torch.cat(rows, 0) if rows else torch.zeros((0, 6))


@dataclass
class DetectionTally:
    detections: list[torch.Tensor]  # per image [n, 6]: x1, y1, x2, y2, conf, cls
    labels: list[np.ndarray]  # per image [m, 5]: cls, cx, cy, w, h (normalized)
    num_classes: int


class Detection:
    """YOLOv5 on images: upstream's loss, held-out mAP@0.5 and mAP@0.5:0.95."""

    headline = "map50_95"

    def __init__(self, validation: Path | None, image_size: int, translate: int = 0, local_head: bool = False) -> None:
        """Without ``validation`` the job trains but reports no mAP: never one measured on training images.
        ``translate``: training batches move by up to this many cells of the features (:func:`translate`).
        ``local_head``: scored with the head's BatchNorm statistics re-estimated on the validation
        images (``model.head_statistics: local``), as a site runs the model."""
        self.image_size = image_size
        self.translate = translate
        self.local_head = local_head
        self.validation = YoloDataset(validation, image_size) if validation is not None else None
        self._loss: YoloLoss | None = None
        self._loss_model: nn.Module | None = None

    def collate(self, samples: list[StoredSample]) -> Batch:
        labels = [torch.from_numpy(decode_labels(s.label).copy()) for s in samples]
        return Batch(stack_features(samples), targets_of(labels))

    def augment(self, batch: Batch) -> Batch:
        return translate(batch, self.translate, self.image_size) if self.translate else batch

    def loss(self, model: nn.Module, output: Any, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``output``: the Detect layer's maps, one ``[B, na, ny, nx, 5+nc]`` per level (in evaluation
        mode it returns ``(boxes, maps)``: the maps are what the loss reads)."""
        if isinstance(output, tuple):
            output = output[1]
        if self._loss is None or self._loss_model is not model:
            self._loss, self._loss_model = YoloLoss(model), model
        return self._loss(output, targets)

    def evaluate(self, model: nn.Module, cut: int, privatize: Privatize, device: str) -> dict[str, float]:
        if self.validation is None:
            return {}

        was_training = model.training
        try:
            result = evaluate_model(
                self.predict_fn(model, cut, privatize),
                self.validation,
                self.image_size,
                EVAL_BATCH_SIZE,
                rect=False,
                device=device,
            )
        finally:
            model.train(was_training)
        return {"map50": float(result["map50"]), "map50_95": float(result["map50_95"])}

    def tally(self, output: Any, targets: torch.Tensor) -> DetectionTally:
        """Boxes after NMS (as the held-out evaluation keeps them) and each image's labels, both in
        the square input's pixels (labels are normalized to it)."""
        pred = predictions_of(output).float().cpu()
        detections = non_max_suppression(pred, CONF_THRES, IOU_THRES, MAX_DET, multi_label=True)
        targets = targets.cpu()
        labels = [targets[targets[:, 0] == i, 1:].numpy() for i in range(len(detections))]
        return DetectionTally(detections, labels, pred.shape[2] - 5)

    def score(self, tallies: list[DetectionTally]) -> float:
        detections = [d for t in tallies for d in t.detections]
        labels = [y for t in tallies for y in t.labels]
        classes = max((t.num_classes for t in tallies), default=0)
        square = [(self.image_size, self.image_size)] * len(labels)
        return evaluate_detections(detections, labels, square, classes)[self.headline]

    def predict_fn(self, model: nn.Module, cut: int, privatize: Privatize) -> PredictFn:
        """The deployed path: head → the job's levels → (cut decoder →) tail."""
        if self.local_head and self.validation is not None:
            model = with_local_head(model, cut, self.validation)
        return split_predict_fn(model, cut, privatize)


MIN_KEPT_AREA = 0.3  # a box cut by a translation stays a target when this share of it is left


def translate(batch: Batch, max_cells: int, image_size: int) -> Batch:
    """Each sample's feature maps moved by a random whole number of cells (up to ``max_cells`` of the
    coarsest map, each way), with its boxes: the head is convolutional, so a map moved by whole cells
    is what the edge would have sent for the image moved by as many strides, up to the borders, which
    repeat the edge row or column (the letterbox padding, mostly)."""
    samples = len(next(iter(batch.features.values())))
    coarsest = max(image_size // x.shape[-1] for x in batch.features.values())
    shifts = torch.randint(-max_cells, max_cells + 1, (samples, 2))
    features = {k: _moved(x, shifts * coarsest // (image_size // x.shape[-1])) for k, x in batch.features.items()}
    return Batch(features, _moved_boxes(batch.targets, shifts.float() * coarsest / image_size))


def _moved(x: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """``x[b]`` moved by ``cells[b] = (dx, dy)``, borders repeated."""
    pad = int(cells.abs().max())
    if pad == 0:
        return x
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    h, w = x.shape[-2:]
    windows = [(pad - dy, pad - dx) for dx, dy in cells.tolist()]
    return torch.stack([padded[b, :, top : top + h, left : left + w] for b, (top, left) in enumerate(windows)])


def _moved_boxes(targets: torch.Tensor, moves: torch.Tensor) -> torch.Tensor:
    """Targets ``(image, cls, cx, cy, w, h)`` moved by ``moves[image]`` (normalized), clipped to the
    square; boxes left with less than :data:`MIN_KEPT_AREA` of their area are dropped."""
    if not len(targets):
        return targets
    move = moves[targets[:, 0].long()]
    cx, cy, w, h = targets[:, 2] + move[:, 0], targets[:, 3] + move[:, 1], targets[:, 4], targets[:, 5]
    x1, x2 = (cx - w / 2).clamp(0, 1), (cx + w / 2).clamp(0, 1)
    y1, y2 = (cy - h / 2).clamp(0, 1), (cy + h / 2).clamp(0, 1)
    kept = (x2 - x1) * (y2 - y1) >= MIN_KEPT_AREA * w * h
    moved = torch.stack((targets[:, 0], targets[:, 1], (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), 1)
    return moved[kept & (x2 > x1) & (y2 > y1)]
