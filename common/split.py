"""Cutting a routed model into an edge head and a cloud tail.

A *routed model* keeps its layers in ``model.model`` (an ``nn.Sequential``); every layer carries
``f``, the index (or list of indices) of the outputs it reads, where -1 means "the previous layer".
That is the YOLOv5 convention, and sequential models (LeNet) are the special case ``f == -1``.
The edge runs layers ``[0, cut)``; the cloud runs ``[cut, n)``. Because later layers may read
earlier outputs (YOLOv5's Concat and Detect), the head must ship every output below the cut that a
tail layer reads, not only the last one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from common.constants import CUT_DECODER_ATTRIBUTE

From = int | Sequence[int]


class CutError(ValueError):
    """The requested cut cannot split this model."""


def layers_of(model: nn.Module) -> nn.Sequential:
    layers = getattr(model, "model", None)
    if not isinstance(layers, nn.Sequential):
        raise CutError(f"{type(model).__name__} is not a routed model (no `model` Sequential)")
    return layers


def sources(layer: nn.Module, index: int) -> list[int]:
    """Absolute indices of the outputs a layer reads (-1 for the model input)."""
    f = getattr(layer, "f", -1)
    rel = [f] if isinstance(f, int) else list(f)
    return [index - 1 if j == -1 else j for j in rel]


def check_cut(model: nn.Module, cut: int) -> None:
    n = len(layers_of(model))
    if not 1 <= cut < n:
        raise CutError(f"cut_layer {cut} is out of range for {type(model).__name__}: valid 1..{n - 1}")


def tail_inputs(model: nn.Module, cut: int) -> list[int]:
    """Indices of head outputs (all < cut) that tail layers read, in ascending order."""
    check_cut(model, cut)
    needed: set[int] = set()
    for i, layer in enumerate(layers_of(model)):
        if i >= cut:
            needed.update(j for j in sources(layer, i) if j < cut)
    if -1 in needed:
        raise CutError(f"cut_layer {cut}: a tail layer reads the raw input, which never leaves the edge")
    return sorted(needed)


def _route(layer: nn.Module, index: int, outputs: dict[int, torch.Tensor]) -> torch.Tensor | list:
    srcs = sources(layer, index)
    f = getattr(layer, "f", -1)
    if isinstance(f, int):
        return outputs[srcs[0]]
    return [outputs[j] for j in srcs]


def run_layers(model: nn.Module, outputs: dict[int, torch.Tensor], start: int, stop: int) -> torch.Tensor:
    """Run layers [start, stop), recording every output in ``outputs`` for later routing."""
    layers = layers_of(model)
    y = outputs.get(start - 1)
    for i in range(start, stop):
        layer = layers[i]
        y = layer(_route(layer, i, outputs))
        outputs[i] = y
    assert y is not None
    return y


def run_head(model: nn.Module, x: torch.Tensor, cut: int) -> dict[int, torch.Tensor]:
    """The head's outputs that the tail needs, keyed by layer index."""
    needed = tail_inputs(model, cut)
    outputs: dict[int, torch.Tensor] = {-1: x}
    run_layers(model, outputs, 0, cut)
    return {i: outputs[i] for i in needed}


def head_activations(model: nn.Module, cut: int, input_shape: Sequence[int]) -> int:
    """Activations the head releases per sample of ``input_shape`` (C, H, W): the elements of every
    output the tail reads. Runs the head once on zeros of the model's device, in eval mode, leaving
    the model as it was; a model built on the meta device gives the shapes without computing."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.inference_mode():
            outputs = run_head(model, torch.zeros(1, *input_shape, device=device), cut)
    finally:
        model.train(was_training)
    return sum(y[0].numel() for y in outputs.values())


def run_tail(model: nn.Module, features: dict[int, torch.Tensor], cut: int) -> torch.Tensor:
    """The tail on what crossed the cut; a MistNet model's cut decoder (``model.cut_decoder``, see
    :mod:`common.models.cutdecoder`) first maps the levels back towards activations."""
    decoder = getattr(model, CUT_DECODER_ATTRIBUTE, None)
    if decoder is not None:
        features = decoder(features)
    return run_layers(model, dict(features), cut, len(layers_of(model)))


def head_state_dict(model: nn.Module, cut: int) -> dict[str, torch.Tensor]:
    """Only the head's parameters and buffers: the tail never leaves the cloud."""
    prefixes = tuple(f"model.{i}." for i in range(cut))
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
