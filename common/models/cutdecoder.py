"""The cut decoder: maps the levels that cross the cut back towards the activations the tail expects.

A pretrained tail fed bits instead of real-valued activations collapses (held-out mAP ≈ 0.01 for
YOLOv5n at cut 4, see ``shared/notes/mistnet-utility-measurements.md``): its weights and BatchNorm
statistics describe activations, not levels. The cloud trains this small network on public images
before the job, with the job's own quantisation and randomized response applied to the frozen
head's outputs, to regress those outputs; the tail then runs on what it decodes. Two 3x3
convolutions see each level's neighbourhood, which is what lets them undo part of the
quantisation and of the randomization (neighbouring activations are correlated, the noise is not).

It is part of the cloud's model: ``run_tail`` applies it (``model.cut_decoder``), it is saved in
the checkpoint under ``cut_decoder.*`` and rebuilt from the checkpoint's ``decoder`` metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.constants import CUT_DECODER_ATTRIBUTE

PREFIX = CUT_DECODER_ATTRIBUTE + "."


class LevelDecoder(nn.Module):
    """One head output: levels in [0, 1] ``[B, C, H, W]`` to estimated activations ``[B, C, H, W]``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.mid = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.out = nn.Conv2d(width, channels, 1)
        # Per-channel mean and std of the real activations (public data): the output is regressed
        # in standardized units, so every channel weighs the same in the loss.
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    def forward(self, levels: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.bn1(self.inp(levels * 2 - 1)))
        h = F.silu(self.bn2(self.mid(h)))
        return self.out(h) * self.std.view(1, -1, 1, 1) + self.mean.view(1, -1, 1, 1)

    def standardized_error(self, estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean squared error in units of each channel's standard deviation."""
        return (((estimate - target) / self.std.view(1, -1, 1, 1)) ** 2).mean()


class CutDecoder(nn.Module):
    """A :class:`LevelDecoder` per head output the tail reads; outputs it has no decoder for pass through."""

    def __init__(self, channels: Mapping[int, int], width: int) -> None:
        super().__init__()
        self.width = width
        self.channels = dict(channels)
        self.layers = nn.ModuleDict({str(i): LevelDecoder(c, width) for i, c in self.channels.items()})

    def forward(self, features: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {i: self.layers[str(i)](y) if str(i) in self.layers else y for i, y in features.items()}

    def decoder(self, layer: int) -> LevelDecoder:
        module = self.layers[str(layer)]
        assert isinstance(module, LevelDecoder)
        return module

    def config(self) -> dict[str, Any]:
        """What the checkpoint's metadata records to rebuild it."""
        return {"width": self.width, "channels": {str(i): c for i, c in self.channels.items()}}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CutDecoder:
        return cls({int(i): int(c) for i, c in config["channels"].items()}, int(config["width"]))


def attach(model: nn.Module, decoder: CutDecoder) -> nn.Module:
    """The model with ``decoder`` in front of its tail (``run_tail`` applies it)."""
    setattr(model, CUT_DECODER_ATTRIBUTE, decoder)
    return model


def attached(model: nn.Module) -> CutDecoder | None:
    decoder = getattr(model, CUT_DECODER_ATTRIBUTE, None)
    return decoder if isinstance(decoder, CutDecoder) else None


def split_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint's tensors as (the model's, the cut decoder's without its prefix)."""
    model = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    decoder = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    return model, decoder
