"""End to end over a real mosquitto: two edge processes and a cloud process, MNIST digits."""

import json
import signal
import subprocess
import sys

import pytest

from tests.agents import committed_transfers, finish, mnist_job, spool_query, start_cloud, start_edge, wait_for

pytestmark = pytest.mark.integration


def test_two_edge_job_completes_with_held_out_accuracy(tmp_path, mosquitto):
    job = mnist_job(tmp_path, epochs=3)
    edges = [start_edge(f"edge{k}", mosquitto.url, tmp_path) for k in (1, 2)]
    cloud = start_cloud(job, mosquitto.url, tmp_path / "cloud")
    summary = json.loads(finish(cloud, 180))
    assert cloud.returncode == 0, (tmp_path / "cloud-cloud.log").read_text()[-3000:]
    for e in edges:
        assert e.wait(30) == 0
    assert summary["phase"] == "done"
    assert set(summary["edges"]) == {"edge1", "edge2"}
    assert all(e["samples"] == 1500 for e in summary["edges"].values())
    assert summary["metrics"]["accuracy"] >= 0.85
    per_sample = summary["edges"]["edge1"]["wire_bytes"] / 1500
    assert 147 <= per_sample < 147 * 1.15  # ceil(6*14*14/8) bytes of bits plus framing, never floats
    assert (tmp_path / "mnist-demo.safetensors").stat().st_size > 0
    ids = spool_query(
        tmp_path / "cloud",
        "SELECT node, COUNT(*), COUNT(DISTINCT id), MIN(id), MAX(id) FROM samples GROUP BY node ORDER BY node",
    )
    assert ids == [("edge1", 1500, 1500, 0, 1499), ("edge2", 1500, 1500, 0, 1499)]


def test_killed_edge_resumes_after_last_acknowledged_transfer(tmp_path, mosquitto):
    job = mnist_job(tmp_path, epochs=1)
    cloud = start_cloud(job, mosquitto.url, tmp_path / "cloud")
    edge2 = start_edge("edge2", mosquitto.url, tmp_path)
    slow = start_edge("edge1", mosquitto.url, tmp_path, "--rate-limit", "40000")
    wait_for(lambda: committed_transfers(tmp_path / "cloud", "edge1") >= 5, 60, "edge1 to deliver 5 transfers")
    slow.send_signal(signal.SIGKILL)
    slow.wait()
    before = committed_transfers(tmp_path / "cloud", "edge1")
    assert before < 24, "edge1 finished before it could be killed"
    restarted = start_edge("edge1", mosquitto.url, tmp_path)
    summary = json.loads(finish(cloud, 180))
    assert restarted.wait(30) == 0 and edge2.wait(30) == 0
    assert summary["phase"] == "done" and summary["edges"]["edge1"]["samples"] == 1500
    rows = spool_query(tmp_path / "cloud", "SELECT COUNT(*), COUNT(DISTINCT id) FROM samples WHERE node='edge1'")
    assert rows == [(1500, 1500)]
    log = (tmp_path / "edge1.log").read_text()
    resumed = [line for line in log.splitlines() if "already committed" in line][-1]
    already = int(resumed.split(",")[-1].split()[0])
    assert already >= before, resumed


def test_cancel_stops_cloud_and_edges(tmp_path, mosquitto):
    job = mnist_job(tmp_path, epochs=1)
    cloud = start_cloud(job, mosquitto.url, tmp_path / "cloud")
    slow = start_edge("edge1", mosquitto.url, tmp_path, "--rate-limit", "5000")
    wait_for(lambda: committed_transfers(tmp_path / "cloud", "edge1") >= 2, 60, "edge1 to start delivering")
    cancel = subprocess.run([sys.executable, "-m", "mistnet.cli", "job", "cancel", str(job), "--broker", mosquitto.url,
                             "--reason", "test says stop"], capture_output=True, text=True, timeout=60)
    assert cancel.returncode == 0, cancel.stderr
    assert "cancelled" in cancel.stdout
    summary = json.loads(finish(cloud, 60))
    assert summary["phase"] == "cancelled" and cloud.returncode == 1
    assert slow.wait(30) == 0
    assert committed_transfers(tmp_path / "cloud", "edge1") < 24
    assert "cancelled" in (tmp_path / "edge1.log").read_text()


def test_monitor_json_streams_status_objects(tmp_path, mosquitto):
    job = mnist_job(tmp_path, epochs=1)
    monitor = subprocess.Popen([sys.executable, "-m", "mistnet.cli", "monitor", "--job", "mnist-demo", "--json",
                                "--broker", mosquitto.url, "--timeout", "120"], stdout=subprocess.PIPE, text=True)
    edges = [start_edge(f"edge{k}", mosquitto.url, tmp_path) for k in (1, 2)]
    cloud = start_cloud(job, mosquitto.url, tmp_path / "cloud")
    finish(cloud, 180)
    out, _ = monitor.communicate(timeout=30)
    for e in edges:
        e.wait(30)
    lines = [json.loads(line) for line in out.splitlines()]
    phases = [m["phase"] for m in lines if "phase" in m]
    node_states = {m["state"] for m in lines if "node" in m}
    assert phases[-1] == "done" and "training" in phases and "collecting" in phases
    assert {"extracting", "done"} <= node_states
    assert monitor.returncode == 0
