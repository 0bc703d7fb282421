"""Scaling: collection wall time with 1, 2, 4 and 8 MNIST edges, and where the time goes.

A fixed total of MNIST samples (the 3,000 edge samples repeated as needed) is shared out between
the edges (LeNet-5 cut 2, randomized at the profile's ε, 64 samples a transfer). The edges
(``mistnet edge``, one intra-op thread each) are started first and announce themselves; the clock
runs from the real cloud agent offering the job (head weights and assignments) to the last edge's
last transfer committed, so it covers each edge's job set-up (head download, model build, data
load) as well as extraction and transfer. CPU seconds of the edges, the cloud and the broker over
that span say who was busy.

With ``profile``, one more run at the largest edge count records cProfile of the cloud and of one
edge, and py-spy of another edge when ``py-spy`` is installed (``pip install py-spy``).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.util import (
    Context,
    RssSampler,
    await_result,
    child_env,
    children,
    cloud_command,
    median,
    mistnet_args,
    procs_args,
    pyspy_command,
    spawn,
    write_job,
)


def mnist_shards(ctx: Context, edges: int, total: int) -> list[Path]:
    from common.datasets.mnist import prepare_mnist, read_npz

    split = prepare_mnist(ctx.workdir / "data" / f"mnist-{edges}", edges)
    per = max(1, total // edges)
    for path in split.edges:  # each shard cut or repeated to its share of the total
        images, labels = read_npz(path)
        take = np.resize(np.arange(len(images)), per)
        np.savez(path, images=images[take], labels=labels[take])
    return split.edges


def mnist_job(ctx: Context, name: str, shards: list[Path]) -> Path:
    from common.jobspec import CloudSpec, CollectSpec, EdgeSpec, JobSpec, ModelSpec, PrivacySpec

    spec = JobSpec(
        name=name,
        model=ModelSpec(arch="lenet5", num_classes=10),
        cut_layer=2,
        privacy=PrivacySpec(epsilon=ctx.profile.epsilon),
        edges=[EdgeSpec(node=f"{name}-e{k + 1}", dataset=str(p), batch_size=64) for k, p in enumerate(shards)],
        cloud=CloudSpec(epochs=0),
        collect=CollectSpec(timeout_s=ctx.timeout(), min_edges=len(shards), on_timeout="fail"),
    )
    return write_job(spec, ctx.workdir / "jobs" / f"{name}.yaml")


def pyspy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return found if Path(found).exists() else None


def collect_run(
    ctx: Context, edges: int, profile_dir: Path | None = None, runtime: str | None = None, samples: int | None = None
) -> dict[str, Any]:
    """``samples`` (default: the profile's) shared out to ``edges`` edges (``mistnet edge --runtime
    runtime`` when given), collected by the cloud (no training)."""
    shards = mnist_shards(ctx, edges, samples or ctx.profile.scaling_samples)
    name = ctx.unique(f"s{edges}-")
    job = mnist_job(ctx, name, shards)
    logdir = ctx.workdir / "logs" / name
    nodes = [f"{name}-e{k + 1}" for k in range(edges)]
    cloud_args = cloud_command(ctx, job, name, "--collect-only")
    if profile_dir is not None:
        cloud_args += ["--profile", str(profile_dir / "cloud.prof")]
    with children() as started, RssSampler() as rss:
        cloud = spawn("cloud", procs_args(*cloud_args), logdir, child_env())
        started.append(cloud)
        rss.watch("cloud", cloud.pid)
        if ctx.broker_pid:
            rss.watch("broker", ctx.broker_pid)
        kids = []
        spy = pyspy()
        for k, node in enumerate(nodes):
            edge = mistnet_args("edge", "--node", node, "--broker", ctx.broker_url, "--once",
                                *(["--runtime", runtime] if runtime else []))  # fmt: skip
            if profile_dir is not None and k == 0:
                kid = spawn(node, ["-m", "cProfile", "-o", str(profile_dir / "edge.prof"), *edge], logdir, child_env(1))
            elif profile_dir is not None and k == 1 and spy:
                kid = spawn(node, edge, logdir, child_env(1), argv0=pyspy_command(spy, profile_dir))
            else:
                kid = spawn(node, edge, logdir, child_env(1))
            started.append(kid)
            kids.append(kid)
            rss.watch(node, kid.pid)
        result = await_result(cloud, kids, ctx.timeout())
        for kid in kids:
            kid.wait(120)
    return {"edges": edges, **collect_figures(result, rss, nodes),
            "spool": str(ctx.workdir / "cloud" / name / "spool.sqlite"),
            "shard_samples": {n: len(np.load(p)["labels"]) for n, p in zip(nodes, shards, strict=True)}}  # fmt: skip


def collect_figures(result: dict[str, Any], rss: RssSampler, nodes: list[str]) -> dict[str, Any]:
    """Collection time, when the edges got ready and finished, and CPU and peak RSS per process."""
    t0, t1 = result["t_offer"], result["t_collected"]
    samples = sum(e["samples"] for e in result["edges"].values())
    ends = [e["t_end"] - t0 for e in result["edges"].values() if e["t_end"]]
    starts = [e["t_start"] - t0 for e in result["edges"].values() if e["t_start"]]
    return {
        "samples": samples,
        "collect_s": t1 - t0,
        "first_ready_s": min(starts) if starts else None,
        "last_ready_s": max(starts) if starts else None,
        "last_done_s": max(ends) if ends else None,
        "cpu_s": {
            "edges": sum(rss.cpu_between(n, t0, t1) for n in nodes),
            "cloud": rss.cpu_between("cloud", t0, t1),
            "broker": rss.cpu_between("broker", t0, t1),
        },
        "cloud_peak_rss_mib": rss.peaks.get("cloud", 0) / 2**20,
        "broker_peak_rss_mib": rss.peaks.get("broker", 0) / 2**20,
        "edge_peak_rss_mib": [rss.peaks.get(n, 0) / 2**20 for n in nodes],
    }


def top_cprofile(path: Path, limit: int = 12) -> list[dict[str, Any]]:
    import pstats

    if not path.exists():
        return []
    stats = pstats.Stats(str(path))
    rows = []
    for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{func} ({Path(file).name}:{line})",
                "calls": ncalls,
                "tottime_s": round(tottime, 3),
                "cumtime_s": round(cumtime, 3),
            }
        )
    rows.sort(key=lambda r: r["tottime_s"], reverse=True)
    return rows[:limit]


def top_pyspy(path: Path, limit: int = 12) -> list[dict[str, Any]]:
    """Self time per function from py-spy's collapsed stacks (active samples only)."""
    if not path.exists():
        return []
    counts: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        leaf = stack.split(";")[-1]
        counts[leaf] = counts.get(leaf, 0) + int(n)
    ranked = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)[:limit]
    return [
        {"function": f.replace(str(Path(sys.prefix)), "")[:140], "share": round(c / max(total, 1), 4)}
        for f, c in ranked
    ]


