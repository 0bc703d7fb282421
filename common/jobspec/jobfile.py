"""Job files: YAML on disk → :class:`~common.jobspec.JobSpec`, and a spec → its effective configuration.

A job file is either

* **native**: one YAML document that maps 1:1 onto ``JobSpec`` (every key is a JobSpec field, nested
  keys are the nested specs' fields; omitted fields take their defaults)::

      apiVersion: mistnet/v1          # optional; if given, exactly this
      kind: MistNetJob                # optional; if given, exactly this
      name: mnist-demo                # job id: letters, digits, _ . -; at most 63
      model: {arch: lenet5, num_classes: 10, pretrained: null, image_size: 0}
      cut_layer: 2                    # the edge runs layers [0, 2); valid 1..n-1 (YOLOv5: 1..10)
      privacy: {epsilon: 100, bits: 1}
      edges:                          # one per edge node, node names distinct
        - {node: edge-1, dataset: /data/mnist/part-1, batch_size: 32}
        - {node: edge-2, dataset: /data/mnist/part-2, epsilon: 8}   # per-edge ε override
      cloud: {node: cloud, epochs: 10, batch_size: 32, learning_rate: 0.01,
              validation: /data/mnist/test, output: runs/mnist.safetensors, eval_interval: 1}
      collect: {timeout_s: 600, min_edges: 1, on_timeout: proceed}
      transmitter: {}                 # MQTT; or {s3: {bucket_path: s3://b/p, endpoint_url: ...}}
      seed: 0

* **Sedna**: KubeEdge Sedna manifests (``Dataset``, ``Model``, ``Secret``, ``FederatedLearningJob``
  documents, as for ``kubectl apply -f``), translated by :mod:`common.jobspec.sedna`.

A single document whose ``kind`` is ``MistNetJob`` or absent (and which has no ``apiVersion`` other
than ``mistnet/v1``) is native; anything else is read as Sedna manifests.

Every problem raises :class:`~common.errors.SpecError` with one line naming the file and line, the
document (``Kind/name`` or ``document #N``), the field path and the problem, e.g.::

    job.yaml:57: FederatedLearningJob/yolo-v5 spec.trainingWorkers[1].template.spec.containers[0].env
    epsilon: '-3' must be > 0
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from common.errors import SpecError
from common.jobspec.documents import (
    NATIVE_API_VERSION,
    NATIVE_KIND,
    UNSET,
    Document,
    Origin,
    OriginFor,
    is_native,
    read_documents,
    read_text,
)
from common.jobspec.sedna import job_data_from_sedna
from common.jobspec.spec import JobSpec, JobSpecInvalid, LayerCount, Loc, build_job, join_problems

SECRET_FIELDS = ("access_key", "secret_key")


# Loading ---------------------------------------------------------------------------------------------


@dataclass
class LoadedJob:
    spec: JobSpec
    form: str  # "native" or "sedna"
    source: str
    warnings: list[str] = field(default_factory=list)


def load_job(path: str | Path, *, layer_count: LayerCount | None = None) -> JobSpec:
    """The JobSpec of a native or Sedna job file; SpecError for anything wrong with it."""
    return load_job_file(path, layer_count=layer_count).spec


def load_job_file(path: str | Path, *, layer_count: LayerCount | None = None) -> LoadedJob:
    """Like :func:`load_job`, with the detected form and the warnings."""
    return parse_job_text(read_text(path), str(path), layer_count=layer_count)


def parse_job_text(text: str, source: str = "<string>", *, layer_count: LayerCount | None = None) -> LoadedJob:
    docs = [d for d in read_documents(text, source) if d.data is not None]
    if not docs:
        raise SpecError(f"{source}: the file is empty: expected a MistNetJob or Sedna manifests")
    for doc in docs:
        if not isinstance(doc.data, Mapping):
            raise SpecError(
                f"{source}:{doc.line(())}: document #{doc.index} is a {_kind_of(doc.data)}, not a mapping:"
                " a job file holds a MistNetJob or Kubernetes objects"
            )
    if len(docs) == 1 and is_native(docs[0].data):
        return _load_native(docs[0], layer_count)
    tr = job_data_from_sedna(docs)
    spec = build_located(tr.data, tr.origin_for, layer_count)
    return LoadedJob(spec, "sedna", source, tr.warnings)


def _kind_of(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def _load_native(doc: Document, layer_count: LayerCount | None) -> LoadedJob:
    data = dict(doc.data)
    api = data.pop("apiVersion", None)
    kind = data.pop("kind", None)
    if api is not None and api != NATIVE_API_VERSION:
        raise Origin(doc, ("apiVersion",)).error(f"is not supported; use {NATIVE_API_VERSION}", api)
    if kind is not None and kind != NATIVE_KIND:
        raise Origin(doc, ("kind",)).error(f"is not a native job; use kind {NATIVE_KIND}", kind)

    def origin_for(loc: Loc) -> Origin:
        return Origin(doc, loc)

    return LoadedJob(build_located(data, origin_for, layer_count), "native", doc.source)


def build_located(data: Mapping[str, Any], origin_for: OriginFor, layer_count: LayerCount | None) -> JobSpec:
    """:func:`common.jobspec.spec.build_job`, with each problem reported where its value came from."""
    try:
        return build_job(data, layer_count)
    except JobSpecInvalid as exc:
        messages = []
        for issue in exc.issues:
            origin = origin_for(issue.loc)
            if issue.loc and issue.loc[-1] in SECRET_FIELDS:
                origin = replace(origin, value=UNSET)  # never echo a credential
            elif origin.value is UNSET and issue.has_value:
                origin = replace(origin, value=issue.value)
            messages.append(origin.message(issue.problem))
        raise SpecError(join_problems(messages)) from None


def to_native(spec: JobSpec) -> dict[str, Any]:
    """The native form of a spec (non-default fields only); ``parse_job_text`` reads it back.
    It includes S3 credentials when the spec has them: do not log it."""
    body = spec.model_dump(mode="json", exclude_defaults=True)
    return {"apiVersion": NATIVE_API_VERSION, "kind": NATIVE_KIND, **body}
