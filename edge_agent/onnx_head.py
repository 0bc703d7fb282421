"""The head with ONNX Runtime (``mistnet edge --runtime onnx``): what an edge without torch runs.

The graph comes from the cloud (:mod:`cloud_agent.export`) and is checked before a session is
made (:func:`common.onnx_check.check_onnx_head`); its outputs are checked again on every batch.
Images are decoded and letterboxed with PIL and numpy, and the levels are quantized, randomized
and packed by the same :class:`common.mechanism.LevelEncoder` as the torch runtime's.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from common.datasets.base import EdgeDataset, EdgeSample
from common.errors import MistnetError, ProtocolError
from common.mechanism import LevelEncoder
from common.onnx_check import check_onnx_head
from common.protocol import FeatureLayout, OnnxHead
from edge_agent.extractor import Extractor

DEFAULT_THREADS = 2


def head_threads() -> int:
    """Intra-op threads of the head: ``OMP_NUM_THREADS`` where set (the variable that also sizes the
    torch runtime's pool), else :data:`DEFAULT_THREADS`."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else DEFAULT_THREADS


def session_for(blob: bytes, threads: int) -> ort.InferenceSession:
    """A CPU session on ``threads`` threads for a graph already checked."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # No memory pattern (one block planned for a whole run): the last micro-batch of a transfer has
    # another batch size; without it yolov5s at 640 px peaks 25 MiB lower and runs no slower.
    options.enable_mem_pattern = False
    options.log_severity_level = 3  # errors only: ORT's warnings are about its own graph rewrites
    try:
        return ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for graphs it cannot load
        raise ProtocolError(f"ONNX head: ONNX Runtime cannot load it: {exc}") from None


class OnnxExtractor(Extractor):
    """The frozen head as an ONNX Runtime session; outputs keyed by the layers the job announces."""

    def __init__(
        self, head: OnnxHead, blob: bytes, encoder: LevelEncoder, dataset: EdgeDataset, batch_size: int,
        threads: int | None = None,
    ) -> None:
        super().__init__(encoder, dataset, batch_size)
        check_onnx_head(blob, head.input_shape, head.outputs)
        self.head = head
        self.session = session_for(blob, threads or head_threads())
        self.names = [f"layer{f.layer}" for f in head.outputs]

    def run(self, x: np.ndarray) -> dict[int, np.ndarray]:
        """The head outputs of a batch ``[B, *input_shape]``, each checked against the job's shape."""
        if list(x.shape[1:]) != self.head.input_shape:
            raise MistnetError(f"ONNX head: input of shape {list(x.shape[1:])}, the job's head takes "
                               f"{self.head.input_shape}")
        found = self.session.run(self.names, {"input": np.ascontiguousarray(x, dtype=np.float32)})
        outputs = {}
        for f, y in zip(self.head.outputs, found, strict=True):
            if list(y.shape) != [len(x), *f.shape]:
                raise MistnetError(f"ONNX head: output layer{f.layer} has shape {list(y.shape)}, expected "
                                   f"{[len(x), *f.shape]}")
            outputs[f.layer] = y
        return outputs

    def _features(self, good: list[EdgeSample]) -> tuple[list[FeatureLayout], np.ndarray]:
        """One micro-batch: head, then quantize, randomize and pack (``[len(good), sample_bytes]``)."""
        x = np.stack([s.image for s in good if s.image is not None])
        return self.encoder.encode_arrays(self.run(x))
