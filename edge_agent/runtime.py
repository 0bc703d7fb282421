"""Which runtime runs an edge's head: ``torch`` (the job's model with safetensors head weights) or
``onnx`` (the cloud's ONNX export of the head, run by ONNX Runtime; the edge then imports no torch).

The cloud publishes both forms of every head; an edge subscribes only to the one its runtime reads
(see docs/protocol.md). ``onnx`` is the default where torch is not installed.
"""

from __future__ import annotations

import importlib.util
import logging

from common.datasets.base import EdgeDataset
from common.errors import MistnetError
from common.jobspec import HeadStatistics
from common.mechanism import LevelEncoder
from common.protocol import HeadManifest, JobAssignment
from edge_agent.extractor import Extractor

log = logging.getLogger("mistnet.edge")

RUNTIMES = ("onnx", "torch")


def default_runtime() -> str:
    return "torch" if torch_installed() else "onnx"


def torch_installed() -> bool:
    """Whether torch is importable here, without importing it; an import system that refuses it (as
    a stripped-down image's may) counts as not installed."""
    try:
        return importlib.util.find_spec("torch") is not None
    except ImportError:
        return False


def head_manifest(runtime: str, job: JobAssignment) -> HeadManifest | None:
    """The manifest of the head form this runtime reads; None when the job offers none."""
    if runtime == "onnx":
        return job.onnx.manifest if job.onnx is not None else None
    return job.head


def make_extractor(
    runtime: str, job: JobAssignment, blob: bytes, encoder: LevelEncoder, dataset: EdgeDataset, device: str
) -> Extractor:
    """The job's head, from ``blob`` (checked against the job), ready to extract."""
    if runtime == "onnx":
        from edge_agent.onnx_head import OnnxExtractor

        if job.onnx is None:
            raise MistnetError(f"job {job.job} offers no ONNX head (the cloud could not export it)")
        if device != "cpu":
            raise MistnetError(f"device {device!r}: the onnx runtime runs on the cpu only")
        if job.model.head_statistics == HeadStatistics.LOCAL:
            log.warning(
                "job %s asks for the head's BatchNorm statistics of this edge's images: the onnx runtime runs "
                "the cloud's folded head, whose statistics are the pretrained ones (run --runtime torch to adapt)",
                job.job,
            )
        return OnnxExtractor(job.onnx, blob, encoder, dataset, job.batch_size)
    if runtime == "torch":
        if not torch_installed():
            raise MistnetError("runtime torch: torch is not installed here (pip install torch safetensors)")
        from edge_agent.torch_head import TorchExtractor

        return TorchExtractor.for_job(job, blob, encoder, dataset, device)
    raise MistnetError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
