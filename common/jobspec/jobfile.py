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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from common.errors import SpecError
from common.jobspec.spec import (
    JobSpec,
    JobSpecInvalid,
    LayerCount,
    Loc,
    build_job,
    format_loc,
    join_problems,
    show_value,
)

NATIVE_KIND = "MistNetJob"
NATIVE_API_VERSION = "mistnet/v1"
MAX_JOB_FILE_BYTES = 1024 * 1024
_MERGE_TAG = "tag:yaml.org,2002:merge"
SECRET_FIELDS = ("access_key", "secret_key")


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


# Documents and where values come from --------------------------------------------------------------


@dataclass(eq=False)
class Document:
    """One YAML document of a file: its data and its node tree (for line numbers)."""

    source: str
    index: int  # 1-based position in the file, counting empty documents
    data: Any
    node: yaml.Node | None = None

    def line(self, path: Sequence[str | int]) -> int | None:
        """1-based line of the deepest node along ``path`` that exists."""
        node = self.node
        if node is None:
            return None
        line = node.start_mark.line + 1
        for part in path:
            nxt: yaml.Node | None = None
            if isinstance(node, yaml.MappingNode) and isinstance(part, str):
                for key, value in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value == part:
                        nxt = value
                        break
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
                nxt = node.value[part]
            if nxt is None:
                break
            node = nxt
            line = node.start_mark.line + 1
        return line

    @property
    def label(self) -> str:
        data = self.data
        if not isinstance(data, Mapping):
            return f"document #{self.index}"
        kind = data.get("kind")
        meta = data.get("metadata")
        name = meta.get("name") if isinstance(meta, Mapping) else None
        if _is_native(data):
            kind, name = NATIVE_KIND, data.get("name")
        if isinstance(kind, str) and kind:
            return f"{kind}/{name}" if isinstance(name, str) and name else f"{kind} (document #{self.index})"
        return f"document #{self.index}"


@dataclass(frozen=True)
class Origin:
    """Where a value came from: a document, the path shown to the user, and the raw value."""

    doc: Document
    path: Loc = ()
    label: str | None = None  # overrides doc.label (e.g. an item of a List)
    field: str | None = None  # shown after the path, e.g. an env variable's name
    line_path: Loc | None = None  # path used for the line number; defaults to ``path``
    value: Any = UNSET  # the value as the user wrote it

    def line(self) -> int | None:
        return self.doc.line(self.line_path if self.line_path is not None else self.path)

    def what(self) -> str:
        """``Kind/name path field`` without file or line."""
        parts = [self.label or self.doc.label, format_loc(self.path), self.field or ""]
        return " ".join(p for p in parts if p)

    def where(self) -> str:
        line = self.line()
        return f"{self.doc.source}:{line}: {self.what()}" if line else f"{self.doc.source}: {self.what()}"

    def brief(self) -> str:
        line = self.line()
        return f"{self.what()} (line {line})" if line else self.what()

    def message(self, problem: str, value: Any = UNSET) -> str:
        shown = self.value if value is UNSET else value
        prefix = "" if shown is UNSET else show_value(shown) + " "
        return f"{self.where()}: {prefix}{problem}"

    def error(self, problem: str, value: Any = UNSET) -> SpecError:
        return SpecError(self.message(problem, value))


OriginFor = Callable[[Loc], Origin]


# Reading YAML ----------------------------------------------------------------------------------------


def read_text(path: str | Path) -> str:
    p = Path(path)
    try:
        if p.is_dir():
            raise SpecError(f"{p}: is a directory, not a job file")
        size = p.stat().st_size
        if size > MAX_JOB_FILE_BYTES:
            raise SpecError(f"{p}: {size} bytes is too large for a job file (limit {MAX_JOB_FILE_BYTES})")
        raw = p.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{p}: no such job file") from None
    except OSError as exc:
        raise SpecError(f"{p}: cannot read the job file: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{p}: not UTF-8 text (bad byte at offset {exc.start})") from None


