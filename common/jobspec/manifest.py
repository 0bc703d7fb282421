"""The Kubernetes objects of a Sedna manifest file, as :mod:`common.jobspec.sedna` reads them.

A :class:`Manifest` holds the documents' resources (``Dataset``, ``Model``, ``FederatedLearningJob``,
``Secret``, also as items of a ``List``), follows the references between them and reads a worker's env
variables; every value keeps the :class:`~common.jobspec.documents.Origin` it came from. Kinds mistnet
does not read and env variables it does not use become warnings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

from common.errors import SpecError
from common.jobspec.documents import NATIVE_KIND, UNSET, Document, Origin
from common.jobspec.spec import Loc

SEDNA_API_VERSION = "sedna.io/v1alpha1"
JOB_KIND = "FederatedLearningJob"
USED_KINDS = {"Dataset": SEDNA_API_VERSION, "Model": SEDNA_API_VERSION, JOB_KIND: SEDNA_API_VERSION, "Secret": "v1"}

# lower-cased env name → what it sets
ENV_KEYS = {
    "epochs": "epochs",
    "batch_size": "batch_size",
    "learning_rate": "learning_rate",
    "cut_layer": "cut_layer",
    "epsilon": "epsilon",
    "aggregation_algorithm": "aggregation_algorithm",
    "model": "model",
    "model_name": "model",
    "num_classes": "num_classes",
    "image_size": "image_size",
    "validation": "validation",
}
_INT = re.compile(r"[+-]?[0-9]+")

T = TypeVar("T")


@dataclass(eq=False)
class Resource:
    """One Kubernetes object: a document, or an item of a ``List`` document (``base`` = its path)."""

    doc: Document
    base: Loc
    data: Mapping[str, Any]
    kind: str
    name: str
    namespace: str | None

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.name}"

    def origin(
        self, path: Loc, *, field: str | None = None, line_path: Loc | None = None, value: Any = UNSET
    ) -> Origin:
        return Origin(
            self.doc,
            self.base + path,
            label=self.label,
            field=field,
            line_path=None if line_path is None else self.base + line_path,
            value=value,
        )

    def get(self, path: Loc, expect: type | tuple[type, ...], what: str, *, required: bool = True) -> Any:
        """The value at ``path``; None when absent and not required; SpecError when mistyped."""
        return _get(self.data, path, expect, what, required, self.origin)

    def text(self, path: Loc, *, required: bool = True) -> str | None:
        value = self.get(path, str, "a string", required=required)
        if value is not None and not value.strip():
            raise self.origin(path, value=value).error("must not be empty")
        return value


def _get(
    data: Any,
    path: Loc,
    expect: type | tuple[type, ...],
    what: str,
    required: bool,
    origin: Callable[..., Origin],
) -> Any:
    node = data
    for i, part in enumerate(path):
        if isinstance(part, str):
            if not isinstance(node, Mapping):
                raise origin(path[:i]).error("must be a mapping")
            node = node.get(part)
        else:
            if not isinstance(node, list):
                raise origin(path[:i]).error("must be a list")
            node = node[part] if 0 <= part < len(node) else None
        if node is None:
            if required:
                raise origin(path[: i + 1]).error("is required")
            return None
    if not isinstance(node, expect) or (expect is not bool and isinstance(node, bool)):
        raise origin(path, value=node).error(f"must be {what}")
    return node


@dataclass(frozen=True)
class EnvVar:
    key: str  # what it sets (ENV_KEYS value)
    name: str  # as written
    raw: str
    origin: Origin

    def error(self, problem: str) -> SpecError:
        return self.origin.error(problem)

    def as_int(self) -> int:
        text = self.raw.strip()
        try:
            if _INT.fullmatch(text):
                return int(text)
        except ValueError:  # more digits than int() accepts
            pass
        raise self.error("is not an integer")

    def as_float(self) -> float:
        try:
            value = float(self.raw.strip())
        except ValueError:
            raise self.error("is not a number") from None
        if not math.isfinite(value):
            raise self.error("is not a finite number")
        return value

    def as_word(self) -> str:
        return self.raw.strip().lower()

    def as_text(self) -> str:
        return self.raw.strip()


@dataclass
class Worker:
    path: Loc  # ("spec", "aggregationWorker") or ("spec", "trainingWorkers", i)
    node: str | None
    node_origin: Origin
    env: dict[str, EnvVar]


class Manifest:
    """The resources of a Sedna manifest file's non-empty mapping documents."""

    def __init__(self, docs: list[Document]):
        self.docs = docs
        self.source = docs[0].source
        self.warnings: list[str] = []
        self.resources: list[Resource] = []
        self.collect()

    # resources ------------------------------------------------------------------------------------

    def collect(self) -> None:
        seen: dict[tuple[str, str, str], Resource] = {}
        for doc in self.docs:
            data = doc.data
            items: list[tuple[Loc, Any]] = [((), data)]
            if data.get("kind") == "List" or (
                isinstance(data.get("kind"), str) and data["kind"].endswith("List") and "items" in data
            ):
                raw_items = _get(data, ("items",), list, "a list", True, partial(Origin, doc))
                items = [(("items", j), item) for j, item in enumerate(raw_items)]
            for base, item in items:
                res = self.resource(doc, base, item)
                if res is None:
                    continue
                key = (res.kind, res.namespace or "", res.name)
                if key in seen:
                    first = seen[key]
                    raise res.origin(("metadata", "name")).error(
                        f"duplicate document: {res.label} is already defined by document #{first.doc.index}"
                        f" (line {first.doc.line(first.base)})"
                    )
                seen[key] = res
                self.resources.append(res)

    def resource(self, doc: Document, base: Loc, data: Any) -> Resource | None:
        def origin(path: Loc, **kw: Any) -> Origin:
            return Origin(doc, base + path, **kw)

        if not isinstance(data, Mapping):
            raise origin(()).error("must be a mapping (a Kubernetes object)")
        kind = _get(data, ("kind",), str, "a string", True, origin)
        if kind == NATIVE_KIND:
            raise origin(("kind",)).error(f"a {NATIVE_KIND} must be the only document in its file")
        api = _get(data, ("apiVersion",), str, "a string", True, origin)
        expected = USED_KINDS.get(kind)
        if expected is None:
            if api.split("/")[0] == "sedna.io":
                raise origin(("kind",), value=kind).error(
                    f"is not supported: mistnet runs {JOB_KIND} jobs (with their Dataset, Model and Secret)"
                )
            name = data.get("metadata", {}).get("name") if isinstance(data.get("metadata"), Mapping) else None
            label = f"{kind}/{name}" if isinstance(name, str) else kind
            self.warnings.append(
                origin((), label=label).message(f"ignored: mistnet reads only {', '.join(USED_KINDS)}")
            )
            return None
        if api != expected:
            raise origin(("apiVersion",), value=api).error(f"is not supported for {kind}; expected {expected}")
        name = _get(data, ("metadata", "name"), str, "a string", True, origin)
        if not name.strip():
            raise origin(("metadata", "name"), value=name).error("must not be empty")
        namespace = _get(data, ("metadata", "namespace"), str, "a string", False, origin)
        return Resource(doc, base, data, kind, name, namespace)

    def find(self, kind: str, name: str, job: Resource) -> Resource | None:
        matches = [r for r in self.resources if r.kind == kind and r.name == name]
        for r in matches:
            if r.namespace == job.namespace:
                return r
        for r in matches:
            if r.namespace is None or job.namespace is None:
                return r
        return None

    def ref(self, job: Resource, path: Loc, kind: str, *, required: bool = True) -> Resource | None:
        """The resource a ``{name: ...}`` reference at ``path`` names."""
        if not required and job.get(path, Mapping, "a mapping", required=False) is None:
            return None
        name = job.text((*path, "name"))
        assert name is not None
        target = self.find(kind, name, job)
        if target is None:
            raise self.undefined(kind, name, job.origin((*path, "name")))
        return target

    def undefined(self, kind: str, name: str, origin: Origin) -> SpecError:
        """A dangling reference, at ``origin``, listing the resources of that kind the file defines."""
        defined = sorted({r.name for r in self.resources if r.kind == kind})
        hint = f"defined: {', '.join(defined)}" if defined else f"the file has no {kind} document"
        return origin.error(f"{kind} {name!r} is not defined in this file ({hint})")

    def job(self) -> Resource:
        """The file's one FederatedLearningJob."""
        jobs = [r for r in self.resources if r.kind == JOB_KIND]
        if not jobs:
            found = ", ".join(r.label for r in self.resources) or "nothing mistnet reads"
            raise SpecError(f"{self.source}: no {JOB_KIND} document (found: {found})")
        if len(jobs) > 1:
            raise (
                jobs[1]
                .origin(("metadata", "name"))
                .error(
                    f"a second {JOB_KIND} (the first is {jobs[0].label}, document #{jobs[0].doc.index}):"
                    " put one job per file"
                )
            )
        return jobs[0]

    # workers --------------------------------------------------------------------------------------

    def worker(self, job: Resource, path: Loc) -> Worker:
        job.get(path, Mapping, "a mapping")
        pod = (*path, "template", "spec")
        job.get(pod, Mapping, "a mapping")
        node = job.text((*pod, "nodeName"), required=False)
        node_origin = job.origin((*pod, "nodeName"), value=node if node is not None else UNSET)
        if node is not None and "$" in node:
            raise node_origin.error("looks like an unexpanded shell variable: substitute it first (envsubst)")
        containers = job.get((*pod, "containers"), list, "a list")
        if not containers:
            raise job.origin((*pod, "containers")).error("must list at least one container")
        env: dict[str, EnvVar] = {}
        for c in range(len(containers)):
            cpath = (*pod, "containers", c)
            job.get(cpath, Mapping, "a mapping")
            entries = job.get((*cpath, "env"), list, "a list", required=False) or []
            for k in range(len(entries)):
                epath = (*cpath, "env", k)
                entry = job.get(epath, Mapping, "a mapping")
                name = job.text((*epath, "name"))
                assert name is not None
                key = ENV_KEYS.get(name.strip().lower())
                origin = job.origin((*cpath, "env"), field=name, line_path=(*epath, "value"))
                if key is None:
                    self.warnings.append(origin.message("is not used by mistnet (ignored)"))
                    continue
                if "valueFrom" in entry:
                    raise origin.error("uses valueFrom, which a job file cannot resolve: give a literal value")
                raw = entry.get("value")
                if raw is None:
                    raw = ""
                if isinstance(raw, bool) or not isinstance(raw, str | int | float):
                    raise origin.error("must be a string", raw)
                raw = raw if isinstance(raw, str) else str(raw)
                var = EnvVar(key, name, raw, replace(origin, value=raw))
                prev = env.get(key)
                if prev is None:
                    env[key] = var
                elif prev.raw.strip() != raw.strip():
                    raise var.error(f"conflicts with {prev.name}={prev.raw!r} at {prev.origin.brief()}")
        return Worker(path, node, node_origin, env)

    def agreed(self, workers: list[Worker], key: str, parse: Callable[[EnvVar], T]) -> tuple[T, EnvVar] | None:
        """The value every worker that sets ``key`` gives (SpecError if two differ), with its origin."""
        first: tuple[T, EnvVar] | None = None
        for w in workers:
            var = w.env.get(key)
            if var is None:
                continue
            value = parse(var)
            if first is None:
                first = (value, var)
            elif value != first[0]:
                raise var.error(
                    f"disagrees with {first[1].name}={first[1].raw!r} at {first[1].origin.brief()}:"
                    f" every worker that sets {key} must give the same value"
                )
        return first
