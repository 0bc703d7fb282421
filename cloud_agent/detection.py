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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cloud_agent.spool import StoredSample
from cloud_agent.tasks import Batch, Privatize, stack_features
from cloud_agent.yolo_loss import YoloLoss
from common.datasets.yolo import YoloDataset, decode_labels
from common.evaluation import PredictFn, evaluate_model, split_predict_fn

EVAL_BATCH_SIZE = 16


def targets_of(labels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image ``[n_i, 5]`` (cls, cx, cy, w, h) to one ``[sum n_i, 6]`` with the image index first."""
    rows = [torch.cat((torch.full((len(t), 1), float(i)), t), 1) for i, t in enumerate(labels)]
    return torch.cat(rows, 0) if rows else torch.zeros((0, 6))


class Detection:
    """YOLOv5 on images: upstream's loss, held-out mAP@0.5 and mAP@0.5:0.95."""

    headline = "map50_95"

    def __init__(self, validation: Path | None, image_size: int) -> None:
        """Without ``validation`` the job trains but reports no mAP: never one measured on training images."""
        self.image_size = image_size
        self.validation = YoloDataset(validation, image_size) if validation is not None else None
        self._loss: YoloLoss | None = None
        self._loss_model: nn.Module | None = None

    def collate(self, samples: list[StoredSample]) -> Batch:
        labels = [torch.from_numpy(decode_labels(s.label).copy()) for s in samples]
        return Batch(stack_features(samples), targets_of(labels))

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

    def predict_fn(self, model: nn.Module, cut: int, privatize: Privatize) -> PredictFn:
        """The deployed path: head → the job's levels → (cut decoder →) tail."""
        return split_predict_fn(model, cut, privatize)
