"""Prometheus metrics: status messages become metrics, and a short MNIST job's scraped metrics agree
with its summary (edges as CLI processes with only what the edge image holds, over a real mosquitto)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from broker.launcher import free_port
from cloud_agent.agent import CloudAgent
from cloud_agent.report import read_spool
from common import metrics
from common.datasets.mnist import load_mnist_5k
from common.jobspec import load_job
from common.protocol import EdgeProgress, JobPhase, JobStatus, NodeState, NodeStatus
from common.transport import BrokerOptions
from mistnet.cli import main as mistnet_main
from tests.test_deploy import edge_image_env

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, metric: str, **labels: str) -> float | None:
    return samples.get((metric, frozenset(labels.items())))


def test_node_status_totals_become_counters_per_job():
    registry = CollectorRegistry()
    m = metrics.Metrics(registry)
    get = registry.get_sample_value
    status = NodeStatus(node="e1", state=NodeState.EXTRACTING, job="j", extracted=64, wire_bytes=1000)
    m.observe_node(status, Counter({"topic": 1}))
    m.observe_node(status.model_copy(update={"extracted": 128, "acked": 64, "wire_bytes": 2500, "resent_chunks": 2}))
    m.observe_node(status.model_copy(update={"extracted": 128, "acked": 128, "skipped": 1, "state": NodeState.DONE}),
                   Counter({"topic": 3, "ack": 1}))
    assert get("mistnet_samples_extracted_total", {"node": "e1"}) == 128
    assert get("mistnet_samples_sent_total", {"node": "e1"}) == 128
    assert get("mistnet_samples_skipped_total", {"node": "e1"}) == 1
    assert get("mistnet_wire_bytes_total", {"node": "e1", "direction": "sent"}) == 2500
    assert get("mistnet_chunks_resent_total", {"node": "e1"}) == 2
    assert get("mistnet_messages_rejected_total", {"reason": "topic"}) == 3
    assert get("mistnet_messages_rejected_total", {"reason": "ack"}) == 1
    assert get("mistnet_node_state", {"node": "e1", "state": "done"}) == 1
    assert get("mistnet_node_state", {"node": "e1", "state": "extracting"}) == 0
    # The next job's totals start from zero and add up; an idle status (no job) counts nothing.
    m.observe_node(NodeStatus(node="e1", state=NodeState.EXTRACTING, job="k", extracted=10))
    m.observe_node(NodeStatus(node="e1", state=NodeState.ONLINE))
    assert get("mistnet_samples_extracted_total", {"node": "e1"}) == 138
    assert get("mistnet_node_state", {"node": "e1", "state": "online"}) == 1


def test_job_status_sets_phase_epoch_loss_metrics_and_per_edge_counters():
    registry = CollectorRegistry()
    m = metrics.Metrics(registry)
    get = registry.get_sample_value
    edges = {"e1": EdgeProgress(samples=64, wire_bytes=9000), "e2": EdgeProgress(samples=0)}
    m.observe_job(JobStatus(job="j", phase=JobPhase.COLLECTING, edges=edges, epochs=3))
    assert get("mistnet_phase", {"phase": "collecting"}) == 1 and get("mistnet_phase", {"phase": "done"}) == 0
    edges = {"e1": EdgeProgress(samples=100, wire_bytes=14000), "e2": EdgeProgress(samples=50, wire_bytes=7000)}
    m.observe_job(JobStatus(job="j", phase=JobPhase.TRAINING, edges=edges, epoch=2, epochs=3, loss=0.25,
                            metrics={"accuracy": 0.9, "accuracy_before": 0.5}), Counter({"features": 2}))
    assert get("mistnet_samples_received_total", {"node": "e1"}) == 100
    assert get("mistnet_samples_received_total", {"node": "e2"}) == 50
    assert get("mistnet_wire_bytes_total", {"node": "e1", "direction": "received"}) == 14000
    assert get("mistnet_epoch") == 2 and get("mistnet_epochs") == 3 and get("mistnet_loss") == 0.25
    assert get("mistnet_metric", {"name": "accuracy"}) == 0.9
    assert get("mistnet_metric", {"name": "accuracy_before"}) == 0.5
    assert get("mistnet_messages_rejected_total", {"reason": "features"}) == 2
    assert get("mistnet_phase", {"phase": "training"}) == 1 and get("mistnet_phase", {"phase": "collecting"}) == 0


def test_metrics_server_serves_and_health_check_reports():
    registry = CollectorRegistry()
    metrics.Metrics(registry).observe_node(NodeStatus(node="e9", state=NodeState.ONLINE))
    server = metrics.start_metrics_server(0, "127.0.0.1", registry)
    try:
        assert value(scrape(server.url), "mistnet_node_state", node="e9", state="online") == 1
        assert metrics.check(server.port) == (True, f"{server.url} ok")
        with pytest.raises(metrics.MetricsError, match="cannot serve metrics"):
            metrics.start_metrics_server(server.port, "127.0.0.1", registry)
    finally:
        server.stop()
    ok, message = metrics.check(server.port)
    assert not ok and str(server.port) in message


def small_mnist_job(root: Path, nodes: dict[str, int], epochs: int = 2) -> Path:
    """Two small MNIST shards, a held-out set and a native job (LeNet-5 from scratch: no pretraining)."""
    images, labels = load_mnist_5k()
    order = np.random.default_rng(7).permutation(len(images))
    start, edges = 0, []
    root.mkdir(parents=True, exist_ok=True)
    for node, count in [*nodes.items(), ("test", 128)]:
        idx = order[start : start + count]
        start += count
        np.savez(root / f"{node}.npz", images=images[idx], labels=labels[idx], source_index=idx)
        if node != "test":
            edges.append({"node": node, "dataset": str(root / f"{node}.npz"), "batch_size": 64})
    job = {
        "kind": "MistNetJob",
        "name": "metrics-job",
        "model": {"arch": "lenet5", "num_classes": 10},
        "cut_layer": 2,
        "privacy": {"epsilon": 8},
        "edges": edges,
        "cloud": {"epochs": epochs, "batch_size": 64, "learning_rate": 0.05,
                  "validation": str(root / "test.npz"), "output": str(root / "model.safetensors")},
        "collect": {"timeout_s": 90, "min_edges": 2, "on_timeout": "fail"},
    }
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.mark.integration
def test_scraped_metrics_match_the_job_summary_and_report(tmp_path, mosquitto, capsys):
    nodes = {"m-edge1": 192, "m-edge2": 128}
    job = small_mnist_job(tmp_path / "data", nodes)
    ports = {node: free_port() for node in nodes}
    env = edge_image_env(tmp_path)  # the edges import only what the edge image has
    logs = {node: (tmp_path / f"{node}.log").open("wb") for node in nodes}
    edges = {
        node: subprocess.Popen(
            [sys.executable, "-m", "mistnet.cli", "edge", "--node", node, "--broker", mosquitto.url,
             "--metrics-port", str(ports[node])],
            env=env, stdout=logs[node], stderr=logs[node],
        )
        for node in nodes
    }
    server = metrics.serve(free_port())  # what `mistnet cloud --metrics-port` starts
    assert server is not None
    workdir = tmp_path / "cloud"
    try:
        summary = CloudAgent(load_job(job), BrokerOptions(url=mosquitto.url), workdir).run()
        cloud = scrape(server.url)
        edge = {}
        for node, port in ports.items():
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                edge[node] = scrape(f"http://127.0.0.1:{port}/metrics")
                if value(edge[node], "mistnet_node_state", node=node, state="done") == 1:
                    break
                time.sleep(0.2)
        check = subprocess.run([sys.executable, "-m", "common.metrics", "check", "--port", str(ports["m-edge1"])],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
    finally:
        server.stop()
        for process in edges.values():
            process.send_signal(signal.SIGINT)  # the containers' STOPSIGNAL
        codes = [process.wait(60) for process in edges.values()]
        for log in logs.values():
            log.close()
    logs_text = [(tmp_path / f"{n}.log").read_text() for n in nodes]
    assert codes == [130, 130], [t[-2000:] for t in logs_text]  # `mistnet` on SIGINT: "interrupted"
    assert all(f"edge {n} stops" in t for n, t in zip(nodes, logs_text, strict=True))

    assert summary.phase == JobPhase.DONE
    assert value(cloud, "mistnet_phase", phase="done") == 1
    assert value(cloud, "mistnet_phase", phase="training") == 0
    assert value(cloud, "mistnet_epoch") == value(cloud, "mistnet_epochs") == 2
    assert value(cloud, "mistnet_metric", name="accuracy") == pytest.approx(summary.metrics["accuracy"])
    assert value(cloud, "mistnet_metric", name="accuracy_before") == pytest.approx(summary.metrics["accuracy_before"])
    history = json.loads(read_spool(workdir)[0]["history"])
    assert value(cloud, "mistnet_loss") == pytest.approx(sum(history[-1]["losses"].values()))
    for node, count in nodes.items():
        got = summary.edges[node]
        assert got.samples == count
        assert value(cloud, "mistnet_samples_received_total", node=node) == count
        assert value(cloud, "mistnet_wire_bytes_total", node=node, direction="received") == got.wire_bytes
        assert value(edge[node], "mistnet_node_state", node=node, state="done") == 1
        assert value(edge[node], "mistnet_samples_extracted_total", node=node) == count
        assert value(edge[node], "mistnet_samples_sent_total", node=node) == count
        assert value(edge[node], "mistnet_samples_skipped_total", node=node) == 0
        sent = value(edge[node], "mistnet_wire_bytes_total", node=node, direction="sent")
        if value(edge[node], "mistnet_chunks_resent_total", node=node) == 0:
            assert sent == got.wire_bytes
        else:  # a retransmission on a loaded machine: the cloud stores each chunk once
            assert sent is not None and sent > got.wire_bytes
    assert (workdir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (workdir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()
    assert mistnet_main(["report", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "job metrics-job: done" in out and "m-edge1: 192 of 192 samples" in out
    report = (workdir / "report.md").read_text()
    assert "| m-edge2 | 128 | 0 | 128 |" in report and "![loss](loss.png)" in report
    assert f"| accuracy | {summary.metrics['accuracy_before']:.4f} | {summary.metrics['accuracy']:.4f} |" in report
