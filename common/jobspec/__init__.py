"""Job specifications and the job files that describe them.

:mod:`~common.jobspec.spec` holds the pydantic :class:`JobSpec` (the one source of truth for what a
job is); :mod:`~common.jobspec.jobfile` reads a native or KubeEdge Sedna job file into one. Below it,
:mod:`~common.jobspec.documents` keeps each YAML value's origin (file, line, path) for error messages,
:mod:`~common.jobspec.manifest` reads the Kubernetes objects of a Sedna file and
:mod:`~common.jobspec.sedna` translates them into JobSpec fields. Callers import the names below from here.
"""

from common.jobspec.jobfile import LoadedJob, load_job, load_job_file, parse_job_text, to_native
from common.jobspec.spec import (
    NAME_PATTERN,
    AdaptSpec,
    CloudSpec,
    CollectSpec,
    EdgeSpec,
    HeadStatistics,
    JobSpec,
    JobSpecInvalid,
    LayerCount,
    ModelSpec,
    Name,
    OnTimeout,
    PrivacySpec,
    S3Spec,
    Thresholding,
    TransmitterSpec,
    auto_bits,
    build_job,
    max_cut,
    registry_layer_count,
)

__all__ = [
    "NAME_PATTERN",
    "AdaptSpec",
    "CloudSpec",
    "CollectSpec",
    "EdgeSpec",
    "HeadStatistics",
    "JobSpec",
    "JobSpecInvalid",
    "LayerCount",
    "LoadedJob",
    "ModelSpec",
    "Name",
    "OnTimeout",
    "PrivacySpec",
    "S3Spec",
    "Thresholding",
    "TransmitterSpec",
    "auto_bits",
    "build_job",
    "load_job",
    "load_job_file",
    "max_cut",
    "parse_job_text",
    "registry_layer_count",
    "to_native",
]
