"""Memory: peak RSS of the edge and the cloud agents as the data grows ``memory_factor`` times.

*Edge*: one real ``mistnet edge`` process (all cores) over COCO128's images and over the same
images repeated ``memory_factor`` times (a folder of symlinks with distinct names), the real cloud
collecting (``bench.procs cloud --collect-only``). *Cloud*: the real cloud agent running a whole
job (collect, BatchNorm re-estimation, one training epoch, held-out evaluation before and after,
checkpoint) on two edges' data, at 1x and ``memory_factor``x. Peak RSS is psutil, sampled every
50 ms, each sample also reading the kernel's high-water mark (``VmHWM``), which is the peak reported:
a short peak between two samples is not missed (the largest sample is kept beside it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.edge import start_edges, yolo_job
from bench.util import (
    MIB,
    Context,
    RssSampler,
    await_result,
    child_env,
    children,
    cloud_command,
    coco_images,
    link_images,
    procs_args,
    spawn,
)


def run_job(ctx: Context, job: Path, name: str, nodes: list[str], collect_only: bool, threads: int) -> dict[str, Any]:
    logdir = ctx.workdir / "logs" / name
    args = cloud_command(ctx, job, name, "--device", ctx.device)
    if collect_only:
        args.append("--collect-only")
    with children() as started, RssSampler() as rss:
        cloud = spawn("cloud", procs_args(*args), logdir, child_env())
        started.append(cloud)
        rss.watch("cloud", cloud.pid)
        edges = start_edges(ctx, started, nodes, threads, logdir)
        for kid in edges:
            rss.watch(kid.name, kid.pid)
        result = await_result(cloud, edges, ctx.timeout())
        for kid in edges:
            kid.wait(120)
    samples = sum(e["samples"] for e in result["edges"].values())
    return {
        "images": samples,
        "phase": result["phase"],
        "seconds": result["t_collected"] - result["t_offer"],
        "cloud_peak_rss_mib": rss.peaks.get("cloud", 0) / MIB,
        "cloud_sampled_peak_mib": rss.sampled_peaks.get("cloud", 0) / MIB,
        "edge_peak_rss_mib": max(rss.peaks.get(n, 0) for n in nodes) / MIB,
        "edge_sampled_peak_mib": max(rss.sampled_peaks.get(n, 0) for n in nodes) / MIB,
        "rss_trace": {
            n: [(round(t - rss.samples[n][0][0], 2), round(r / MIB, 1)) for t, r, _ in rss.samples[n][::4]]
            for n in ("cloud", nodes[0])
            if rss.samples.get(n)
        },
    }


def edge_memory(ctx: Context) -> dict[str, Any]:
    prof = ctx.profile
    scn = prof.memory_edge
    images = coco_images(prof.memory_images)
    runs = {}
    for factor in (1, prof.memory_factor):
        ctx.log(f"memory: edge {scn.name} over {len(images) * factor} images")
        folder = link_images(images, ctx.workdir / "data" / f"memory-x{factor}", repeat=factor)
        name = ctx.unique(f"m{scn.arch[-1]}{scn.imgsz}x{factor}-")
        job = yolo_job(ctx, scn, [folder], name)
        runs[factor] = run_job(ctx, job, name, [f"{name}-e1"], collect_only=True, threads=ctx.cpus)
    one, many = runs[1], runs[prof.memory_factor]
    return {
        "scenario": scn.name,
        "runs": {f"x{k}": v for k, v in runs.items()},
        "edge_peak_rss_mib": max(one["edge_peak_rss_mib"], many["edge_peak_rss_mib"]),
        "edge_rss_growth": many["edge_peak_rss_mib"] / one["edge_peak_rss_mib"],
        "cloud_collect_rss_growth": many["cloud_peak_rss_mib"] / one["cloud_peak_rss_mib"],
    }


def cloud_memory(ctx: Context) -> dict[str, Any]:
    prof = ctx.profile
    scn = prof.memory_cloud
    pool = coco_images(128)
    validation = link_images(pool[-prof.memory_cloud_validation :], ctx.workdir / "data" / "memory-val")
    per_edge = max(1, prof.memory_cloud_images // prof.edges)
    runs = {}
    for factor in (1, prof.memory_factor):
        ctx.log(f"memory: cloud job {scn.name} over {per_edge * prof.edges * factor} images (collect + train)")
        dirs = [
            link_images(
                pool[k * per_edge : (k + 1) * per_edge], ctx.workdir / "data" / f"cmem-x{factor}-{k + 1}", repeat=factor
            )
            for k in range(prof.edges)
        ]
        name = ctx.unique(f"c{scn.arch[-1]}{scn.imgsz}x{factor}-")
        job = yolo_job(
            ctx, scn, dirs, name, epochs=1, batch_size=prof.train_batch, learning_rate=0.001, validation=str(validation)
        )
        nodes = [f"{name}-e{k + 1}" for k in range(prof.edges)]
        runs[factor] = run_job(ctx, job, name, nodes, collect_only=False, threads=max(1, ctx.cpus // prof.edges))
    one, many = runs[1], runs[prof.memory_factor]
    return {
        "scenario": scn.name,
        "runs": {f"x{k}": v for k, v in runs.items()},
        "cloud_peak_rss_mib": max(one["cloud_peak_rss_mib"], many["cloud_peak_rss_mib"]),
        "cloud_rss_growth": many["cloud_peak_rss_mib"] / one["cloud_peak_rss_mib"],
    }


def run(ctx: Context) -> dict[str, Any]:
    edge = edge_memory(ctx)
    if ctx.profile.memory_cloud_train:
        cloud = cloud_memory(ctx)
    else:  # the collect-only runs of the edge measurement stand in
        cloud = {
            "scenario": edge["scenario"],
            "runs": {},
            "cloud_rss_growth": edge["cloud_collect_rss_growth"],
            "cloud_peak_rss_mib": max(r["cloud_peak_rss_mib"] for r in edge["runs"].values()),
        }
    return {
        "edge": edge,
        "cloud": cloud,
        "factor": ctx.profile.memory_factor,
        "edge_peak_rss_mib": edge["edge_peak_rss_mib"],
        "edge_rss_growth": edge["edge_rss_growth"],
        "cloud_rss_growth": max(cloud["cloud_rss_growth"], edge["cloud_collect_rss_growth"]),
    }
