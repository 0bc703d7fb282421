"""Turns one transfer's worth of local samples into privatized, bit-packed features.

The head is frozen, so the extractor prepares it once for inference (see ``docs/benchmarks.md``
for what each step is worth on a CPU edge):

- every convolution followed by a BatchNorm is folded into one convolution (exact up to float
  rounding: eval-mode BatchNorm is an affine map);
- on image-sized inputs the head runs in channels-last memory format, which oneDNN (CPU) and
  cuDNN (CUDA) convolve much faster than the default NCHW;
- the tail's parameters, which an edge never runs, are released (moved to the ``meta`` device;
  the layers keep their routing attributes so the head still knows which outputs to ship);
- the head runs on micro-batches of two 640-px images, decoded just before, so the edge's
  memory does not grow with the transfer size (a transfer of 16 images at 640 px would otherwise
  hold ~0.5 GB of activations);
- binarization, randomized response and packing run vectorised over the micro-batch, in the
  packed domain (:meth:`common.privacy.BitEncoder.encode_packed`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from common.datasets.base import EdgeDataset, EdgeSample, public_reason
from common.errors import MistnetError
from common.privacy import BitEncoder
from common.protocol import FeatureBatch, FeatureLayout, SkippedSample
from common.split import layers_of, run_layers, tail_inputs

log = logging.getLogger("mistnet.edge")

# Inputs with at least this many pixels per channel run channels-last (YOLO images, not MNIST digits).
CHANNELS_LAST_MIN_PIXELS = 64 * 64


def check_device(device: str) -> str:
    """The device string, or a clear error when it names CUDA on a machine without it."""
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise MistnetError(
            f"device {device!r}: CUDA is not available here (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'}, {torch.cuda.device_count()} GPU(s) visible)"
        )
    if kind not in ("cpu", "cuda"):
        raise MistnetError(f"device {device!r}: only cpu and cuda are supported")
    return device


def fuse_batchnorm(module: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d into that convolution, in
    place: YOLOv5 ``Conv`` blocks (``.conv`` then ``.bn``) and ``nn.Sequential`` runs. Returns the
    number of folded pairs."""
    folded = 0
    for parent in list(module.modules()):
        conv, bn = getattr(parent, "conv", None), getattr(parent, "bn", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            parent.conv = fuse_conv_bn_eval(conv, bn)
            parent.bn = nn.Identity()
            folded += 1
        if isinstance(parent, nn.Sequential):
            for i in range(len(parent) - 1):
                first, second = parent[i], parent[i + 1]
                if isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d):
                    parent[i] = fuse_conv_bn_eval(first, second)
                    parent[i + 1] = nn.Identity()
                    folded += 1
    return folded


