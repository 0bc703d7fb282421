"""What differs between scenarios on the cloud: batching labels, the loss, and held-out metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cloud_agent.spool import StoredSample
from common.datasets.mnist import decode_label, load_tensors
from common.privacy import decode_features, decode_rows
from common.split import run_head, run_tail

# What held-out inputs go through between head and tail: the job's levels, as the cloud decodes them
# (``common.privacy.feature_transform``).
Privatize = Callable[[dict[int, torch.Tensor]], dict[int, torch.Tensor]]


@dataclass
class Batch:
    features: dict[int, torch.Tensor]
    targets: torch.Tensor

    def to(self, device: str) -> Batch:
        return Batch({k: v.to(device, non_blocking=True) for k, v in self.features.items()}, self.targets.to(device))


def stack_features(samples: list[StoredSample]) -> dict[int, torch.Tensor]:
    """A batch's features as float ``[B, *shape]`` per layer. Samples that share a layout (all of
    them, in practice: one model, one cut) are unpacked together, one vectorised call per layer."""
    first = samples[0]
    size = len(first.features)
    if all(
        len(s.features) == size and s.bits == first.bits and (s.layout is first.layout or s.layout == first.layout)
        for s in samples
    ):
        rows = np.frombuffer(b"".join([s.features for s in samples]), np.uint8).reshape(len(samples), -1)
        return decode_rows(first.layout, rows, first.bits)
    decoded = [decode_features(s.layout, s.features, s.bits) for s in samples]
    return {layer: torch.stack([d[layer] for d in decoded]) for layer in decoded[0]}


class CloudTask(Protocol):
    headline: str

    def collate(self, samples: list[Any]) -> Batch: ...

    def augment(self, batch: Batch) -> Batch:
        """A training batch varied the way the task's inputs vary (evaluation batches are not)."""
        ...

    def loss(
        self, model: nn.Module, output: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]: ...

    def evaluate(self, model: nn.Module, cut: int, privatize: Privatize, device: str) -> dict[str, float]: ...


class Classification:
    """MNIST: cross-entropy on digits, accuracy on the cloud's held-out test slice."""

    headline = "accuracy"

    def __init__(self, validation: Path | None) -> None:
        """Without ``validation`` the job trains but reports no accuracy."""
        self.held_out = load_tensors(validation) if validation is not None else None

    def collate(self, samples: list[StoredSample]) -> Batch:
        labels = torch.tensor([decode_label(s.label) for s in samples], dtype=torch.long)
        return Batch(stack_features(samples), labels)

    def augment(self, batch: Batch) -> Batch:
        return batch

    def loss(
        self, model: nn.Module, output: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss = F.cross_entropy(output, targets)
        return loss, {"ce": float(loss.detach())}

    @torch.inference_mode()
    def evaluate(self, model: nn.Module, cut: int, privatize: Privatize, device: str) -> dict[str, float]:
        if self.held_out is None:
            return {}
        images, labels = self.held_out
        model.eval()
        correct = 0
        for start in range(0, len(images), 256):
            x = images[start : start + 256].to(device)
            pred = run_tail(model, privatize(run_head(model, x, cut)), cut).argmax(1).cpu()
            correct += int((pred == labels[start : start + 256]).sum())
        return {"accuracy": correct / len(images)}


def make_task(arch: str, validation: Path | None, image_size: int, translate: int = 0) -> CloudTask:
    if arch == "lenet5":
        return Classification(validation)
    from cloud_agent.detection import Detection

    return Detection(validation, image_size, translate)
