"""Turns one transfer's worth of local samples into privatized, bit-packed features, whatever runs
the head: :class:`Extractor` decodes micro-batches and assembles the transfer; a runtime supplies
``_features`` (``edge_agent.torch_head`` with PyTorch, ``edge_agent.onnx_head`` with ONNX Runtime,
which needs no torch). Both quantize, randomize and pack with :class:`common.mechanism.LevelEncoder`.

What each step of the prepared head is worth on a CPU edge is in ``docs/benchmarks.md``:

- the head runs on micro-batches of about two 640-px images, decoded just before, so the edge's
  memory does not grow with the transfer size (a transfer of 16 images at 640 px would otherwise
  hold ~0.5 GB of activations);
- binarization, randomized response and packing run vectorised over the micro-batch, in the
  packed domain (:meth:`common.mechanism.LevelEncoder.encode_arrays`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from common.datasets.base import EdgeDataset, EdgeSample, public_reason
from common.mechanism import LevelEncoder
from common.protocol import FeatureBatch, FeatureLayout, SkippedSample

log = logging.getLogger("mistnet.edge")


class Extractor:
    """The frozen head, batch by batch; a runtime's subclass runs it (``_features``)."""

    prefetch = False  # decode the next micro-batch in a background thread while the head runs
    pixels_per_step = 2 * 640 * 640  # input pixels per head pass (x4 on CUDA)

    def __init__(self, encoder: LevelEncoder, dataset: EdgeDataset, batch_size: int) -> None:
        self.encoder = encoder
        self.dataset = dataset
        self.batch_size = batch_size
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[list[int], Future[list[EdgeSample]]] | None = None
        self._step: int | None = None

    @property
    def transfers(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def sample_range(self, transfer: int) -> range:
        start = transfer * self.batch_size
        return range(start, min(start + self.batch_size, len(self.dataset)))

    def step_for(self, image: np.ndarray) -> int:
        """Images per head pass: about ``pixels_per_step`` input pixels (2 at 640 px, 8 at 320 px,
        a whole MNIST batch), so the head's activations stay small whatever the transfer size."""
        return max(1, self.pixels_per_step // max(1, image.shape[-1] * image.shape[-2]))

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

    def _features(self, good: list[EdgeSample]) -> tuple[list[FeatureLayout], np.ndarray]:
        """One micro-batch: head, then quantize, randomize and pack (``[len(good), sample_bytes]``)."""
        raise NotImplementedError

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
