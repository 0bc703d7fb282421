"""Scale that only a light edge allows: ``python -m bench.load [--edges 64] [--runtime onnx]``.

That many ``mistnet edge`` processes (one thread each) through one mosquitto and one cloud agent
(collecting only), MNIST shards of ``--samples`` digits in all (:func:`bench.scaling.collect_run`).
Checks that every edge's every sample is in the cloud's spool exactly once, and reports the wall
time and the peak RSS of the edges, the cloud and the broker (``bench/results/load.json``).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from bench.profiles import PROFILES
from bench.scaling import collect_run
from bench.util import RESULTS, Context, bench_broker


def exactly_once(spool: Path, expected: dict[str, int]) -> dict[str, Any]:
    """Per node: samples stored, distinct ids, and whether that is every id ``0..n-1`` once."""
    db = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT node, COUNT(*), COUNT(DISTINCT id), MIN(id), MAX(id) FROM samples GROUP BY node")
        found = {node: (count, distinct, lo, hi) for node, count, distinct, lo, hi in rows}
    finally:
        db.close()
    bad = {n: found.get(n) for n, size in expected.items() if found.get(n) != (size, size, 0, size - 1)}
    return {"nodes": len(found), "samples": sum(c for c, *_ in found.values()), "wrong": bad}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--edges", type=int, default=64)
    parser.add_argument("--runtime", choices=("onnx", "torch"), default="onnx")
    parser.add_argument("--samples", type=int, default=64 * 96, help="MNIST digits shared out to the edges")
    parser.add_argument("--out", type=Path, default=RESULTS / "load.json")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="mistnet-bench-load-"))
    profile = PROFILES["full"]
    with bench_broker(workdir / "broker").start() as broker:
        pid = broker.process.pid if broker.process else None
        ctx = Context(profile, "cpu", workdir, broker.url, print, broker_pid=pid)
        run = collect_run(ctx, args.edges, runtime=args.runtime, samples=args.samples)
    check = exactly_once(Path(run["spool"]), run["shard_samples"])
    edges = run["edge_peak_rss_mib"]
    result = {
        "edges": args.edges, "runtime": args.runtime, "samples": run["samples"], "collect_s": run["collect_s"],
        "last_ready_s": run["last_ready_s"], "exactly_once": not check["wrong"] and check["nodes"] == args.edges,
        "spool_check": check, "edge_peak_rss_mib_max": max(edges), "edge_peak_rss_mib_mean": sum(edges) / len(edges),
        "edges_peak_rss_mib_sum": sum(edges), "cloud_peak_rss_mib": run["cloud_peak_rss_mib"],
        "broker_peak_rss_mib": run["broker_peak_rss_mib"], "cpu_s": run["cpu_s"],
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0 if result["exactly_once"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
