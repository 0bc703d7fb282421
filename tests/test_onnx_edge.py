"""The torch-free edge: the cloud's ONNX head, checked by the edge before it runs, and an onnx edge
beside a torch edge in one job over a real mosquitto, sending the same bits for the same data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cloud_agent.export import export_head
from common.errors import ProtocolError
from common.jobspec import HeadStatistics, load_job
from common.models.registry import build
from common.onnx_check import ALLOWED_OPS, check_onnx_head
from common.protocol import FeatureLayout
from mistnet.demo import write_job
from tests.agents import finish, mnist_job, spooled_samples, start_cloud, start_edge, without

LENET_INPUT = [1, 28, 28]
# What a device without torch lacks; the onnx edge below runs with these imports failing.
NO_TORCH = {"torch", "torchvision", "safetensors", "onnx", "matplotlib", "skimage", "pycocotools", "mlxtend", "amqtt"}


@pytest.fixture(scope="module")
def lenet_head() -> tuple[bytes, list[FeatureLayout]]:
    return export_head(build("lenet5", 10), 2, LENET_INPUT)


def test_the_exported_head_passes_the_edge_check(lenet_head):
    blob, outputs = lenet_head
    assert [f.layer for f in outputs] == [1] and outputs[0].shape == [6, 14, 14]
    check_onnx_head(blob, LENET_INPUT, outputs)


def test_shapes_other_than_the_jobs_are_refused(lenet_head):
    blob, outputs = lenet_head
    with pytest.raises(ProtocolError, match="inputs"):
        check_onnx_head(blob, [3, 28, 28], outputs)
    with pytest.raises(ProtocolError, match="outputs"):
        check_onnx_head(blob, LENET_INPUT, [FeatureLayout(layer=1, shape=[6, 7, 7])])
    with pytest.raises(ProtocolError, match="outputs"):
        check_onnx_head(blob, LENET_INPUT, [FeatureLayout(layer=2, shape=[6, 14, 14])])


def rewritten(blob: bytes, edit) -> bytes:
    import onnx

    model = onnx.load_from_string(blob)
    edit(model)
    return model.SerializeToString()


def test_custom_operators_external_data_and_damage_are_refused(lenet_head):
    import onnx
    from onnx.external_data_helper import set_external_data

    blob, outputs = lenet_head

    def custom_op(model):
        model.graph.node[0].domain = "com.example"
        model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))

    def unlisted_op(model):
        model.graph.node.append(onnx.helper.make_node("Loop", ["a"], ["b"]))

    def external(model):
        set_external_data(model.graph.initializer[0], location="../../etc/passwd")
        model.graph.initializer[0].data_location = onnx.TensorProto.EXTERNAL

    with pytest.raises(ProtocolError, match="custom"):
        check_onnx_head(rewritten(blob, custom_op), LENET_INPUT, outputs)
    with pytest.raises(ProtocolError, match="'Loop' is not allowed"):
        check_onnx_head(rewritten(blob, unlisted_op), LENET_INPUT, outputs)
    with pytest.raises(ProtocolError, match="external data"):
        check_onnx_head(rewritten(blob, external), LENET_INPUT, outputs)
    with pytest.raises(ProtocolError, match="ONNX head"):
        check_onnx_head(blob[: len(blob) // 2], LENET_INPUT, outputs)
    with pytest.raises(ProtocolError, match="ONNX head"):
        check_onnx_head(b"\x08\x07not a model at all", LENET_INPUT, outputs)
    assert "Loop" not in ALLOWED_OPS and "If" not in ALLOWED_OPS


@pytest.mark.integration
def test_onnx_and_torch_edges_send_the_same_bits_for_the_same_data(tmp_path, mosquitto):
    """One job, two edges reading the same shard: edge1 with ONNX Runtime in a process that cannot
    import torch, edge2 with torch. At ε=100 randomized response (practically) never flips a bit,
    so what each sent is its head's levels, and they agree. The job keeps the pretrained statistics:
    an onnx edge runs the cloud's folded head and cannot re-estimate them (it says so)."""
    job = mnist_job(tmp_path, epochs=1)
    spec = load_job(job)
    model = spec.model.model_copy(update={"head_statistics": HeadStatistics.PRETRAINED})
    write_job(spec.model_copy(update={"model": model}), job)
    data = tmp_path / "data" / "edge1.npz"
    onnx_edge = start_edge("edge1", mosquitto.url, tmp_path, "--runtime", "onnx", "--data", str(data),
                           env=without(tmp_path, NO_TORCH, "is not installed on this edge"))
    torch_edge = start_edge("edge2", mosquitto.url, tmp_path, "--runtime", "torch", "--data", str(data))
    cloud = start_cloud(job, mosquitto.url, tmp_path / "cloud")
    summary = json.loads(finish(cloud, 240))
    assert cloud.returncode == 0, (tmp_path / "cloud-cloud.log").read_text()[-3000:]
    assert onnx_edge.wait(30) == 0 and torch_edge.wait(30) == 0
    assert summary["phase"] == "done"
    assert {n: e["samples"] for n, e in summary["edges"].items()} == {"edge1": 1500, "edge2": 1500}
    assert "onnx runtime" in (tmp_path / "edge1.log").read_text()
    rows = spooled_samples(tmp_path / "cloud")
    sent = {n: np.frombuffer(b"".join(f for node, _, _, f in rows if node == n), np.uint8) for n in ("edge1", "edge2")}
    assert len(sent["edge1"]) == len(sent["edge2"]) == 1500 * 6 * 14 * 14 // 8
    differ = np.unpackbits(sent["edge1"] ^ sent["edge2"]).mean()
    assert differ < 1e-3, differ


