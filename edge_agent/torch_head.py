"""The head with PyTorch (``mistnet edge --runtime torch``), prepared once for inference (see
``docs/benchmarks.md`` for what each step is worth on a CPU edge):

- every convolution followed by a BatchNorm is folded into one convolution (exact up to float
  rounding: eval-mode BatchNorm is an affine map);
- on image-sized inputs the head runs in channels-last memory format, which oneDNN (CPU) and
  cuDNN (CUDA) convolve much faster than the default NCHW;
- the tail's parameters, which an edge never runs, are released (moved to the ``meta`` device;
  the layers keep their routing attributes so the head still knows which outputs to ship).

Before that, when the job asks for ``model.head_statistics: local``, the head's BatchNorm statistics
are re-estimated on up to :data:`~common.constants.HEAD_STATISTICS_IMAGES` of the edge's own images
(:mod:`common.batchnorm`): the features then come from a head normalized for this edge's conditions.
The statistics stay here; only the levels leave.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from common import constants as C
from common.batchnorm import reestimate_head, spread
from common.datasets.base import EdgeDataset, EdgeSample
from common.errors import MistnetError
from common.jobspec import HeadStatistics
from common.mechanism import LevelEncoder
from common.models.registry import build
from common.protocol import FeatureLayout, JobAssignment
from common.split import layers_of, run_layers, tail_inputs
from common.weights import load_head, unpack_state
from edge_agent.extractor import Extractor

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


class TorchExtractor(Extractor):
    """The frozen head in PyTorch: eval mode, no gradients.

    The extractor owns ``model`` from here on: its head is folded for inference and its tail's
    weights are dropped. Class attributes switch the optimisations (the benchmarks compare them).
    """

    fuse_bn = True
    channels_last: bool | None = None  # None: for inputs of CHANNELS_LAST_MIN_PIXELS or more
    release_tail = True

    def __init__(
        self,
        model: nn.Module,
        cut: int,
        encoder: LevelEncoder,
        dataset: EdgeDataset,
        batch_size: int,
        device: str = "cpu",
        local_statistics: bool = False,
    ) -> None:
        super().__init__(encoder, dataset, batch_size)
        self.device = check_device(device)
        self.cut = cut
        self.needed = tail_inputs(model, cut)
        if local_statistics:
            self._reestimate_statistics(model.to(self.device))
        self.model = self._prepare(model.eval())
        self._memory_format: torch.memory_format | None = None

    @classmethod
    def for_job(
        cls, job: JobAssignment, weights: bytes, encoder: LevelEncoder, dataset: EdgeDataset, device: str
    ) -> TorchExtractor:
        """The job's model with the cloud's head weights (safetensors) loaded."""
        model = build(job.model.arch, job.model.num_classes)
        load_head(model, unpack_state(weights), job.model.cut_layer)
        local = job.model.head_statistics == HeadStatistics.LOCAL
        return cls(model, job.model.cut_layer, encoder, dataset, job.batch_size, device, local)

    def _reestimate_statistics(self, model: nn.Module) -> None:
        """The head's BatchNorm statistics from this edge's images, spread over its dataset."""
        t0 = time.monotonic()
        indices = spread(range(len(self.dataset)), C.HEAD_STATISTICS_IMAGES)
        seen = reestimate_head(model, self.cut, self._image_batches(indices))
        log.info("head BatchNorm statistics re-estimated on %d local images (%.1f s)", seen, time.monotonic() - t0)

    def _image_batches(self, indices: list[int]) -> Iterator[torch.Tensor]:
        """The images at ``indices``, a head pass's worth at a time (one at first: its size sets the step)."""
        pos, step = 0, 1
        while pos < len(indices):
            images = [s.image for s in self._load(indices[pos : pos + step]) if s.image is not None]
            pos += step
            if images:
                yield torch.from_numpy(np.stack(images))
                step = self.step_for(images[0])

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

    def step_for(self, image: np.ndarray) -> int:
        """As :meth:`Extractor.step_for`, four times larger on CUDA."""
        return super().step_for(image) * (4 if torch.device(self.device).type == "cuda" else 1)

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
        """One micro-batch: head, then quantize, randomize and pack (``[len(good), sample_bytes]``)."""
        x = torch.from_numpy(np.stack([s.image for s in good if s.image is not None]))
        outputs = self.head(x.to(self.device, non_blocking=True))
        return self.encoder.encode_arrays({i: y.cpu().numpy() for i, y in outputs.items()})
