"""A plain fine-tune of the whole detector on raw images: what uploading the images would give.

MistNet's claim is measured against this baseline (``mistnet demo --baselines``, ``mistnet train``):
the same :class:`~cloud_agent.trainer.Trainer` recipe (SGD, warmup, cosine decay, clipping, epoch
checkpoints that resume), the same loss and the same epoch budget, but on the images themselves and
with every layer trainable. The model runs as a cut at layer 0: the "features" are the letterboxed
images, so nothing here is specific to a baseline but the data.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cloud_agent.tasks import Batch, Privatize
from cloud_agent.tasks.detection import Detection, targets_of
from cloud_agent.trainer import EpochResult, History, TrainConfig, Trainer
from common.checkpoint import load_model, save_checkpoint
from common.datasets.yolo import YoloDataset
from common.errors import DatasetError
from common.evaluation import PredictFn, model_predict_fn
from common.storage import write_atomic

log = logging.getLogger("mistnet.cloud.centralized")

INPUT = -1  # the routed model's input slot: layer 0 reads it
FLIP_PROBABILITY = 0.5


@dataclass(frozen=True)
class ImageSample:
    image: torch.Tensor  # float [3, S, S], letterboxed
    labels: torch.Tensor  # [n, 5] (cls, cx, cy, w, h), normalized to the square


class ImageSamples(torch.utils.data.Dataset[ImageSample]):
    """The usable images of one or more YOLO folders, letterboxed to a square; with ``flip``, each
    load is mirrored left-right with probability 1/2 (boxes mirrored with it)."""

    def __init__(self, folders: Sequence[Path], image_size: int, flip: bool = True) -> None:
        self.sets = [YoloDataset(f, image_size) for f in folders]
        self.index = [(s, i) for s in self.sets for i in s.usable]
        if not self.index:
            raise DatasetError(f"no usable labelled image in {', '.join(map(str, folders))}")
        self.flip = flip

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> ImageSample:
        dataset, i = self.index[k]
        sample = dataset.load(i)
        if sample.image is None:
            raise DatasetError(f"{sample.path}: {sample.error}")
        image, labels = torch.from_numpy(sample.image), torch.from_numpy(sample.labels.copy())
        if self.flip and float(torch.rand(())) < FLIP_PROBABILITY:
            image = image.flip(-1)
            labels[:, 1] = 1.0 - labels[:, 1]
        return ImageSample(image, labels)


class ImageDetection(Detection):
    """The detection task on raw images: batches feed layer 0, evaluation runs the whole model."""

    def collate(self, samples: list[Any]) -> Batch:
        return Batch({INPUT: torch.stack([s.image for s in samples])}, targets_of([s.labels for s in samples]))

    def predict_fn(self, model: nn.Module, cut: int, privatize: Privatize) -> PredictFn:
        return model_predict_fn(model)


@dataclass
class FineTune:
    """What :func:`fine_tune` produced: the trained model, its history and held-out metrics before."""

    model: nn.Module
    history: History
    before: dict[str, float]
    arch: str
    num_classes: int


def fine_tune(
    weights: Path,
    folders: Sequence[Path],
    validation: Path | None,
    image_size: int,
    config: TrainConfig,
    state_dir: Path,
    on_epoch: Callable[[EpochResult], None] = lambda _: None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> FineTune:
    """Fine-tune every layer of the checkpoint at ``weights`` on the labelled images of ``folders``.
    Run again with the same ``state_dir``, it resumes after the last completed epoch."""
    model, loaded = load_model(weights)
    task = ImageDetection(validation, image_size)
    trainer = Trainer(model, 0, task, ImageSamples(folders, image_size), config, state_dir, lambda f: f)
    state_dir.mkdir(parents=True, exist_ok=True)
    history_file, before_file = state_dir / "history.json", state_dir / "before.json"
    if not before_file.exists():
        write_atomic(before_file, json.dumps(task.evaluate(model, 0, lambda f: f, config.device)).encode())
    history = History.from_json(history_file.read_text() if history_file.exists() else None)

    def record(result: EpochResult) -> None:
        write_atomic(history_file, history.to_json().encode())
        on_epoch(result)

    torch.manual_seed(config.seed * 100_003 + len(history.epochs))  # the flips: the same run flips alike
    trainer.fit(history, record, on_step)
    before = json.loads(before_file.read_text())
    return FineTune(model.eval(), history, before, loaded.arch, loaded.num_classes)


def save_fine_tuned(result: FineTune, weights: Path, image_size: int, out: Path) -> None:
    """A plain checkpoint (no cut: ``mistnet eval`` runs it whole), written atomically."""
    meta = {
        "arch": result.arch,
        "num_classes": result.num_classes,
        "image_size": image_size,
        "fine_tuned_from": weights.name,
        "epochs": len(result.history.epochs),
    }
    save_checkpoint(out, result.model.state_dict(), meta)