def onnx_assignment(blob: bytes, outputs: list[FeatureLayout], dataset: str, epsilon: float = 100.0):
    """A LeNet job for edge1 whose ONNX head is ``blob`` (weights not read by an onnx edge), and the
    graph's chunks as the cloud publishes them."""
    from common.heads import head_chunks
    from common.protocol import JobAssignment, ModelRef, OnnxHead, PrivacyParams

    weights, _ = head_chunks("j", b"unused by an onnx edge", 1024)
    manifest, parts = head_chunks("j", blob, 1024)
    job = JobAssignment(job="j", node="edge1", model=ModelRef(arch="lenet5", num_classes=10, cut_layer=2),
                        privacy=PrivacyParams(epsilon=epsilon), dataset=dataset, batch_size=64, head=weights,
                        onnx=OnnxHead(manifest=manifest, input_shape=LENET_INPUT, outputs=outputs))
    return job, parts


def deliver(edge, job, parts) -> None:
    """The assignment and every chunk of its graph, as the broker hands them to the edge."""
    from common.protocol import Topics, encode_head_chunk, to_json
    from common.transport import Inbound

    edge.link.publish = lambda *args, **kw: None
    edge.dispatch(Inbound(Topics.job_assignment("edge1", "j"), to_json(job), retain=True))
    for part in parts:
        edge.dispatch(Inbound(Topics.onnx_chunk("edge1", "j", part.seq), encode_head_chunk(part), retain=True))


def test_an_edge_refuses_a_head_with_custom_operators_and_says_so(tmp_path, lenet_head, caplog):
    """The whole path of an assignment: chunks joined and digest-checked, then the graph refused
    before ONNX Runtime loads it; the job ends in the edge's ``error`` status."""
    import onnx

    from common.datasets.mnist import prepare_mnist
    from common.protocol import NodeState, Topics, to_json
    from common.transport import BrokerOptions, Inbound
    from edge_agent.agent import EdgeAgent

    blob, outputs = lenet_head

    def custom_op(model):
        model.graph.node[0].domain = "com.example"
        model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))

    shard = prepare_mnist(tmp_path / "mnist", edges=1).edges[0]
    job, parts = onnx_assignment(rewritten(blob, custom_op), outputs, str(shard))
    edge = EdgeAgent("edge1", BrokerOptions(), runtime="onnx")
    edge.link.publish = lambda *args, **kw: None  # type: ignore[method-assign]
    edge.dispatch(Inbound(Topics.job_assignment("edge1", "j"), to_json(job), retain=True))
    assert edge.next_runnable() is None  # no chunk of the graph yet (the weights' topic is not read)
    deliver(edge, job, parts)
    assert edge.next_runnable() == job
    edge.run_job(job)
    assert edge.last_status.state == NodeState.ERROR
    assert "ONNX head: custom operator set 'com.example' is not allowed" in caplog.text
    assert "com.example" not in edge.last_status.message  # the details stay in the edge's log


def test_an_onnx_edge_applies_its_policy_before_anything_runs(tmp_path, lenet_head):
    """A valid graph, fully delivered, for a job above the edge's ε limit: refused with the reason,
    nothing to run, the (absent) data never touched."""
    from common.policy import EdgePolicy
    from common.protocol import NodeState
    from common.transport import BrokerOptions
    from edge_agent.agent import EdgeAgent

    blob, outputs = lenet_head
    job, parts = onnx_assignment(blob, outputs, str(tmp_path / "absent.npz"))
    edge = EdgeAgent("edge1", BrokerOptions(), runtime="onnx", policy=EdgePolicy(max_epsilon=4))
    deliver(edge, job, parts)
    assert edge.next_runnable() is None
    assert edge.last_status.state == NodeState.REFUSED and edge.last_status.job == "j"
    assert edge.last_status.message == "epsilon 100 exceeds this edge's limit 4"
    allowed, parts = onnx_assignment(blob, outputs, str(tmp_path / "absent.npz"), epsilon=4.0)
    deliver(edge, allowed, parts)
    assert edge.next_runnable() == allowed  # the same head within the limit would run


def test_an_onnx_edge_asked_for_local_statistics_says_it_keeps_the_pretrained_ones(tmp_path, lenet_head, caplog):
    """The folded graph has no BatchNorm left to re-estimate: the edge extracts anyway and says why
    its features come from the pretrained statistics."""
    from common.datasets.mnist import MnistShard, prepare_mnist
    from common.jobspec import HeadStatistics
    from common.privacy import BitEncoder
    from edge_agent.runtime import make_extractor

    blob, outputs = lenet_head
    shard = prepare_mnist(tmp_path / "mnist", edges=1).edges[0]
    job, _ = onnx_assignment(blob, outputs, str(shard))
    local = job.model_copy(update={"model": job.model.model_copy(update={"head_statistics": HeadStatistics.LOCAL})})
    for assignment in (job, local):
        make_extractor("onnx", assignment, blob, BitEncoder(100.0), MnistShard(shard), "cpu").extract(0)
    assert caplog.text.count("the onnx runtime runs the cloud's folded head") == 1
