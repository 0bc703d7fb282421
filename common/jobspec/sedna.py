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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any

from common.jobspec.documents import UNSET, Document, Origin
from common.jobspec.manifest import EnvVar, Manifest, Resource, Worker
from common.jobspec.spec import Loc, format_loc, is_yolo, known_archs

DEFAULT_ARCH = "yolov5s"  # the reference example's yolov5.pth is a YOLOv5s
ALGORITHM = "mistnet"
# the JobSpec fields a worker's env variables set, and how each value is parsed
CLOUD_ENV: dict[str, Callable[[EnvVar], Any]] = {
    "epochs": EnvVar.as_int,
    "batch_size": EnvVar.as_int,
    "learning_rate": EnvVar.as_float,
}
EDGE_ENV: dict[str, Callable[[EnvVar], Any]] = {
    "batch_size": EnvVar.as_int,
    "epsilon": EnvVar.as_float,
    "epochs": EnvVar.as_int,
}
PRIVACY_ENV: dict[str, Callable[[EnvVar], Any]] = {"epsilon": EnvVar.as_float}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

ModelUrl = tuple[str, Origin]


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
    return _Translator(Manifest(docs)).run()


class _Translator:
    """Fills the JobSpec data field by field, noting in ``origins`` where each value came from."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.warnings = manifest.warnings  # one list, in the order the problems are met
        self.origins: dict[Loc, Origin] = {}

    def run(self) -> Translation:
        job = self.manifest.job()
        fallback = job.origin(("spec",))
        self.origins[("name",)] = job.origin(("metadata", "name"), value=job.name)
        job.get(("spec",), Mapping, "a mapping")
        agg, trainers = self.workers(job)
        everyone = [agg, *trainers]
        self.check_algorithm(everyone, fallback)
        cut = self.cut_layer(job, everyone)
        pretrained, output = self.model_urls(job)
        model = self.model(everyone, pretrained, output, fallback)
        cloud = self.cloud(job, agg, trainers, output)
        privacy = self.from_env(agg, PRIVACY_ENV, {}, ("privacy",))
        edges = self.edges(job, trainers)
        data: dict[str, Any] = {
            "name": job.name,
            "model": model,
            "cut_layer": cut,
            "privacy": privacy,
            "edges": edges,
            "cloud": cloud,
            "transmitter": self.transmitter(job),
        }
        return Translation(data, self.origins, fallback, self.warnings)

    def from_env(
        self, worker: Worker, parsers: Mapping[str, Callable[[EnvVar], Any]], out: dict[str, Any], at: Loc
    ) -> dict[str, Any]:
        """``out`` with each field of ``parsers`` the worker's env sets, its origin noted under ``at``."""
        for key, parse in parsers.items():
            var = worker.env.get(key)
            if var is not None:
                out[key], self.origins[(*at, key)] = parse(var), var.origin
        return out

    # workers --------------------------------------------------------------------------------------

    def workers(self, job: Resource) -> tuple[Worker, list[Worker]]:
        """The aggregation worker (the cloud) and the training workers (the edges)."""
        agg = self.manifest.worker(job, ("spec", "aggregationWorker"))
        trainers_raw = job.get(("spec", "trainingWorkers"), list, "a list")
        if not trainers_raw:
            raise job.origin(("spec", "trainingWorkers")).error("must list at least one training worker")
        return agg, [self.manifest.worker(job, ("spec", "trainingWorkers", i)) for i in range(len(trainers_raw))]

    def check_algorithm(self, everyone: list[Worker], fallback: Origin) -> None:
        algorithm_set = False
        for w in everyone:
            var = w.env.get("aggregation_algorithm")
            if var is not None:
                algorithm_set = True
                if var.as_word() != ALGORITHM:
                    raise var.error(f"is not supported: mistnet runs only the {ALGORITHM} algorithm")
        if not algorithm_set:
            self.warnings.append(fallback.message(f"no worker sets aggregation_algorithm; running {ALGORITHM}"))

    def cut_layer(self, job: Resource, everyone: list[Worker]) -> int:
        cut = self.manifest.agreed(everyone, "cut_layer", EnvVar.as_int)
        if cut is None:
            raise job.origin(("spec", "aggregationWorker")).error(
                "no worker sets env cut_layer: add it to the aggregationWorker and the trainingWorkers"
            )
        self.origins[("cut_layer",)] = cut[1].origin
        return cut[0]

    # model ----------------------------------------------------------------------------------------

    def model_urls(self, job: Resource) -> tuple[ModelUrl | None, ModelUrl]:
        """The URLs of the pretrained weights (if the job names a pretrainedModel) and of the trained ones."""
        output_model = self.manifest.ref(job, ("spec", "aggregationWorker", "model"), "Model")
        pretrained_model = self.manifest.ref(job, ("spec", "pretrainedModel"), "Model", required=False)
        assert output_model is not None
        pretrained = None if pretrained_model is None else _model_url(pretrained_model)
        return pretrained, _model_url(output_model)

    def model(
        self, everyone: list[Worker], pretrained: ModelUrl | None, output: ModelUrl, fallback: Origin
    ) -> dict[str, Any]:
        o = self.origins
        model: dict[str, Any] = {}
        if pretrained is not None:
            model["pretrained"], o[("model", "pretrained")] = pretrained
        urls = [output] if pretrained is None else [pretrained, output]
        model["arch"] = self.arch(everyone, urls, fallback)
        classes = self.manifest.agreed(everyone, "num_classes", EnvVar.as_int)
        if classes is not None:
            model["num_classes"], o[("model", "num_classes")] = classes[0], classes[1].origin
        elif is_yolo(model["arch"]):
            model["num_classes"] = 80
        size = self.manifest.agreed(everyone, "image_size", EnvVar.as_int)
        if size is not None:
            model["image_size"], o[("model", "image_size")] = size[0], size[1].origin
        o[("model",)] = o.get(("model", "arch"), fallback)
        return model

    def arch(self, everyone: list[Worker], urls: list[ModelUrl], fallback: Origin) -> str:
        """env model; else a Model URL's file name that names an architecture; else the default (warning)."""
        arch = self.manifest.agreed(everyone, "model", EnvVar.as_word)
        if arch is not None:
            self.origins[("model", "arch")] = arch[1].origin
            return arch[0]
        archs = known_archs()
        for url, origin in urls:
            stem = PurePosixPath(url.rstrip("/")).name.split(".")[0].lower()
            if stem in archs:
                self.origins[("model", "arch")] = origin
                return stem
        self.origins[("model", "arch")] = fallback
        self.warnings.append(
            fallback.message(f"the model architecture is not given (env model); assuming {DEFAULT_ARCH}")
        )
        return DEFAULT_ARCH

    # cloud and edges ------------------------------------------------------------------------------

    def cloud(self, job: Resource, agg: Worker, trainers: list[Worker], output: ModelUrl) -> dict[str, Any]:
        o = self.origins
        cloud: dict[str, Any] = {}
        o[("cloud",)] = job.origin(("spec", "aggregationWorker"))
        if agg.node is not None:
            cloud["node"], o[("cloud", "node")] = agg.node, agg.node_origin
        cloud["output"], o[("cloud", "output")] = output
        self.from_env(agg, CLOUD_ENV, cloud, ("cloud",))
        if "learning_rate" not in cloud:
            lr = self.manifest.agreed(trainers, "learning_rate", EnvVar.as_float)
            if lr is not None:
                cloud["learning_rate"], o[("cloud", "learning_rate")] = lr[0], lr[1].origin
        var = agg.env.get("validation")
        if var is not None and var.as_text():
            cloud["validation"], o[("cloud", "validation")] = var.as_text(), var.origin
        return cloud

    def edges(self, job: Resource, trainers: list[Worker]) -> list[dict[str, Any]]:
        """One edge per training worker, on distinct nodes."""
        o = self.origins
        o[("edges",)] = job.origin(("spec", "trainingWorkers"))
        edges = []
        nodes: dict[str, Worker] = {}
        for i, w in enumerate(trainers):
            o[("edges", i)] = job.origin(w.path)
            dataset = self.manifest.ref(job, (*w.path, "dataset"), "Dataset")
            assert dataset is not None
            url = dataset.text(("spec", "url"))
            assert url is not None
            o[("edges", i, "dataset")] = dataset.origin(("spec", "url"), value=url)
            node = self.edge_node(job, i, w, dataset, url)
            if node in nodes:
                raise o[("edges", i, "node")].error(
                    f"is already the node of {format_loc(nodes[node].path)}: one training worker per node"
                )
            nodes[node] = w
            edges.append(self.from_env(w, EDGE_ENV, {"node": node, "dataset": url}, ("edges", i)))
        return edges

    def edge_node(self, job: Resource, i: int, w: Worker, dataset: Resource, url: str) -> str:
        """The worker's nodeName, else its Dataset's; when both are given they must agree (local data)."""
        data_node = dataset.text(("spec", "nodeName"), required=False)
        if w.node is None:
            if data_node is None:
                raise job.origin((*w.path, "template", "spec")).error(
                    f"nodeName is required (neither the worker nor {dataset.label} names the edge node)"
                )
            self.origins[("edges", i, "node")] = dataset.origin(("spec", "nodeName"), value=data_node)
            return data_node
        self.origins[("edges", i, "node")] = w.node_origin
        if data_node is not None and data_node != w.node and "://" not in url:
            raise w.node_origin.error(
                f"differs from {dataset.label} spec.nodeName {data_node!r}: the data must be on the worker's node"
            )
        return w.node

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
            secret = self.manifest.find("Secret", name, job)
            if secret is None:
                raise self.manifest.undefined("Secret", name, job.origin((*s3path, "credentialName")))
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


def _model_url(model: Resource) -> ModelUrl:
    url = model.text(("spec", "url"))
    assert url is not None
    return url, model.origin(("spec", "url"), value=url)
