"""What every cloud task provides (the CloudTask interface) and the batch it trains on: decoded features and targets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from cloud_agent.spool import StoredSample
from common.privacy import decode_features, decode_rows

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

    def tally(self, output: Any, targets: torch.Tensor) -> Any:
        """What one batch of held-back received samples contributes to ``score`` (eval-mode output)."""
        ...

    def score(self, tallies: list[Any]) -> float:
        """The task's headline metric over held-back received samples, higher is better: it chooses
        the epoch that ships, because a loss can fall while the metric falls too."""
        ...
