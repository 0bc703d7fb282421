"""Turns one transfer's worth of local samples into privatized, bit-packed features."""

from __future__ import annotations

import torch
from torch import nn

from common.datasets.base import EdgeDataset, EdgeSample
from common.privacy import BitEncoder
from common.protocol import FeatureBatch, FeatureLayout, SkippedSample
from common.split import run_head


class Extractor:
    """The frozen head: eval mode, no gradients, batch by batch."""

    def __init__(
        self,
        model: nn.Module,
        cut: int,
        encoder: BitEncoder,
        dataset: EdgeDataset,
        batch_size: int,
        device: str = "cpu",
    ) -> None:
        self.model = model.eval().to(device)
        self.cut = cut
        self.encoder = encoder
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = device

    @property
    def transfers(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def sample_range(self, transfer: int) -> range:
        start = transfer * self.batch_size
        return range(start, min(start + self.batch_size, len(self.dataset)))

    def extract(self, transfer: int) -> FeatureBatch:
        loaded = [self.dataset.load(i) for i in self.sample_range(transfer)]
        good = [s for s in loaded if s.image is not None]
        skipped = [SkippedSample(id=s.id, key=s.key, reason=s.error) for s in loaded if s.image is None]
        layout, packed = self._features(good) if good else ([], [])
        return FeatureBatch(
            transfer=transfer,
            bits=1,
            layout=layout,
            ids=[s.id for s in good],
            keys=[s.key for s in good] if any(s.key for s in good) else [],
            labels=[s.label for s in good],
            data=b"".join(packed),
            skipped=skipped,
        )

    def _features(self, good: list[EdgeSample]) -> tuple[list[FeatureLayout], list[bytes]]:
        x = torch.stack([s.image for s in good if s.image is not None]).to(self.device)
        with torch.inference_mode():
            outputs = run_head(self.model, x, self.cut)
        return self.encoder.encode(outputs)
