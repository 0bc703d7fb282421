"""Load: 16 edge processes through one mosquitto and one cloud, every sample exactly once.

Prints the duration and the peak resident memory of the broker, the cloud and the edges (run with
``-s``); small shards (~190 MNIST digits per edge) and one epoch keep it near a minute on 2 cores.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.agents import finish, spool_query, start_cloud, start_edge
from tests.harness import RssSampler, mnist_base, single_thread, stop, write_job

pytestmark = [pytest.mark.integration, pytest.mark.load, pytest.mark.slow]
__all__ = ["single_thread"]

EDGES = 16
MB = 1024 * 1024


def test_sixteen_edges_every_sample_exactly_once(tmp_path, mosquitto, tmp_path_factory):
    import numpy as np

    base = mnist_base(tmp_path_factory, edges=(2, EDGES))
    nodes = [f"edge{k}" for k in range(1, EDGES + 1)]
    sizes = {n: len(np.load(base.shard(k, EDGES))["labels"]) for k, n in enumerate(nodes, 1)}
    job = write_job(base, tmp_path / "job.yaml", nodes=nodes, shards=EDGES, epochs=1, timeout_s=150)
    assert mosquitto.process is not None
    with RssSampler() as rss:
        rss.watch("broker", mosquitto.process.pid)
        t0 = time.monotonic()
        cloud = start_cloud(job, mosquitto.url, tmp_path / "cloud")
        rss.watch("cloud", cloud.pid)
        edges = [start_edge(n, mosquitto.url, tmp_path) for n in nodes]
        for n, e in zip(nodes, edges, strict=True):
            rss.watch(n, e.pid)
        try:
            summary = json.loads(finish(cloud, 170))
            duration = time.monotonic() - t0
            assert cloud.returncode == 0, (tmp_path / "cloud-cloud.log").read_text()[-3000:]
            assert all(e.wait(30) == 0 for e in edges)
        finally:
            stop([cloud, *edges])
    assert summary["phase"] == "done"
    assert {n: e["samples"] for n, e in summary["edges"].items()} == sizes
    rows = spool_query(
        tmp_path / "cloud", "SELECT node, COUNT(*), COUNT(DISTINCT id), MIN(id), MAX(id) FROM samples GROUP BY node"
    )
    assert sorted(rows) == sorted((n, s, s, 0, s - 1) for n, s in sizes.items())
    edge_peaks = [rss.peak[n] for n in nodes if n in rss.peak]
    assert len(edge_peaks) == EDGES
    print(
        f"\n[load] {EDGES} edges, {sum(sizes.values())} samples, 1 epoch: {duration:.1f} s from launch to summary "
        f"(cloud's own figure {summary['duration_s']:.1f} s); peak RSS broker {rss.peak['broker'] / MB:.1f} MiB, "
        f"cloud {rss.peak['cloud'] / MB:.0f} MiB, edges max {max(edge_peaks) / MB:.0f} MiB "
        f"mean {sum(edge_peaks) / len(edge_peaks) / MB:.0f} MiB; peak USS (unshared) broker "
        f"{rss.peak_uss.get('broker', 0) / MB:.1f} MiB, cloud {rss.peak_uss.get('cloud', 0) / MB:.0f} MiB, edges max "
        f"{max(rss.peak_uss.get(n, 0) for n in nodes) / MB:.0f} MiB; accuracy {summary['metrics'].get('accuracy')}"
    )


def test_the_load_benchmark_checks_every_sample_of_onnx_edges(tmp_path):
    """``python -m bench.load`` (64 onnx edges in the benchmarks) on 4 edges: every sample stored once."""
    import subprocess
    import sys

    out = tmp_path / "load.json"
    done = subprocess.run([sys.executable, "-m", "bench.load", "--edges", "4", "--samples", "512", "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["exactly_once"] and result["edges"] == 4 and result["samples"] == 512
    assert result["spool_check"] == {"nodes": 4, "samples": 512, "wrong": {}}
    assert 0 < result["edge_peak_rss_mib_max"] < 256 and result["cloud_peak_rss_mib"] > 0
