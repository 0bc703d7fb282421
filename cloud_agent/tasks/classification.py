"""The classification scenario on the cloud (MNIST): digit labels, cross-entropy, held-out accuracy."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cloud_agent.spool import StoredSample
from cloud_agent.tasks.base import Batch, Privatize, stack_features
from common.datasets.mnist import decode_label, load_tensors
from common.split import run_head, run_tail


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

    def tally(self, output: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
        return int((output.argmax(1).cpu() == targets.cpu()).sum()), len(targets)

    def score(self, tallies: list[tuple[int, int]]) -> float:
        return sum(c for c, _ in tallies) / max(sum(n for _, n in tallies), 1)

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
