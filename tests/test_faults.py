"""Crash, restart and outage with real agent processes and a real mosquitto: nothing lost, nothing twice.

Each test prints what it measured (resume times, chunks and bytes resent); run with ``-s`` to see.
"""

from __future__ import annotations

import json
import time

import pytest

from broker.launcher import local_mosquitto
from common import constants as C
from tests.agents import committed_transfers, finish, spool_query, start_cloud, start_edge, wait_for
from tests.harness import job_status, log_numbers, mnist_base, node_status, single_thread, stop, wait_log, write_job

pytestmark = [pytest.mark.integration, pytest.mark.fault]
__all__ = ["single_thread"]

NODES = ("edge1", "edge2")
WINDOW = C.DEFAULT_WINDOW_CHUNKS  # what an edge may have unacknowledged


@pytest.fixture
def base(tmp_path_factory):
    return mnist_base(tmp_path_factory)


def committed(workdir) -> int:
    return sum(committed_transfers(workdir, n) for n in NODES)


def epochs_done(workdir) -> int:
    rows = spool_query(workdir, "SELECT value FROM meta WHERE key='history'")
    return len(json.loads(rows[0][0])) if rows else 0  # type: ignore[arg-type]


def assert_exactly_once(workdir, per_edge: int = 1500) -> None:
    rows = spool_query(
        workdir, "SELECT node, COUNT(*), COUNT(DISTINCT id), MIN(id), MAX(id) FROM samples GROUP BY node ORDER BY node"
    )
    assert rows == [(n, per_edge, per_edge, 0, per_edge - 1) for n in NODES]


def test_cloud_killed_while_collecting_and_while_training(tmp_path, mosquitto, base):
    epochs = 8
    job = write_job(base, tmp_path / "job.yaml", epochs=epochs)
    workdir, cloud_log = tmp_path / "cloud", tmp_path / "cloud-cloud.log"
    rate = ("--rate-limit", "40000")  # ~6 s per edge: the kill lands mid-transfer
    cloud = start_cloud(job, mosquitto.url, workdir)
    edge1 = start_edge("edge1", mosquitto.url, tmp_path, *rate)
    edge2 = start_edge("edge2", mosquitto.url, tmp_path, *rate)
    procs = [cloud, edge1, edge2]
    try:
        # 1. kill -9 the cloud while it collects; edge1 dies too while the cloud is down
        wait_for(lambda: min(committed_transfers(workdir, n) for n in NODES) >= 4, 90, "4 transfers per edge")
        cloud.kill()
        cloud.wait()
        at_kill = {n: committed_transfers(workdir, n) for n in NODES}
        assert max(at_kill.values()) < 24, "an edge finished before the cloud could be killed"
        time.sleep(1.0)
        edge1.kill()
        edge1.wait()
        t0 = time.monotonic()
        cloud = start_cloud(job, mosquitto.url, workdir)
        edge1 = start_edge("edge1", mosquitto.url, tmp_path, *rate)
        procs += [cloud, edge1]
        wait_for(lambda: committed(workdir) > sum(at_kill.values()), 60, "the restarted cloud to commit more")
        resume_collect_s = time.monotonic() - t0

        # 2. kill -9 the cloud while it trains, after at least one completed epoch
        wait_for(lambda: epochs_done(workdir) >= 2, 180, "two training epochs")
        cloud.kill()
        cloud.wait()
        k = epochs_done(workdir)
        assert 0 < k < epochs, "training finished before the cloud could be killed"
        t0 = time.monotonic()
        cloud = start_cloud(job, mosquitto.url, workdir)
        procs.append(cloud)
        resume_train_s = wait_log(cloud_log, "resumed training after epoch", 90)
        summary = json.loads(finish(cloud, 180))
        total_train_s = time.monotonic() - t0
        assert cloud.returncode == 0, cloud_log.read_text()[-3000:]
        assert edge1.wait(30) == 0 and edge2.wait(30) == 0
    finally:
        stop(procs)

    resumed_at = log_numbers(cloud_log, r"resumed training after epoch (\d+)")
    assert resumed_at and resumed_at[-1] >= k, f"resumed after {resumed_at}, killed after {k}"
    assert epochs_done(workdir) == epochs
    assert summary["phase"] == "done"
    assert {n: e["samples"] for n, e in summary["edges"].items()} == {"edge1": 1500, "edge2": 1500}
    assert_exactly_once(workdir)
    # the restarted edge skipped everything the cloud had stored; the surviving one resent only its window
    already = log_numbers(tmp_path / "edge1.log", r"(\d+) already committed")
    assert already[-1] >= at_kill["edge1"], already
    status = {n: node_status(mosquitto.url, n) for n in NODES}
    assert status["edge2"]["resent_chunks"] <= 2 * WINDOW, status["edge2"]
    duplicates = [line for line in cloud_log.read_text().splitlines() if "duplicate chunks" in line][-1]
    print(
        f"\n[fault] cloud kill while collecting: committed at kill {at_kill}; restarted cloud committed again "
        f"after {resume_collect_s:.1f} s (process start included); restarted edge1 skipped {already[-1]} "
        f"committed transfers; edge2 (survived) resent {status['edge2']['resent_chunks']} chunks = "
        f"{status['edge2']['resent_bytes']} bytes of {status['edge2']['wire_bytes']} sent; edge1 (2nd run) resent "
        f"{status['edge1']['resent_chunks']} chunks = {status['edge1']['resent_bytes']} bytes"
        f"\n[fault] cloud kill while training after epoch {k}: resumed after epoch {resumed_at[-1]} "
        f"{resume_train_s:.1f} s after the restart; restart to done {total_train_s:.1f} s; "
        f"accuracy {summary['metrics'].get('accuracy')}; last cloud: {duplicates.split('collected: ')[-1]}"
    )


