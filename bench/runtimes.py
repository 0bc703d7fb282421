"""The two edge runtimes side by side (issue 13's goals for the torch-free edge).

One edge process with all the CPUs, the real cloud agent, mosquitto on loopback, the same images:
``mistnet edge --runtime torch`` and ``--runtime onnx`` alternate, ``runtime_repeats`` times, each
measured as :func:`bench.edge.run_system` measures a system run (images/s from the cloud's resume
acknowledgement to the last transfer committed: decode, letterbox, head, quantize, randomize, pack,
send; the edge process's peak RSS). Also the disk footprint of each runtime's install
(:mod:`bench.installed`).
"""

from __future__ import annotations

import time
from typing import Any

from bench.edge import edge_dirs, run_system
from bench.installed import installed
from bench.util import Context, median, paired_ratio

RUNTIMES = ("torch", "onnx")


def run(ctx: Context) -> dict[str, Any]:
    prof = ctx.profile
    scn = prof.runtimes
    dirs = edge_dirs(ctx, prof.runtime_images, 1, tag="runtimes")
    runs: dict[str, list[dict[str, Any]]] = {r: [] for r in RUNTIMES}
    for r in range(prof.runtime_repeats):
        for runtime in RUNTIMES:
            runs[runtime].append(run_system(ctx, scn, dirs, runtime=runtime))
            last = runs[runtime][-1]
            ctx.log(f"runtimes {scn.name}, repeat {r + 1}: {runtime} {last['images_per_s']:.2f} img/s, "
                    f"peak RSS {last['edge_peak_rss_mib']:.0f} MiB")
    ips = {r: [x["images_per_s"] for x in runs[r]] for r in RUNTIMES}
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "scenario": scn.name,
        "images": runs["torch"][-1]["images"],
        "threads": runs["torch"][-1]["threads_per_edge"],
        **{r: {"images_per_s": median(ips[r]), "runs": ips[r],
               "edge_peak_rss_mib": max(x["edge_peak_rss_mib"] for x in runs[r]),
               "edge_cpu_s_per_image": median([x["cpu_s_per_image"]["edges"] for x in runs[r]]),
               "wire_bytes_per_image": runs[r][-1]["wire_bytes_per_image"]} for r in RUNTIMES},
        "onnx_throughput_ratio": paired_ratio(ips["onnx"], ips["torch"]),
        "installed_mb": {extra: sum(installed(extra).values()) / 1e6 for extra in ("edge", "edge-torch")},
    }


def main() -> int:
    """``python -m bench.runtimes [PROFILE]``: this part alone, into ``bench/results[/PROFILE]/runtimes.json``
    (``python -m bench.report`` then renders the page with it)."""
    import json
    import sys
    import tempfile
    from pathlib import Path

    from bench.profiles import PROFILES
    from bench.util import bench_broker, default_out

    profile = sys.argv[1] if len(sys.argv) > 1 else "full"
    out = default_out(profile)
    workdir = Path(tempfile.mkdtemp(prefix="mistnet-bench-runtimes-"))
    with bench_broker(workdir / "broker").start() as broker:
        pid = broker.process.pid if broker.process else None
        result = run(Context(PROFILES[profile], "cpu", workdir, broker.url, print, broker_pid=pid))
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtimes.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "installed_mb"}), result["installed_mb"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
