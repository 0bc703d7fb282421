"""Native job files, the JobSpec checks, describe(), the ``mistnet job validate`` command, and fuzzing."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.errors import SpecError
from common.jobspec import (
    EdgeSpec,
    JobSpec,
    JobSpecInvalid,
    ModelSpec,
    S3Spec,
    Thresholding,
    TransmitterSpec,
    auto_bits,
    build_job,
    load_job,
    load_job_file,
    max_cut,
    parse_job_text,
    registry_layer_count,
    to_native,
)
from mistnet.commands.job import effective_configuration as describe

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MNIST = EXAMPLES / "mnist-job.yaml"
COCO = EXAMPLES / "coco128-job.yaml"
SEDNA = EXAMPLES / "sedna" / "yolov5_coco128_mistnet.yaml"

MINIMAL = """\
name: tiny
model: {arch: lenet5}
cut_layer: 2
edges:
  - {node: edge-1, dataset: /data/1}
"""


def error(text: str, **kw) -> str:
    with pytest.raises(SpecError) as info:
        parse_job_text(text, "job.yaml", **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


# Native form --------------------------------------------------------------------------------------------


def test_minimal_native_job_takes_defaults():
    loaded = parse_job_text(MINIMAL, "job.yaml")
    assert loaded.form == "native" and loaded.warnings == []
    spec = loaded.spec
    assert spec == JobSpec(
        name="tiny", model=ModelSpec(arch="lenet5"), cut_layer=2, edges=[EdgeSpec(node="edge-1", dataset="/data/1")]
    )
    assert spec.privacy.epsilon == 100.0 and spec.transmitter.s3 is None


def test_mnist_example():
    spec = load_job(MNIST)
    assert spec.name == "mnist-demo" and spec.model.arch == "lenet5" and spec.cut_layer == 2
    assert [e.node for e in spec.edges] == ["edge-1", "edge-2"]
    assert spec.epsilon_for("edge-1") == 4.0 and spec.epsilon_for("edge-2") == 8.0
    assert spec.collect.min_edges == 2 and spec.collect.on_timeout == "fail"
    assert spec.cloud.validation == "runs/mnist/test.npz"


def test_native_coco_example_matches_the_sedna_example():
    native, sedna = load_job(COCO), load_job(SEDNA)
    assert native.model.model_copy(update={"image_size": 0}) == sedna.model
    assert native.cloud == sedna.cloud
    assert (native.name, native.cut_layer, native.privacy) == (sedna.name, sedna.cut_layer, sedna.privacy)
    assert [(e.node, e.dataset, e.batch_size) for e in native.edges] == [
        (e.node, e.dataset, e.batch_size) for e in sedna.edges
    ]
    assert [native.epsilon_for(e.node) for e in native.edges] == [sedna.epsilon_for(e.node) for e in sedna.edges]


def test_kind_and_api_version_are_optional_but_checked():
    assert parse_job_text("kind: MistNetJob\n" + MINIMAL).spec.name == "tiny"
    assert parse_job_text("apiVersion: mistnet/v1\n" + MINIMAL).spec.name == "tiny"
    assert "apiVersion: 'mistnet/v9' is not supported" in error("apiVersion: mistnet/v9\nkind: MistNetJob\n" + MINIMAL)


def test_to_native_round_trips():
    for path in (MNIST, COCO, EXAMPLES / "sedna" / "yolov5_coco128_mistnet_s3.yaml"):
        spec = load_job(path)
        assert parse_job_text(yaml.safe_dump(to_native(spec))).spec == spec


NATIVE_CASES = {
    "epsilon <= 0": (
        ("epsilon: 8 ", "epsilon: -3 "),
        "job.yaml:21: MistNetJob/mnist-demo edges[1].epsilon: -3 must be > 0",
    ),
    "epsilon not a number": (("epsilon: 4 ", "epsilon: abc "), "privacy.epsilon: 'abc' is not a number"),
    "epsilon infinite": (("epsilon: 4 ", "epsilon: .inf "), "privacy.epsilon: inf is not a finite number"),
    "cut out of range": (("cut_layer: 2 ", "cut_layer: 8 "), "cut_layer: 8 is out of range for lenet5: valid 1..7"),
    "unknown arch": (("arch: lenet5", "arch: resnet18"), "model.arch: unknown model arch 'resnet18'"),
    "misspelt field": (
        ("batch_size: 64\n  - node", "batchsize: 64\n  - node"),
        "edges[0].batchsize: is not a known field (did you mean 'batch_size'?)",
    ),
    "missing dataset": (("    dataset: runs/mnist/edge2.npz\n", ""), "edges[1].dataset: is required"),
    "duplicate node": (("node: edge-2", "node: edge-1"), "edges: duplicate node 'edge-1'"),
    "bad node name": (("node: edge-2", "node: edge/2"), "edges[1].node: 'edge/2' is not a valid name"),
    "min_edges": (("min_edges: 2", "min_edges: 3"), "collect.min_edges 3 exceeds the 2 edges"),
    "on_timeout": (
        ("on_timeout: fail", "on_timeout: wait"),
        "collect.on_timeout: 'wait' must be one of 'proceed' or 'fail'",
    ),
    "bad s3 url": (
        ("seed: 0", "transmitter: {s3: {bucket_path: /tmp/x}}"),
        "transmitter.s3.bucket_path: '/tmp/x' must be an s3://",
    ),
    "wrong kind": (("kind: MistNetJob", "kind: Job"), "kind: 'Job' is not a native job"),
    "bits without public images": (
        ("epsilon: 4 ", "epsilon: 4\n  bits: 2 "),
        "calibrated thresholds (and any privacy.bits above 1) need public images: set cloud.public",
    ),
    "calibrated without public images": (
        ("epsilon: 4 ", "epsilon: 4\n  thresholds: calibrated "),
        "need public images: set cloud.public",
    ),
    "unknown thresholds": (
        ("epsilon: 4 ", "epsilon: 4\n  thresholds: median "),
        "privacy.thresholds: 'median' must be one of",
    ),
    "duplicate key": (("seed: 0", "seed: 0\nseed: 1"), "job.yaml:34: duplicate key 'seed' (first at line 33)"),
}


@pytest.mark.parametrize("case", list(NATIVE_CASES))
def test_invalid_native_job(case: str):
    (old, new), fragment = NATIVE_CASES[case]
    text = MNIST.read_text()
    assert old in text
    message = error(text.replace(old, new, 1))
    assert fragment in message, message


def test_yolo_cut_is_limited_to_the_backbone():
    text = COCO.read_text()
    assert load_job(COCO).cut_layer == 4
    assert "cut_layer: 11 is out of range for yolov5s: valid 1..10" in error(
        text.replace("cut_layer: 4 ", "cut_layer: 11 ")
    )
    assert parse_job_text(text.replace("cut_layer: 4 ", "cut_layer: 10 ")).spec.cut_layer == 10
    assert "model.image_size: 600 must be a multiple of 32" in error(text.replace("image_size: 640", "image_size: 600"))


def test_yaml_syntax_error_names_file_and_line():
    message = error("name: x\nedges: [a, b\ncut_layer: 1\n")
    assert message.startswith("job.yaml:3:") and "YAML syntax error" in message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n---\n", "~\n"])
def test_empty_file(text: str):
    assert "job.yaml: the file is empty" in error(text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("- a\n- b\n", "document #1 is a list, not a mapping"),
        ("just words\n", "document #1 is a string, not a mapping"),
        ("a: 2001-13-45\n", "unreadable YAML value"),
        ("a: b\nc: \x1f\n", "job.yaml:2: YAML error: character #x001f is not allowed"),
        ("a: !!python/object:os.system {}\n", "YAML syntax error"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "job.yaml"),
    ],
)
def test_unusable_yaml(text: str, fragment: str):
    assert fragment in error(text)


def test_file_errors(tmp_path: Path):
    with pytest.raises(SpecError, match="no such job file"):
        load_job(tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match="is a directory"):
        load_job(tmp_path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(SpecError, match="not UTF-8"):
        load_job(bad)
    big = tmp_path / "big.yaml"
    big.write_text("#" * (2 * 1024 * 1024))
    with pytest.raises(SpecError, match="too large"):
        load_job(big)
    good = tmp_path / "job.yaml"
    good.write_text(MINIMAL)
    assert load_job_file(good).source == str(good)


# Spec checks with an injected layer count -----------------------------------------------------------------


def test_max_cut_with_an_injected_layer_count():
    assert max_cut("lenet5", lambda arch: 8) == 7
    assert max_cut("lenet5", lambda arch: 3) == 2
    assert max_cut("yolov5x", lambda arch: 25) == 10  # the backbone caps it, not n - 1
    assert max_cut("yolov5n", lambda arch: 6) == 5
    spec = parse_job_text(MINIMAL.replace("cut_layer: 2", "cut_layer: 11"), layer_count=lambda arch: 12).spec
    assert spec.cut_layer == 11
    assert "valid 1..4" in error(MINIMAL.replace("cut_layer: 2", "cut_layer: 5"), layer_count=lambda arch: 5)


def test_layer_count_from_the_registry_or_the_fallback_table(monkeypatch: pytest.MonkeyPatch):
    assert registry_layer_count("lenet5") == 8 and registry_layer_count("yolov5s") == 25
    monkeypatch.setitem(sys.modules, "common.models.registry", None)  # import now raises ImportError
    assert registry_layer_count("lenet5") == 8 and registry_layer_count("yolov5m") == 25
    with pytest.raises(SpecError, match="unknown model arch 'vgg16'"):
        registry_layer_count("vgg16")


def test_build_job_reports_issue_locations():
    data = yaml.safe_load(MINIMAL)
    data["edges"][0]["epsilon"] = 0
    data["cloud"] = {"epochs": -1}
    with pytest.raises(JobSpecInvalid) as info:
        build_job(data)
    assert {i.loc for i in info.value.issues} == {("edges", 0, "epsilon"), ("cloud", "epochs")}
    assert "edges[0].epsilon: 0 must be > 0" in str(info.value)
    with pytest.raises(JobSpecInvalid, match="must be a mapping"):
        build_job(["not", "a", "mapping"])


# describe --------------------------------------------------------------------------------------------------


def test_describe_gives_each_role_its_effective_configuration():
    config = describe(load_job(MNIST))
    assert config["job"] == "mnist-demo" and config["transmitter"] == {"kind": "mqtt"}
    cloud = config["cloud"]
    assert (cloud["epochs"], cloud["batch_size"], cloud["learning_rate"]) == (5, 64, 0.01)
    assert (cloud["validation"], cloud["output"], cloud["cut_layer"], cloud["model"]) == (
        "runs/mnist/test.npz",
        "runs/mnist/mistnet.safetensors",
        2,
        "lenet5",
    )
    edges = {e["node"]: e for e in config["edges"]}
    assert edges["edge-1"]["epsilon"] == 4.0 and edges["edge-1"]["epsilon_from"] == "job"
    assert edges["edge-2"]["epsilon"] == 8.0 and edges["edge-2"]["epsilon_from"] == "edge"
    assert abs(edges["edge-1"]["keep_probability"] - 0.880797) < 1e-6
    assert edges["edge-1"]["dataset"] == "runs/mnist/edge1.npz" and edges["edge-1"]["batch_size"] == 64
    json.dumps(config)


def test_describe_never_shows_secrets():
    spec = load_job(MNIST).model_copy(
        update={
            "transmitter": TransmitterSpec(
                s3=S3Spec(bucket_path="s3://b/p", access_key="AKIA-VISIBLE", secret_key="TOP-SECRET")
            )
        }
    )
    text = json.dumps(describe(spec))
    assert "TOP-SECRET" not in text and "AKIA-VISIBLE" not in text
    assert describe(spec)["transmitter"]["credentials"] == "from the job"
    message = error(MINIMAL + "transmitter: {s3: {bucket_path: s3://b/p, secret_key: 12345678}}\n")
    assert "transmitter.s3.secret_key: must be a string" in message and "12345678" not in message


# The CLI ----------------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "mistnet.cli", "job", "validate", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def test_cli_validate_good_file_prints_tables():
    result = _cli(str(SEDNA))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    for text in ("yolo-v5", "cloud-node", "edge1-node", "/data/2/COCO", "learning_rate", "0.001", "100"):
        assert text in result.stdout
    assert "warning: " in result.stderr and "assuming yolov5s" in result.stderr


def test_cli_validate_json():
    result = _cli(str(MNIST), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["form"] == "native" and out["cloud"]["epochs"] == 5 and len(out["edges"]) == 2


def test_cli_validate_bad_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SEDNA.read_text().replace('value: "mistnet"', 'value: "FedAvg"', 1))
    result = _cli(str(bad))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "aggregation_algorithm: 'FedAvg' is not supported" in lines[0]
    missing = _cli(str(tmp_path / "nope.yaml"))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr and "no such job file" in missing.stderr


# Fuzzing: nothing but SpecError ------------------------------------------------------------------------------

YAMLISH = st.lists(
    st.sampled_from(
        [
            *"abkn:-[]{},'\"&*!|>#%@`?\\ \t\n01.~$eE+",
            "\x00",
            "\x1f",
            "\ufeff",
            "é",
            "name",
            "kind",
            "---",
            "\n  ",
            ": ",
            "- ",
        ]
    ),
    max_size=80,
).map("".join)

WORDS = [
    "kind",
    "apiVersion",
    "metadata",
    "name",
    "spec",
    "url",
    "nodeName",
    "trainingWorkers",
    "aggregationWorker",
    "template",
    "containers",
    "env",
    "value",
    "dataset",
    "model",
    "transmitter",
    "s3",
    "ws",
    "aggDataPath",
    "credentialName",
    "pretrainedModel",
    "edges",
    "node",
    "cut_layer",
    "epsilon",
    "cloud",
    "privacy",
    "items",
    "FederatedLearningJob",
    "Dataset",
    "Model",
    "Secret",
    "List",
    "MistNetJob",
    "sedna.io/v1alpha1",
    "v1",
    "mistnet/v1",
    "stringData",
    "data",
    "ACCESS_KEY_ID",
    "annotations",
    "s3-endpoint",
    "yolov5s",
    "lenet5",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 50),
    st.floats(allow_nan=True),
    st.sampled_from(WORDS),
    st.text(max_size=8),
)
TREES = st.recursive(
    SCALARS,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.sampled_from(WORDS), kids, max_size=5)),
    max_leaves=40,
)


def _must_only_raise_spec_error(text: str) -> None:
    try:
        parse_job_text(text, "fuzz.yaml")
    except SpecError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(YAMLISH)
def test_random_yamlish_text_raises_only_spec_error(text: str):
    _must_only_raise_spec_error(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(TREES, min_size=1, max_size=3))
def test_random_documents_raise_only_spec_error(docs: list):
    _must_only_raise_spec_error(yaml.safe_dump_all(docs))


SEDNA_DOCS = [d for d in yaml.safe_load_all(SEDNA.read_text()) if d is not None]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_reference_example_raises_only_spec_error(data: st.DataObject):
    docs = copy.deepcopy(SEDNA_DOCS)
    for _ in range(data.draw(st.integers(1, 4))):
        node = data.draw(st.sampled_from(docs))
        while True:  # walk down to a random container, then replace one of its entries
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = data.draw(st.sampled_from(keys))
            child = node[key]
            if isinstance(child, dict | list) and child and data.draw(st.booleans()):
                node = child
                continue
            node[key] = data.draw(TREES)
            break
    _must_only_raise_spec_error(yaml.safe_dump_all(docs))


def test_public_images_turn_calibration_on_unless_zero_is_asked_for():
    base = parse_job_text(MNIST.read_text(), "job.yaml").spec
    assert not base.calibrated and base.cloud.adapt.decoder
    with_public = base.model_copy(update={"cloud": base.cloud.model_copy(update={"public": "pub/"})})
    assert with_public.calibrated
    zero = with_public.model_copy(
        update={"privacy": with_public.privacy.model_copy(update={"thresholds": Thresholding.ZERO})}
    )
    assert not zero.calibrated


def _with(spec: JobSpec, *, public: str | None = None, edge_eps: float | None = None, **privacy: object) -> JobSpec:
    edges = [spec.edges[0], EdgeSpec(node="edge-2", dataset="/data/2", epsilon=edge_eps)]
    return spec.model_copy(update={
        "cloud": spec.cloud.model_copy(update={"public": public}),
        "privacy": spec.privacy.model_copy(update=privacy),
        "edges": edges,
    })  # fmt: skip


def test_auto_bits_follow_the_smallest_edge_epsilon_when_thresholds_are_calibrated():
    base = parse_job_text(MINIMAL, "job.yaml").spec
    assert base.privacy.bits == "auto" and base.bits == 1  # no public images: no thresholds for more levels
    assert _with(base, public="pub/").bits == 4  # both edges at the job's ε 100
    assert _with(base, public="pub/", edge_eps=8).bits == 2
    assert _with(base, public="pub/", edge_eps=4).bits == 1
    assert _with(base, public="pub/", thresholds=Thresholding.ZERO).bits == 1
    assert _with(base, public="pub/", edge_eps=4, bits=4).bits == 4  # asked for: as asked


@pytest.mark.parametrize("bits", [2, 4])
def test_auto_bits_replace_no_more_levels_than_one_bit_at_the_reference_epsilon(bits: int):
    from common import constants as C
    from common.mechanism import flip_probability

    reference = flip_probability(C.AUTO_BITS_EPSILON, 2)
    at = next(e / 100 for e in range(100, 2000) if auto_bits(e / 100) >= bits)  # the smallest ε, 0.01 apart
    assert flip_probability(at, 2**bits) <= reference < flip_probability(at - 0.01, 2**bits)


def test_a_job_file_asks_for_auto_or_a_number_of_bits():
    assert parse_job_text(MINIMAL + "privacy: {bits: auto}\n", "job.yaml").spec.privacy.bits == "auto"
    assert "privacy.bits" in error(MINIMAL + "privacy: {bits: many}\n")
    assert "privacy.bits" in error(MINIMAL + "privacy: {bits: 9}\n")