def test_broker_restart_mid_transfer(tmp_path, base):
    broker = local_mosquitto(tmp_path / "mq", persistence=True).start()
    job = write_job(base, tmp_path / "job.yaml", epochs=1)
    workdir, cloud_log = tmp_path / "cloud", tmp_path / "cloud-cloud.log"
    cloud = start_cloud(job, broker.url, workdir)
    edges = [start_edge(n, broker.url, tmp_path, "--rate-limit", "30000") for n in NODES]
    procs = [cloud, *edges]
    try:
        wait_for(lambda: min(committed_transfers(workdir, n) for n in NODES) >= 3, 90, "3 transfers per edge")
        broker.stop()  # SIGTERM: mosquitto saves sessions, queued and retained messages
        time.sleep(1)  # the cloud may still commit what it had received
        at_stop = committed(workdir)
        time.sleep(4)
        assert committed(workdir) == at_stop and all(p.poll() is None for p in procs), "an agent gave up"
        t0 = time.monotonic()
        broker.start()
        wait_for(lambda: committed(workdir) > at_stop, 60, "a commit after the broker restart")
        recovered_s = time.monotonic() - t0
        summary = json.loads(finish(cloud, 120))
        assert cloud.returncode == 0, cloud_log.read_text()[-3000:]
        assert all(e.wait(30) == 0 for e in edges)
        status = {n: node_status(broker.url, n) for n in NODES}
    finally:
        stop(procs)
        broker.stop()
    assert summary["phase"] == "done"
    assert {n: e["samples"] for n, e in summary["edges"].items()} == {"edge1": 1500, "edge2": 1500}
    assert_exactly_once(workdir)
    assert "broker disconnected" in cloud_log.read_text()
    for n in NODES:
        log = (tmp_path / f"{n}.log").read_text()
        assert "disconnected" in log and log.count("INFO mistnet.edge: connected") >= 2, log[-2000:]
        assert status[n]["resent_chunks"] <= 2 * WINDOW, status[n]
    print(
        f"\n[fault] broker down 5 s at {at_stop} of 48 transfers: first commit {recovered_s:.1f} s after it came "
        f"back; resent chunks/bytes: "
        + ", ".join(f"{n} {s['resent_chunks']}/{s['resent_bytes']}" for n, s in status.items())
    )


def test_edge_that_never_comes_back(tmp_path, mosquitto, base):
    """Proceed without a missing edge, or fail the job (on_timeout: fail); status and summary say why."""
    lenient = write_job(base, tmp_path / "lenient.yaml", name="lenient", epochs=0, timeout_s=12)
    strict = write_job(
        base, tmp_path / "strict.yaml", name="strict", nodes=("edge3", "edge4"), timeout_s=12, on_timeout="fail"
    )
    clouds = [
        start_cloud(lenient, mosquitto.url, tmp_path / "lenient"),
        start_cloud(strict, mosquitto.url, tmp_path / "strict"),
    ]
    # lenient: edge2 never shows up. strict: edge3 delivers, edge4 is killed mid-transfer and stays dead.
    edges = [
        start_edge("edge1", mosquitto.url, tmp_path),
        start_edge("edge3", mosquitto.url, tmp_path),
        start_edge("edge4", mosquitto.url, tmp_path, "--rate-limit", "20000"),
    ]
    try:
        wait_for(lambda: committed_transfers(tmp_path / "strict", "edge4") >= 2, 60, "edge4 to deliver a little")
        edges[2].kill()
        edges[2].wait()
        done = json.loads(finish(clouds[0], 90))
        failed = json.loads(finish(clouds[1], 90))
        statuses = {job: job_status(mosquitto.url, job) for job in ("lenient", "strict")}
    finally:
        stop(clouds + edges)
    assert clouds[0].returncode == 0 and done["phase"] == "done"
    assert done["edges"]["edge1"]["samples"] == 1500 and done["edges"]["edge2"]["samples"] == 0
    assert "no data within 12 s; never seen on the broker" in done["edges"]["edge2"]["missing_reason"]
    assert statuses["lenient"]["edges"]["edge2"]["missing_reason"] == done["edges"]["edge2"]["missing_reason"]

    assert clouds[1].returncode == 1 and failed["phase"] == "failed"
    reason = failed["edges"]["edge4"]["missing_reason"]
    assert reason.startswith("incomplete: ") and "went offline" in reason, reason
    assert "edge4" in failed["message"] and "on_timeout=fail" in failed["message"]
    assert failed["edges"]["edge3"]["missing_reason"] == "" and failed["edges"]["edge3"]["samples"] == 1500
    assert statuses["strict"]["phase"] == "failed" and statuses["strict"]["edges"]["edge4"]["missing_reason"] == reason
    print(
        f"\n[fault] lenient edge2: {done['edges']['edge2']['missing_reason']!r}\n[fault] strict: {failed['message']!r}"
    )