def run(ctx: Context) -> dict[str, Any]:
    prof = ctx.profile
    rows = []
    for edges in prof.scaling_edges:
        runs = []
        for r in range(prof.scaling_repeats):
            runs.append(collect_run(ctx, edges))
            ctx.log(
                f"scaling: {edges} edge(s), run {r + 1}: {runs[-1]['collect_s']:.1f} s for {runs[-1]['samples']}"
                f" samples"
            )
        rows.append(
            {
                **runs[-1],
                "collect_s": median([x["collect_s"] for x in runs]),
                "collect_runs": [x["collect_s"] for x in runs],
            }
        )
    profiles: dict[str, Any] = {}
    if prof.profile:
        pdir = ctx.workdir / "profiles"
        pdir.mkdir(parents=True, exist_ok=True)
        edges = max(prof.scaling_edges)
        ctx.log(f"scaling: profiled run with {edges} edges")
        collect_run(ctx, edges, pdir)
        profiles = {
            "edges": edges,
            "cloud_cprofile": top_cprofile(pdir / "cloud.prof"),
            "edge_cprofile": top_cprofile(pdir / "edge.prof"),
            "edge_pyspy": top_pyspy(pdir / "edge.pyspy.txt"),
        }
    return {"total_samples": prof.scaling_samples, "rows": rows, "profiles": profiles}