class Extractor:
    """The frozen head: eval mode, no gradients, batch by batch.

    The extractor owns ``model`` from here on: its head is folded for inference and its tail's
    weights are dropped. Class attributes switch the optimisations (the benchmarks compare them).
    """

    fuse_bn = True
    channels_last: bool | None = None  # None: for inputs of CHANNELS_LAST_MIN_PIXELS or more
    release_tail = True
    prefetch = False  # decode the next micro-batch in a background thread while the head runs
    pixels_per_step = 2 * 640 * 640  # input pixels per head pass (x4 on CUDA)

    def __init__(
        self,
        model: nn.Module,
        cut: int,
        encoder: BitEncoder,
        dataset: EdgeDataset,
        batch_size: int,
        device: str = "cpu",
    ) -> None:
        self.device = check_device(device)
        self.cut = cut
        self.needed = tail_inputs(model, cut)
        self.model = self._prepare(model.eval())
        self.encoder = encoder
        self.dataset = dataset
        self.batch_size = batch_size
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[list[int], Future[list[EdgeSample]]] | None = None
        self._step: int | None = None
        self._memory_format: torch.memory_format | None = None

    def _prepare(self, model: nn.Module) -> nn.Module:
        layers = layers_of(model)
        for p in model.parameters():
            p.requires_grad_(False)
        if self.release_tail:
            for i in range(self.cut, len(layers)):
                layers[i].to("meta")
        for i in range(self.cut):
            if self.fuse_bn:
                fuse_batchnorm(layers[i])
            layers[i].to(self.device)
        # No cudnn.benchmark: its per-shape autotuning (again for every last, smaller micro-batch)
        # cost more than it gained on a lent H100 over a few hundred images.
        return model

    @property
    def transfers(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def sample_range(self, transfer: int) -> range:
        start = transfer * self.batch_size
        return range(start, min(start + self.batch_size, len(self.dataset)))

    def step_for(self, image: torch.Tensor) -> int:
        """Images per head pass: about ``pixels_per_step`` input pixels (2 at 640 px, 8 at 320 px,
        a whole MNIST batch), so the head's activations stay small whatever the transfer size."""
        budget = self.pixels_per_step * (4 if torch.device(self.device).type == "cuda" else 1)
        return max(1, budget // max(1, image.shape[-1] * image.shape[-2]))

    def _load(self, indices: Sequence[int]) -> list[EdgeSample]:
        return [self.dataset.load(i) for i in indices]

    def _next_after(self, transfer: int, indices: list[int], pos: int, step: int) -> list[int]:
        """The micro-batch that follows (in this transfer or at the start of the next one)."""
        if pos < len(indices):
            return indices[pos : pos + step]
        if transfer + 1 < self.transfers:
            return list(self.sample_range(transfer + 1))[:step]
        return []

    def _micro_batches(self, transfer: int) -> Iterator[list[EdgeSample]]:
        """The transfer's samples, decoded a micro-batch at a time; with ``prefetch`` the next
        micro-batch is decoded in a background thread while this one runs through the head."""
        indices = list(self.sample_range(transfer))
        pos = 0
        while pos < len(indices):
            step = self._step or 1  # the first sample tells the input size
            wanted = indices[pos : pos + step]
            pending, self._pending = self._pending, None
            hit = pending is not None and pending[0] == wanted
            samples = pending[1].result() if hit and pending is not None else self._load(wanted)
            if self._step is None:
                good = [s.image for s in samples if s.image is not None]
                self._step = self.step_for(good[0]) if good else None
            pos += len(wanted)
            if self.prefetch and self._step is not None:
                following = self._next_after(transfer, indices, pos, self._step)
                if following:
                    if self._pool is None:
                        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mistnet-prefetch")
                    self._pending = (following, self._pool.submit(self._load, following))
            yield samples

    def extract(self, transfer: int) -> FeatureBatch:
        layout: list[FeatureLayout] = []
        good: list[EdgeSample] = []
        skipped: list[SkippedSample] = []
        parts: list[np.ndarray] = []
        for samples in self._micro_batches(transfer):
            ok = [s for s in samples if s.image is not None]
            skipped += [self._skip(s) for s in samples if s.image is None]
            if ok:
                layout, data = self._features(ok)
                parts.append(data)
                good += [EdgeSample(s.id, s.key, None, s.label) for s in ok]  # the pixels can go
        return FeatureBatch(
            transfer=transfer,
            bits=self.encoder.bits,
            layout=layout,
            ids=[s.id for s in good],
            labels=[s.label for s in good],
            data=b"".join(p.tobytes() for p in parts),
            skipped=skipped,
        )

    @staticmethod
    def _skip(sample: EdgeSample) -> SkippedSample:
        """An unreadable sample: its name and error stay in this log, only a category goes on the wire."""
        log.warning("sample %d (%s) skipped: %s", sample.id, sample.key, sample.error)
        return SkippedSample(id=sample.id, reason=public_reason(sample.error))

    def _format_for(self, x: torch.Tensor) -> torch.memory_format:
        """Chosen on the first batch (every batch of a dataset has the same geometry): channels-last
        for image-sized 4-d inputs unless ``channels_last`` says otherwise; the head follows."""
        if self._memory_format is None:
            wanted = self.channels_last
            if wanted is None:
                wanted = x.dim() == 4 and x.shape[-1] * x.shape[-2] >= CHANNELS_LAST_MIN_PIXELS
            self._memory_format = torch.channels_last if wanted and x.dim() == 4 else torch.contiguous_format
            if self._memory_format == torch.channels_last:
                layers = layers_of(self.model)
                for i in range(self.cut):
                    layers[i].to(memory_format=torch.channels_last)
        return self._memory_format

    def head(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """The head outputs the tail reads, for a batch already on the device."""
        x = x.contiguous(memory_format=self._format_for(x))
        outputs: dict[int, torch.Tensor] = {-1: x}
        with torch.inference_mode():
            run_layers(self.model, outputs, 0, self.cut)
        return {i: outputs[i] for i in self.needed}

    def _features(self, good: list[EdgeSample]) -> tuple[list[FeatureLayout], np.ndarray]:
        """One micro-batch: head, then binarize, randomize and pack (``[len(good), sample_bytes]``)."""
        x = torch.stack([s.image for s in good if s.image is not None]).to(self.device, non_blocking=True)
        return self.encoder.encode_packed(self.head(x))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