def read_documents(text: str, source: str = "<string>") -> list[Document]:
    """Every document of a YAML stream, empty ones included (``data`` None)."""
    if len(text) > MAX_JOB_FILE_BYTES:
        raise SpecError(f"{source}: too large for a job file (limit {MAX_JOB_FILE_BYTES} bytes)")
    docs: list[Document] = []
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # checks the characters first: may raise ReaderError
        while loader.check_node():
            node = loader.get_node()
            _check_duplicate_keys(node, source)
            data = loader.construct_document(node) if node is not None else None
            docs.append(Document(source, len(docs) + 1, data, node))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = "; ".join(p for p in (exc.context, exc.problem) if p) or str(exc)
        raise SpecError(f"{where}: YAML syntax error: {problem}") from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise SpecError(f"{source}:{line}: YAML error: character #x{exc.character:04x} is not allowed") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: YAML error: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise SpecError(f"{source}: YAML nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as exc:
        # e.g. a timestamp like 2001-13-45, which the YAML resolver accepts but datetime rejects
        raise SpecError(f"{source}: unreadable YAML value: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return docs


def _check_duplicate_keys(root: yaml.Node | None, source: str) -> None:
    """PyYAML keeps the last of duplicate keys silently; kubectl and we reject them."""
    stack = [root] if root is not None else []
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                    ident = (key.tag, key.value)
                    line = key.start_mark.line + 1
                    if ident in keys:
                        raise SpecError(f"{source}:{line}: duplicate key {key.value!r} (first at line {keys[ident]})")
                    keys[ident] = line
                stack.extend((key, value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


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
    if len(docs) == 1 and _is_native(docs[0].data):
        return _load_native(docs[0], layer_count)
    from common.jobspec import sedna

    tr = sedna.translate(docs)
    spec = build_located(tr.data, tr.origin_for, layer_count)
    return LoadedJob(spec, "sedna", source, tr.warnings)


def _kind_of(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def _is_native(data: Mapping[Any, Any]) -> bool:
    kind, api = data.get("kind"), data.get("apiVersion")
    if kind == NATIVE_KIND or api == NATIVE_API_VERSION:
        return True
    return kind is None and api is None


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


# Effective configuration -------------------------------------------------------------------------------


def describe(spec: JobSpec) -> dict[str, Any]:
    """The configuration each role will run with, defaults filled in; secrets are never included."""
    from common.privacy import keep_probability

    cut = spec.cut_layer
    s3 = spec.transmitter.s3
    transmitter: dict[str, Any]
    if s3 is None:
        transmitter = {"kind": "mqtt"}
    else:
        transmitter = {
            "kind": "s3",
            "bucket_path": s3.bucket_path,
            "endpoint_url": s3.endpoint_url,
            "region": s3.region,
            "credentials": "from the job" if s3.access_key or s3.secret_key else "default AWS chain",
            "cleanup": s3.cleanup,
        }
    edges = []
    for edge in spec.edges:
        eps = spec.epsilon_for(edge.node)
        entry: dict[str, Any] = {
            "node": edge.node,
            "dataset": edge.dataset,
            "batch_size": edge.batch_size,
            "epsilon": eps,
            "epsilon_from": "edge" if edge.epsilon is not None else "job",
            "keep_probability": round(keep_probability(eps), 6),
            "layers": f"0..{cut - 1}",
        }
        if edge.epochs is not None:
            entry["epochs_recorded"] = edge.epochs
        edges.append(entry)
    cloud = spec.cloud
    return {
        "job": spec.name,
        "model": spec.model.model_dump(mode="json"),
        "cut_layer": cut,
        "privacy": spec.privacy.model_dump(mode="json"),
        "transmitter": transmitter,
        "cloud": {
            "node": cloud.node,
            "model": spec.model.arch,
            "cut_layer": cut,
            "layers": f"{cut}..end",
            "epochs": cloud.epochs,
            "batch_size": cloud.batch_size,
            "learning_rate": cloud.learning_rate,
            "validation": cloud.validation,
            "output": cloud.output,
            "eval_interval": cloud.eval_interval,
        },
        "collect": spec.collect.model_dump(mode="json"),
        "edges": edges,
        "seed": spec.seed,
    }


def to_native(spec: JobSpec) -> dict[str, Any]:
    """The native form of a spec (non-default fields only); ``parse_job_text`` reads it back.
    It includes S3 credentials when the spec has them: do not log it."""
    body = spec.model_dump(mode="json", exclude_defaults=True)
    return {"apiVersion": NATIVE_API_VERSION, "kind": NATIVE_KIND, **body}
