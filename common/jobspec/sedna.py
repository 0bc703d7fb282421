"""KubeEdge Sedna manifests → JobSpec data.

Reads the documents of a ``kubectl apply -f`` file — ``Dataset``, ``Model`` and
``FederatedLearningJob`` (``sedna.io/v1alpha1``) and ``Secret`` (``v1``), also as items of a ``List`` —
and builds the native JobSpec mapping plus, for every JobSpec field, the :class:`Origin` it came from,
so a bad value is reported where the user wrote it.

====================================================================  =====================================
Sedna                                                                 JobSpec
====================================================================  =====================================
FederatedLearningJob ``metadata.name``                                ``name``
``spec.aggregationWorker.template.spec.nodeName``                     ``cloud.node`` (default ``cloud``)
aggregationWorker env ``epochs`` / ``batch_size`` / ``learning_rate``  ``cloud.epochs`` / ``.batch_size`` /
                                                                      ``.learning_rate``
aggregationWorker env ``learning_rate`` absent                        the trainingWorkers' common value
aggregationWorker env ``validation``                                  ``cloud.validation``
``spec.aggregationWorker.model.name`` → Model ``spec.url``            ``cloud.output`` (trained weights)
``spec.pretrainedModel.name`` → Model ``spec.url``                    ``model.pretrained``
env ``model`` / ``model_name`` (any worker, must agree)               ``model.arch``; else the Model URL's
                                                                      file name (``yolov5s.pth``); else
                                                                      ``yolov5s`` (warning)
env ``num_classes`` / ``image_size``                                  ``model.num_classes`` (YOLO default
                                                                      80) / ``model.image_size``
env ``cut_layer`` (every worker that sets it must agree; required)    ``cut_layer``
aggregationWorker env ``epsilon``                                     ``privacy.epsilon`` (default 100)
env ``aggregation_algorithm`` (any worker)                            must be ``mistnet`` (any case); unset:
                                                                      warning
``spec.trainingWorkers[i]``                                           ``edges[i]``
``  .template.spec.nodeName`` (else the Dataset's ``nodeName``)       ``edges[i].node`` (distinct)
``  .dataset.name`` → Dataset ``spec.url``                            ``edges[i].dataset``
trainingWorker env ``batch_size`` / ``epsilon`` / ``epochs``          ``edges[i].batch_size`` / ``.epsilon``
                                                                      (override) / ``.epochs`` (recorded)
``spec.transmitter`` absent or ``ws: {}``                             MQTT (``transmitter.s3`` None)
``spec.transmitter.s3.aggDataPath``                                   ``transmitter.s3.bucket_path``
``s3.credentialName`` → Secret annotation ``s3-endpoint``             ``transmitter.s3.endpoint_url``
(+ ``s3-usehttps``, default 1)                                        (``https://`` or ``http://``)
Secret ``ACCESS_KEY_ID`` / ``SECRET_ACCESS_KEY`` (``stringData``,      ``transmitter.s3.access_key`` /
or base64 ``data``)                                                   ``.secret_key``
====================================================================  =====================================

Env names match in any case (``EPSILON``, ``epsilon``); values are strings as Kubernetes requires (bare
YAML numbers are accepted too) and are parsed strictly. Env variables mistnet does not use, and
non-Sedna kinds (ConfigMap, Namespace, ...), give warnings; unknown ``sedna.io`` kinds, a second
FederatedLearningJob, duplicate documents, dangling references and ``valueFrom`` on a used variable
are errors.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import PurePosixPath
from typing import Any, TypeVar

from common.errors import SpecError
from common.jobspec.documents import NATIVE_KIND, UNSET, Document, Origin
from common.jobspec.spec import Loc, format_loc, is_yolo, known_archs

SEDNA_API_VERSION = "sedna.io/v1alpha1"
JOB_KIND = "FederatedLearningJob"
USED_KINDS = {"Dataset": SEDNA_API_VERSION, "Model": SEDNA_API_VERSION, JOB_KIND: SEDNA_API_VERSION, "Secret": "v1"}
DEFAULT_ARCH = "yolov5s"  # the reference example's yolov5.pth is a YOLOv5s
ALGORITHM = "mistnet"

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
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
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


@dataclass
class Translation:
    data: dict[str, Any]
    origins: dict[Loc, Origin]
    fallback: Origin
    warnings: list[str] = field(default_factory=list)

    def origin_for(self, loc: Loc) -> Origin:
        """The origin of ``loc`` or of its nearest ancestor (then naming the JobSpec path too)."""
        for n in range(len(loc), 0, -1):
            origin = self.origins.get(tuple(loc[:n]))
            if origin is not None:
                if n == len(loc):
                    return origin
                note = f"({format_loc(loc)})"
                return replace(origin, field=f"{origin.field} {note}" if origin.field else note, value=UNSET)
        return self.fallback


def job_data_from_sedna(docs: list[Document]) -> Translation:
    """JobSpec data from the non-empty mapping documents of a Sedna manifest file."""
    return _Translator(docs).run()


class _Translator:
    def __init__(self, docs: list[Document]):
        self.docs = docs
        self.source = docs[0].source
        self.warnings: list[str] = []
        self.origins: dict[Loc, Origin] = {}
        self.resources: list[Resource] = []

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
            defined = sorted({r.name for r in self.resources if r.kind == kind})
            hint = f"defined: {', '.join(defined)}" if defined else f"the file has no {kind} document"
            raise job.origin((*path, "name")).error(f"{kind} {name!r} is not defined in this file ({hint})")
        return target

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

    # the job --------------------------------------------------------------------------------------

    def run(self) -> Translation:
        self.collect()
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
        job = jobs[0]
        o = self.origins
        fallback = job.origin(("spec",))
        o[("name",)] = job.origin(("metadata", "name"), value=job.name)
        job.get(("spec",), Mapping, "a mapping")

        agg = self.worker(job, ("spec", "aggregationWorker"))
        trainers_raw = job.get(("spec", "trainingWorkers"), list, "a list")
        if not trainers_raw:
            raise job.origin(("spec", "trainingWorkers")).error("must list at least one training worker")
        trainers = [self.worker(job, ("spec", "trainingWorkers", i)) for i in range(len(trainers_raw))]
        everyone = [agg, *trainers]

        # algorithm
        algorithm_set = False
        for w in everyone:
            var = w.env.get("aggregation_algorithm")
            if var is not None:
                algorithm_set = True
                if var.as_word() != ALGORITHM:
                    raise var.error(f"is not supported: mistnet runs only the {ALGORITHM} algorithm")
        if not algorithm_set:
            self.warnings.append(fallback.message(f"no worker sets aggregation_algorithm; running {ALGORITHM}"))

        # cut layer
        cut = self.agreed(everyone, "cut_layer", EnvVar.as_int)
        if cut is None:
            raise job.origin(("spec", "aggregationWorker")).error(
                "no worker sets env cut_layer: add it to the aggregationWorker and the trainingWorkers"
            )
        o[("cut_layer",)] = cut[1].origin

        # model
        output_model = self.ref(job, ("spec", "aggregationWorker", "model"), "Model")
        pretrained_model = self.ref(job, ("spec", "pretrainedModel"), "Model", required=False)
        model: dict[str, Any] = {}
        model_urls: list[tuple[str, Origin]] = []
        for res in (pretrained_model, output_model):
            if res is None:
                continue
            url = res.text(("spec", "url"))
            assert url is not None
            model_urls.append((url, res.origin(("spec", "url"), value=url)))
        if pretrained_model is not None:
            model["pretrained"], o[("model", "pretrained")] = model_urls[0]
        arch = self.agreed(everyone, "model", EnvVar.as_word)
        if arch is not None:
            model["arch"], o[("model", "arch")] = arch[0], arch[1].origin
        else:
            archs = known_archs()
            for url, origin in model_urls:
                stem = PurePosixPath(url.rstrip("/")).name.split(".")[0].lower()
                if stem in archs:
                    model["arch"], o[("model", "arch")] = stem, origin
                    break
            else:
                model["arch"] = DEFAULT_ARCH
                o[("model", "arch")] = fallback
                self.warnings.append(
                    fallback.message(f"the model architecture is not given (env model); assuming {DEFAULT_ARCH}")
                )
        classes = self.agreed(everyone, "num_classes", EnvVar.as_int)
        if classes is not None:
            model["num_classes"], o[("model", "num_classes")] = classes[0], classes[1].origin
        elif is_yolo(model["arch"]):
            model["num_classes"] = 80
        size = self.agreed(everyone, "image_size", EnvVar.as_int)
        if size is not None:
            model["image_size"], o[("model", "image_size")] = size[0], size[1].origin
        o[("model",)] = o.get(("model", "arch"), fallback)

        # cloud
        cloud: dict[str, Any] = {}
        o[("cloud",)] = job.origin(("spec", "aggregationWorker"))
        if agg.node is not None:
            cloud["node"], o[("cloud", "node")] = agg.node, agg.node_origin
        out_url, out_origin = model_urls[-1]
        cloud["output"], o[("cloud", "output")] = out_url, out_origin
        for key, parse in (
            ("epochs", EnvVar.as_int),
            ("batch_size", EnvVar.as_int),
            ("learning_rate", EnvVar.as_float),
        ):
            var = agg.env.get(key)
            if var is not None:
                cloud[key], o[("cloud", key)] = parse(var), var.origin
        if "learning_rate" not in cloud:
            lr = self.agreed(trainers, "learning_rate", EnvVar.as_float)
            if lr is not None:
                cloud["learning_rate"], o[("cloud", "learning_rate")] = lr[0], lr[1].origin
        var = agg.env.get("validation")
        if var is not None and var.as_text():
            cloud["validation"], o[("cloud", "validation")] = var.as_text(), var.origin

        # privacy
        privacy: dict[str, Any] = {}
        var = agg.env.get("epsilon")
        if var is not None:
            privacy["epsilon"], o[("privacy", "epsilon")] = var.as_float(), var.origin

        # edges
        o[("edges",)] = job.origin(("spec", "trainingWorkers"))
        edges = []
        nodes: dict[str, Worker] = {}
        for i, w in enumerate(trainers):
            o[("edges", i)] = job.origin(w.path)
            dataset = self.ref(job, (*w.path, "dataset"), "Dataset")
            assert dataset is not None
            url = dataset.text(("spec", "url"))
            assert url is not None
            o[("edges", i, "dataset")] = dataset.origin(("spec", "url"), value=url)
            data_node = dataset.text(("spec", "nodeName"), required=False)
            node = w.node
            if node is None:
                if data_node is None:
                    raise job.origin((*w.path, "template", "spec")).error(
                        f"nodeName is required (neither the worker nor {dataset.label} names the edge node)"
                    )
                node, o[("edges", i, "node")] = data_node, dataset.origin(("spec", "nodeName"), value=data_node)
            else:
                o[("edges", i, "node")] = w.node_origin
                if data_node is not None and data_node != node and "://" not in url:
                    raise w.node_origin.error(
                        f"differs from {dataset.label} spec.nodeName {data_node!r}: the data must be on the"
                        " worker's node"
                    )
            if node in nodes:
                raise o[("edges", i, "node")].error(
                    f"is already the node of {format_loc(nodes[node].path)}: one training worker per node"
                )
            nodes[node] = w
            edge: dict[str, Any] = {"node": node, "dataset": url}
            for key, parse in (("batch_size", EnvVar.as_int), ("epsilon", EnvVar.as_float), ("epochs", EnvVar.as_int)):
                var = w.env.get(key)
                if var is not None:
                    edge[key], o[("edges", i, key)] = parse(var), var.origin
            edges.append(edge)

        data: dict[str, Any] = {
            "name": job.name,
            "model": model,
            "cut_layer": cut[0],
            "privacy": privacy,
            "edges": edges,
            "cloud": cloud,
            "transmitter": self.transmitter(job),
        }
        return Translation(data, self.origins, fallback, self.warnings)

    # transmitter ----------------------------------------------------------------------------------

    def transmitter(self, job: Resource) -> dict[str, Any]:
        path: Loc = ("spec", "transmitter")
        spec = job.get(path, Mapping, "a mapping", required=False)
        self.origins[("transmitter",)] = job.origin(path)
        if spec is None:
            return {}
        for key in spec:
            if key not in ("ws", "s3"):
                raise job.origin((*path, str(key))).error("is not a known transmitter (ws or s3)")
        if spec.get("ws") is not None:
            job.get((*path, "ws"), Mapping, "a mapping")
        if spec.get("s3") is None:
            return {}
        s3path = (*path, "s3")
        job.get(s3path, Mapping, "a mapping")
        if "ws" in spec:
            self.warnings.append(
                job.origin(path).message("lists ws and s3: features go through s3 (never a silent fallback)")
            )
        self.origins[("transmitter", "s3")] = job.origin(s3path)
        bucket = job.text((*s3path, "aggDataPath"))
        self.origins[("transmitter", "s3", "bucket_path")] = job.origin((*s3path, "aggDataPath"), value=bucket)
        s3: dict[str, Any] = {"bucket_path": bucket}
        if spec["s3"].get("credentialName") is not None:
            name = job.text((*s3path, "credentialName"))
            assert name is not None
            secret = self.find("Secret", name, job)
            if secret is None:
                defined = sorted({r.name for r in self.resources if r.kind == "Secret"})
                hint = f"defined: {', '.join(defined)}" if defined else "the file has no Secret document"
                raise job.origin((*s3path, "credentialName")).error(
                    f"Secret {name!r} is not defined in this file ({hint})"
                )
            s3.update(self.secret(secret))
        return {"s3": s3}

    def secret(self, secret: Resource) -> dict[str, Any]:
        out: dict[str, Any] = {}
        ann = secret.get(("metadata", "annotations"), Mapping, "a mapping", required=False) or {}
        endpoint = secret.text(("metadata", "annotations", "s3-endpoint"), required=False) if ann else None
        if endpoint is not None:
            endpoint = endpoint.strip()
            https = ann.get("s3-usehttps", "1")
            flag = str(https).strip().lower()
            if flag not in _TRUE | _FALSE:
                raise secret.origin(("metadata", "annotations", "s3-usehttps"), value=https).error("must be 1 or 0")
            scheme = "https" if flag in _TRUE else "http"
            out["endpoint_url"] = endpoint if "://" in endpoint else f"{scheme}://{endpoint}"
            self.origins[("transmitter", "s3", "endpoint_url")] = secret.origin(
                ("metadata", "annotations", "s3-endpoint"), value=endpoint
            )
        data = secret.get(("data",), Mapping, "a mapping", required=False) or {}
        plain = secret.get(("stringData",), Mapping, "a mapping", required=False) or {}
        for key, target in (("ACCESS_KEY_ID", "access_key"), ("SECRET_ACCESS_KEY", "secret_key")):
            self.origins[("transmitter", "s3", target)] = secret.origin(("stringData" if key in plain else "data", key))
            if key in plain:  # stringData wins over data, as in Kubernetes
                value = secret.text(("stringData", key))
            elif key in data:
                encoded = secret.text(("data", key))
                assert encoded is not None
                try:
                    value = base64.b64decode("".join(encoded.split()), validate=True).decode("utf-8")
                except (binascii.Error, ValueError):
                    raise secret.origin(("data", key)).error("is not valid base64 of UTF-8 text") from None
            else:
                raise secret.origin(("data",)).error(f"has no {key} (in data or stringData)")
            if not value or not value.strip():
                raise secret.origin(("data", key)).error("must not be empty")
            out[target] = value
        return out
