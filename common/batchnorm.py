"""BatchNorm statistics re-estimated on the data where a model runs: no labels, no gradient step.

Two uses, one mechanism (a cumulative average over one pass, as ``torch.optim.swa_utils.update_bn``):

- **The head at a site** (``model.head_statistics: local``): a frozen head's running statistics
  describe the images it was pretrained on. Where an edge's images differ (a camera's contrast,
  weather, sensor), the same weights re-normalized by that edge's own statistics give activations
  that look like the pretrained ones again (AdaBN, Li et al. 2016). The edge re-estimates them on
  its images before extracting; the statistics never leave it (only the levels do), and a model is
  evaluated the way a deploying site would run it: statistics of the images it scores. Under COCO-C
  ``contrast:5`` this lifts the adapted MistNet model from 0.038 to 0.136 held-out person AP, and
  the trained one from 0.176 to 0.197 at ε = 100, 0.162 to 0.185 at ε = 4 (``docs/privacy-utility.md``).
- **The tail before training** (:meth:`cloud_agent.trainer.Trainer.recalibrate_batchnorm`): the
  pretrained tail's statistics describe real-valued activations, not decoded levels.

Randomized response bounds what each released level says whatever value it is given, so statistics
computed from the edge's other images change no ε (``docs/security.md``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from common.split import layers_of, run_layers

BatchNorms = Sequence[nn.modules.batchnorm._BatchNorm]


def batchnorms(model: nn.Module, layers: range) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm modules (with running statistics) of the routed model's ``layers``."""
    routed = layers_of(model)
    return [
        m
        for i in layers
        for m in routed[i].modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def spread(indices: Sequence[int], count: int) -> list[int]:
    """At most ``count`` of ``indices``, evenly spaced from the first to the last: the images that
    statistics are estimated on cover the whole dataset, not its first folder."""
    if len(indices) <= count:
        return list(indices)
    return [indices[round(k * (len(indices) - 1) / max(count - 1, 1))] for k in range(count)]


@contextmanager
def cumulative_statistics(modules: BatchNorms) -> Iterator[None]:
    """Inside: ``modules`` reset, in training mode and averaging every batch equally; on leaving,
    their momenta and modes are restored (the statistics are the new ones)."""
    saved = [(m, m.momentum, m.training) for m in modules]
    for m in modules:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        yield
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)


@torch.no_grad()
def reestimate_head(model: nn.Module, cut: int, batches: Iterable[torch.Tensor]) -> int:
    """The head's (layers ``[0, cut)``) BatchNorm statistics re-estimated on ``batches`` of inputs,
    on the model's device; nothing else changes. Returns the inputs seen (0: statistics untouched)."""
    inputs = iter(batches)
    first = next(inputs, None)
    if first is None:
        return 0
    device = next(model.parameters()).device
    seen = 0
    with cumulative_statistics(batchnorms(model, range(cut))):
        for x in itertools.chain([first], inputs):
            run_layers(model, {-1: x.to(device)}, 0, cut)
            seen += len(x)
    return seen
