"""Sedna manifests → JobSpec: the reference yolov5_coco128_mistnet example and every way to get it wrong."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.errors import SpecError
from common.jobspec import (
    CloudSpec,
    EdgeSpec,
    JobSpec,
    LoadedJob,
    ModelSpec,
    PrivacySpec,
    S3Spec,
    TransmitterSpec,
    parse_job_text,
)

ROOT = Path(__file__).resolve().parents[1]
WS = ROOT / "examples" / "sedna" / "yolov5_coco128_mistnet.yaml"
S3 = ROOT / "examples" / "sedna" / "yolov5_coco128_mistnet_s3.yaml"

Docs = list[dict[str, Any]]


def load_docs(path: Path = WS) -> Docs:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def parse(docs: Docs) -> LoadedJob:
    return parse_job_text(yaml.safe_dump_all(docs, sort_keys=False), "job.yaml")


def error(docs: Docs) -> str:
    with pytest.raises(SpecError) as info:
        parse(docs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("job.yaml")
    return message


def doc(docs: Docs, kind: str, name: str | None = None) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))


def job(docs: Docs) -> dict[str, Any]:
    return doc(docs, "FederatedLearningJob")


def worker(docs: Docs, which: str | int) -> dict[str, Any]:
    spec = job(docs)["spec"]
    return spec["aggregationWorker"] if which == "agg" else spec["trainingWorkers"][which]


def env_list(docs: Docs, which: str | int) -> list[dict[str, Any]]:
    return worker(docs, which)["template"]["spec"]["containers"][0]["env"]


def set_env(docs: Docs, which: str | int, name: str, value: Any) -> Docs:
    """Set (or add) env ``name`` on a worker, replacing any entry whose name matches in any case."""
    entries = env_list(docs, which)
    for entry in entries:
        if entry["name"].lower() == name.lower():
            entry["name"], entry["value"] = name, value
            return docs
    entries.append({"name": name, "value": value})
    return docs


def drop_env(docs: Docs, which: str | int, name: str) -> Docs:
    entries = env_list(docs, which)
    entries[:] = [e for e in entries if e["name"].lower() != name.lower()]
    return docs


EXPECTED = JobSpec(
    name="yolo-v5",
    model=ModelSpec(arch="yolov5s", num_classes=80, pretrained="/pretrained/yolov5.pth"),
    cut_layer=4,
    privacy=PrivacySpec(epsilon=100.0),
    edges=[
        EdgeSpec(node="edge1-node", dataset="/data/1/COCO", batch_size=32, epsilon=100.0, epochs=1),
        EdgeSpec(node="edge2-node", dataset="/data/2/COCO", batch_size=32, epsilon=100.0, epochs=1),
    ],
    cloud=CloudSpec(node="cloud-node", epochs=100, batch_size=32, learning_rate=0.001, output="/model/yolov5.pth"),
)


# The reference example ----------------------------------------------------------------------------------


def test_reference_example_ws_gives_the_expected_spec():
    loaded = parse_job_text(WS.read_text(), str(WS))
    assert loaded.form == "sedna"
    assert loaded.spec == EXPECTED
    spec = loaded.spec
    # the reference's defects, not reproduced:
    assert spec.privacy.epsilon == 100.0 and spec.epsilon_for("edge1-node") == 100.0  # not int(cut_layer) = 4
    assert spec.cloud.epochs == 100 and spec.cloud.batch_size == 32  # lowercase env honoured (not 500 / 16)
    assert [e.dataset for e in spec.edges] == ["/data/1/COCO", "/data/2/COCO"]  # both edges
    assert spec.transmitter.s3 is None  # ws → MQTT
    assert any("assuming yolov5s" in w for w in loaded.warnings)


def test_reference_example_s3_with_secret():
    loaded = parse_job_text(S3.read_text(), str(S3))
    s3 = loaded.spec.transmitter.s3
    assert s3 == S3Spec(
        endpoint_url="https://s3.amazonaws.com",
        bucket_path="s3://sedna/fl/aggregation_data",
        access_key="XXXX",
        secret_key="XXXXXXXX",
    )
    assert loaded.spec.model_copy(update={"transmitter": TransmitterSpec()}) == EXPECTED
    assert any("lists ws and s3" in w for w in loaded.warnings)
    assert "XXXXXXXX" not in repr(loaded.spec)


def test_secret_in_base64_data_and_http_endpoint():
    docs = load_docs(S3)
    secret = doc(docs, "Secret")
    del secret["stringData"]
    secret["data"] = {
        "ACCESS_KEY_ID": base64.b64encode(b"minio").decode(),
        "SECRET_ACCESS_KEY": base64.b64encode(b"minio-secret").decode(),
    }
    secret["metadata"]["annotations"] = {"s3-endpoint": "minio.local:9000", "s3-usehttps": "0"}
    del job(docs)["spec"]["transmitter"]["ws"]
    loaded = parse(docs)
    s3 = loaded.spec.transmitter.s3
    assert s3 is not None
    assert (s3.endpoint_url, s3.access_key, s3.secret_key) == ("http://minio.local:9000", "minio", "minio-secret")
    assert not any("lists ws and s3" in w for w in loaded.warnings)


def test_string_data_wins_over_data():
    docs = load_docs(S3)
    secret = doc(docs, "Secret")
    secret["data"] = {"ACCESS_KEY_ID": base64.b64encode(b"old").decode()}
    s3 = parse(docs).spec.transmitter.s3
    assert s3 is not None and s3.access_key == "XXXX"


def test_s3_without_credentials_uses_the_default_chain():
    docs = [d for d in load_docs(S3) if d["kind"] != "Secret"]
    del job(docs)["spec"]["transmitter"]["s3"]["credentialName"]
    s3 = parse(docs).spec.transmitter.s3
    assert s3 is not None and s3.access_key is None and s3.endpoint_url is None


def test_env_names_in_any_case():
    docs = load_docs()
    set_env(docs, "agg", "EPSILON", "8")
    set_env(docs, "agg", "Epochs", "7")
    set_env(docs, "agg", "BATCH_SIZE", "16")
    set_env(docs, "agg", "Learning_Rate", "0.05")
    set_env(docs, 1, "Epsilon", "2.5")
    spec = parse(docs).spec
    assert spec.privacy.epsilon == 8.0
    assert (spec.cloud.epochs, spec.cloud.batch_size, spec.cloud.learning_rate) == (7, 16, 0.05)
    assert spec.epsilon_for("edge2-node") == 2.5
    assert spec.cut_layer == 4  # epsilon never stands in for cut_layer, nor the reverse


def test_epsilon_is_never_replaced_by_cut_layer():
    docs = load_docs()
    for w in ("agg", 0, 1):
        set_env(docs, w, "epsilon", "6")
    spec = parse(docs).spec
    assert spec.privacy.epsilon == 6.0 and spec.cut_layer == 4
    assert {spec.epsilon_for(e.node) for e in spec.edges} == {6.0}


def test_edge_without_epsilon_uses_the_job_epsilon():
    docs = load_docs()
    drop_env(docs, 0, "epsilon")
    set_env(docs, "agg", "epsilon", "3")
    spec = parse(docs).spec
    assert spec.edges[0].epsilon is None and spec.epsilon_for("edge1-node") == 3.0


def test_bare_yaml_numbers_are_accepted():
    docs = load_docs()
    set_env(docs, "agg", "epochs", 12)
    set_env(docs, "agg", "learning_rate", 0.5)
    spec = parse(docs).spec
    assert (spec.cloud.epochs, spec.cloud.learning_rate) == (12, 0.5)


def test_learning_rate_on_the_aggregation_worker_wins():
    docs = load_docs()
    set_env(docs, "agg", "learning_rate", "0.02")
    assert parse(docs).spec.cloud.learning_rate == 0.02


def test_arch_from_env_and_from_model_url():
    docs = load_docs()
    set_env(docs, "agg", "MODEL_NAME", "YOLOv5m")
    loaded = parse(docs)
    assert loaded.spec.model.arch == "yolov5m" and not any("assuming" in w for w in loaded.warnings)

    docs = load_docs()
    doc(docs, "Model", "yolo-v5-pretrained-model")["spec"]["url"] = "s3://models/yolov5n.pth"
    assert parse(docs).spec.model.arch == "yolov5n"


def test_lenet_via_env_has_no_default_class_count():
    docs = load_docs()
    for w in ("agg", 0, 1):
        set_env(docs, w, "model", "lenet5")
        set_env(docs, w, "cut_layer", "3")
    spec = parse(docs).spec
    assert (spec.model.arch, spec.model.num_classes, spec.cut_layer) == ("lenet5", 0, 3)


def test_node_from_the_dataset_when_the_worker_has_none():
    docs = load_docs()
    del worker(docs, 0)["template"]["spec"]["nodeName"]
    assert parse(docs).spec.edges[0].node == "edge1-node"


def test_other_kinds_and_unused_env_are_warnings():
    docs = load_docs()
    docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "extra"}, "data": {}})
    set_env(docs, 0, "PARTICIPANTS_COUNT", "2")
    loaded = parse(docs)
    assert any("ConfigMap/extra: ignored" in w for w in loaded.warnings)
    assert any("PARTICIPANTS_COUNT: is not used by mistnet" in w for w in loaded.warnings)


def test_kubernetes_list_of_items():
    items = load_docs()
    loaded = parse([{"apiVersion": "v1", "kind": "List", "items": items}])
    assert loaded.spec == EXPECTED


def test_line_numbers_point_at_the_value():
    text = WS.read_text().replace(
        'value: "100"\n              - name: "aggregation', 'value: "0"\n              - name: "aggregation'
    )
    with pytest.raises(SpecError) as info:
        parse_job_text(text, "job.yaml")
    line = int(str(info.value).split(":")[1])
    assert text.splitlines()[line - 1].strip() == 'value: "0"'


# Invalid manifests ---------------------------------------------------------------------------------------


def _two_workers_on_edge1(docs: Docs) -> None:
    worker(docs, 1)["template"]["spec"]["nodeName"] = "edge1-node"
    doc(docs, "Dataset", "coco-dataset-2")["spec"]["nodeName"] = "edge1-node"


def _second_job(docs: Docs) -> None:
    other = copy.deepcopy(job(docs))
    other["metadata"]["name"] = "yolo-v5-b"
    docs.append(other)


CASES = {
    "unknown algorithm": (
        lambda d: set_env(d, "agg", "aggregation_algorithm", "FedAvg"),
        "spec.aggregationWorker.template.spec.containers[0].env aggregation_algorithm: 'FedAvg' is not supported",
    ),
    "algorithm on a training worker": (
        lambda d: set_env(d, 1, "AGGREGATION_ALGORITHM", "fedavg"),
        "spec.trainingWorkers[1].template.spec.containers[0].env AGGREGATION_ALGORITHM: 'fedavg' is not supported",
    ),
    "epsilon negative": (
        lambda d: set_env(d, 1, "epsilon", "-3"),
        "FederatedLearningJob/yolo-v5 spec.trainingWorkers[1].template.spec.containers[0].env"
        " epsilon: '-3' must be > 0",
    ),
    "epsilon zero": (
        lambda d: set_env(d, "agg", "epsilon", "0"),
        "spec.aggregationWorker.template.spec.containers[0].env epsilon: '0' must be > 0",
    ),
    "epsilon not a number": (lambda d: set_env(d, "agg", "epsilon", "abc"), "env epsilon: 'abc' is not a number"),
    "epsilon infinite": (lambda d: set_env(d, 0, "EPSILON", "inf"), "EPSILON: 'inf' is not a finite number"),
    "batch size not an integer": (lambda d: set_env(d, 0, "batch_size", "3.5"), "batch_size: '3.5' is not an integer"),
    "batch size zero": (lambda d: set_env(d, 0, "batch_size", "0"), "env batch_size: '0' must be >= 1"),
    "cut out of range": (
        lambda d: [set_env(d, w, "cut_layer", "11") for w in ("agg", 0, 1)],
        "env cut_layer: '11' is out of range for yolov5s: valid 1..10",
    ),
    "cut zero": (lambda d: [set_env(d, w, "cut_layer", "0") for w in ("agg", 0, 1)], "cut_layer: '0' must be >= 1"),
    "cut inconsistent": (
        lambda d: set_env(d, 1, "cut_layer", "5"),
        "spec.trainingWorkers[1].template.spec.containers[0].env cut_layer: '5' disagrees with cut_layer='4'",
    ),
    "cut missing": (
        lambda d: [drop_env(d, w, "cut_layer") for w in ("agg", 0, 1)],
        "no worker sets env cut_layer",
    ),
    "unknown arch": (lambda d: set_env(d, "agg", "model", "resnet18"), "model: 'resnet18'"),
    "missing dataset": (
        lambda d: worker(d, 1)["dataset"].update(name="coco-dataset-3"),
        "spec.trainingWorkers[1].dataset.name: Dataset 'coco-dataset-3' is not defined in this file",
    ),
    "missing model": (
        lambda d: d.remove(doc(d, "Model", "yolo-v5-model")),
        "spec.aggregationWorker.model.name: Model 'yolo-v5-model' is not defined in this file",
    ),
    "missing pretrained model": (
        lambda d: d.remove(doc(d, "Model", "yolo-v5-pretrained-model")),
        "spec.pretrainedModel.name: Model 'yolo-v5-pretrained-model' is not defined",
    ),
    "no model reference": (lambda d: worker(d, "agg").pop("model"), "spec.aggregationWorker.model: is required"),
    "duplicate node": (_two_workers_on_edge1, "'edge1-node' is already the node of spec.trainingWorkers[0]"),
    "node differs from the dataset's": (
        lambda d: worker(d, 0)["template"]["spec"].update(nodeName="edge9-node"),
        "'edge9-node' differs from Dataset/coco-dataset-1 spec.nodeName 'edge1-node'",
    ),
    "unexpanded variable": (
        lambda d: worker(d, "agg")["template"]["spec"].update(nodeName="$CLOUD_NODE"),
        "'$CLOUD_NODE' looks like an unexpanded shell variable",
    ),
    "bad node name": (
        lambda d: [
            worker(d, 0)["template"]["spec"].update(nodeName="edge 1"),
            doc(d, "Dataset")["spec"].pop("nodeName"),
        ],
        "FederatedLearningJob/yolo-v5 spec.trainingWorkers[0].template.spec.nodeName: 'edge 1' is not a valid name",
    ),
    "duplicate document": (
        lambda d: d.append(copy.deepcopy(doc(d, "Dataset", "coco-dataset-1"))),
        "Dataset/coco-dataset-1 metadata.name: duplicate document: Dataset/coco-dataset-1 is already defined by"
        " document #1",
    ),
    "two jobs": (_second_job, "a second FederatedLearningJob"),
    "no job": (lambda d: d.remove(job(d)), "no FederatedLearningJob document"),
    "unknown sedna kind": (
        lambda d: d.append(
            {"apiVersion": "sedna.io/v1alpha1", "kind": "JointInferenceService", "metadata": {"name": "j"}}
        ),
        "JointInferenceService/j kind: 'JointInferenceService' is not supported",
    ),
    "wrong apiVersion": (
        lambda d: job(d).update(apiVersion="sedna.io/v1beta1"),
        "apiVersion: 'sedna.io/v1beta1' is not supported for FederatedLearningJob; expected sedna.io/v1alpha1",
    ),
    "missing kind": (lambda d: d[0].pop("kind"), "document #1 kind: is required"),
    "valueFrom": (
        lambda d: env_list(d, "agg").append({"name": "Epsilon", "valueFrom": {"secretKeyRef": {"name": "s"}}}),
        "env Epsilon: uses valueFrom",
    ),
    "conflicting env in one worker": (
        lambda d: env_list(d, "agg").append({"name": "EPOCHS", "value": "7"}),
        "env EPOCHS: '7' conflicts with epochs='100'",
    ),
    "trainers disagree on learning rate": (
        lambda d: set_env(d, 1, "learning_rate", "0.1"),
        "learning_rate: '0.1' disagrees with learning_rate='0.001'",
    ),
    "no training workers": (lambda d: job(d)["spec"].update(trainingWorkers=[]), "must list at least one training"),
    "unknown transmitter": (
        lambda d: job(d)["spec"].update(transmitter={"grpc": {}}),
        "spec.transmitter.grpc: is not a known transmitter (ws or s3)",
    ),
    "env is not a list": (
        lambda d: worker(d, 0)["template"]["spec"]["containers"][0].update(env={"epsilon": "1"}),
        "spec.trainingWorkers[0].template.spec.containers[0].env: (a mapping) must be a list",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_invalid_manifest(case: str):
    mutate, fragment = CASES[case]
    docs = load_docs()
    mutate(docs)
    message = error(docs)
    assert fragment in message, message


S3_CASES = {
    "missing secret": (
        lambda d: d.remove(doc(d, "Secret")),
        "spec.transmitter.s3.credentialName: Secret 'mysecret' is not defined in this file",
    ),
    "secret without a key": (
        lambda d: doc(d, "Secret")["stringData"].pop("SECRET_ACCESS_KEY"),
        "Secret/mysecret data: has no SECRET_ACCESS_KEY (in data or stringData)",
    ),
    "bad base64": (
        lambda d: doc(d, "Secret").update(stringData={"ACCESS_KEY_ID": "a"}, data={"SECRET_ACCESS_KEY": "%%%"}),
        "Secret/mysecret data.SECRET_ACCESS_KEY: is not valid base64",
    ),
    "bad aggDataPath": (
        lambda d: job(d)["spec"]["transmitter"]["s3"].update(aggDataPath="/local/path"),
        "spec.transmitter.s3.aggDataPath: '/local/path' must be an s3://bucket[/prefix] URL",
    ),
    "bad usehttps": (
        lambda d: doc(d, "Secret")["metadata"]["annotations"].update({"s3-usehttps": "maybe"}),
        "metadata.annotations.s3-usehttps: 'maybe' must be 1 or 0",
    ),
}


@pytest.mark.parametrize("case", list(S3_CASES))
def test_invalid_s3_manifest(case: str):
    mutate, fragment = S3_CASES[case]
    docs = load_docs(S3)
    mutate(docs)
    message = error(docs)
    assert fragment in message, message
