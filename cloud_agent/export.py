"""The head as an ONNX graph, for edges that run it with ONNX Runtime instead of PyTorch.

The graph has one input ``input`` (``[batch, *input_shape]``) and one output ``layer{i}`` per head
output the tail reads, in ascending layer order; the batch axis is its only free dimension. It is
exported with the TorchScript exporter at opset 17 (``torch.onnx.export(..., dynamo=False)``), in
eval mode, with constants folded (BatchNorm into the convolutions); the weights are inside the
graph, never in external files.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from collections.abc import Sequence

import onnx
import torch
from torch import nn

from common.errors import MistnetError
from common.protocol import FeatureLayout
from common.split import run_layers, tail_inputs

log = logging.getLogger("mistnet.cloud")

OPSET = 17


class _Head(nn.Module):
    """Layers ``[0, cut)`` of a routed model, returning the outputs the tail reads."""

    def __init__(self, model: nn.Module, cut: int) -> None:
        super().__init__()
        self.model = model
        self.cut = cut
        self.needed = tail_inputs(model, cut)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs: dict[int, torch.Tensor] = {-1: x}
        run_layers(self.model, outputs, 0, self.cut)
        return tuple(outputs[i] for i in self.needed)


def export_head(model: nn.Module, cut: int, input_shape: Sequence[int]) -> tuple[bytes, list[FeatureLayout]]:
    """The serialized ONNX head of ``model`` (a copy runs in eval mode on the CPU; ``model`` is left
    as it is) and the per-sample layout of its outputs."""
    head = _Head(copy.deepcopy(model).cpu().eval(), cut)
    x = torch.zeros(1, *input_shape)
    names = [f"layer{i}" for i in head.needed]
    with torch.inference_mode():
        layout = [FeatureLayout(layer=i, shape=list(y.shape[1:])) for i, y in zip(head.needed, head(x), strict=True)]
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(
                head,
                (x,),
                buffer,  # type: ignore[arg-type]  # a file object works as the TorchScript exporter's target
                input_names=["input"],
                output_names=names,
                dynamic_axes={name: {0: "batch"} for name in ["input", *names]},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as exc:
        raise MistnetError(f"the head (cut {cut}) cannot be exported to ONNX: {exc}") from exc
    blob = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(blob), full_check=True)  # a bad export fails here, not on edges
    return blob, layout
