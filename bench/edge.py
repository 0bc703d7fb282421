"""Edge throughput and wire efficiency.

*System*: the real cloud agent (``bench.procs cloud --collect-only --hold``) and the real edge
agents (``mistnet edge``, one process per edge) on COCO128 through mosquitto on loopback. The clock
of an edge runs from the cloud's resume acknowledgement (sent to all edges at once, once every
edge has loaded its head and data) to its last transfer committed in the cloud's spool:
decode, letterbox, head, binarize, randomize, pack, chunk, publish, store, acknowledge.

*Baseline*: the same number of processes (``bench.procs bare``), the same threads, the same images
and batch size: decode, letterbox and the head's forward pass in plain torch, nothing else. A
second baseline, *prepared head*, runs the extractor's optimised head (BatchNorm folded,
channels-last) without privatizing or sending: system ÷ that is the pure cost of the pipeline.

Throughput is all edges' images over the span from the first start to the last end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.profiles import Scenario
from bench.util import (
    BenchError,
    Child,
    Context,
    RssSampler,
    await_result,
    child_env,
    children,
    cloud_command,
    coco_images,
    link_images,
    median,
    mistnet_args,
    paired_ratio,
    procs_args,
    pyspy_command,
    spawn,
    spread,
    wait_ready,
    write_job,
)

# Extractor settings of the ablation, cumulative: each row adds one optimisation to the last.
ABLATION = (
    (
        "before: legacy encode, plain head, whole transfer per pass",
        "encoder=legacy,fuse_bn=0,channels_last=0,release_tail=0,pixels_per_step=1000000000",
    ),
    ("+ micro-batches, packed-domain randomize/pack", "fuse_bn=0,channels_last=0"),
    ("+ BatchNorm folded", "channels_last=0"),
    ("+ channels-last (the default)", ""),
    ("+ prefetch thread (off by default)", "prefetch=1"),
)


def edge_dirs(ctx: Context, images: int, edges: int, repeat: int = 1, tag: str = "edges") -> list[Path]:
    """COCO128's first ``images`` images dealt out to ``edges`` symlink folders (YOLO layout)."""
    pool = coco_images(min(images, 128))
    per = max(1, len(pool) // edges)
    return [
        link_images(pool[k * per : (k + 1) * per], ctx.workdir / "data" / f"{tag}{k + 1}", repeat) for k in range(edges)
    ]


def threads_per_edge(ctx: Context, edges: int) -> int:
    return max(1, ctx.cpus // edges)


def yolo_job(ctx: Context, scn: Scenario, dirs: list[Path], name: str, **cloud: Any) -> Path:
    from common.jobspec import CloudSpec, CollectSpec, EdgeSpec, JobSpec, ModelSpec, PrivacySpec

    spec = JobSpec(
        name=name,
        model=ModelSpec(arch=scn.arch, num_classes=80, image_size=scn.imgsz),
        cut_layer=scn.cut,
        privacy=PrivacySpec(epsilon=ctx.profile.epsilon),
        edges=[
            EdgeSpec(node=f"{name}-e{k + 1}", dataset=str(d), batch_size=ctx.profile.transfer_batch)
            for k, d in enumerate(dirs)
        ],
        cloud=CloudSpec(**({"epochs": 0} | cloud)),
        collect=CollectSpec(timeout_s=ctx.timeout(), min_edges=len(dirs), on_timeout="fail"),
    )
    return write_job(spec, ctx.workdir / "jobs" / f"{name}.yaml")


def start_edges(
    ctx: Context,
    started: list[Child],
    nodes: list[str],
    threads: int,
    logdir: Path,
    opts: str | None = None,
    profile_dir: Path | None = None,
    runtime: str | None = None,
) -> list[Child]:
    """One ``mistnet edge --once`` per node (through ``bench.procs edge`` when ``opts`` switch the
    extractor; with ``--runtime`` when ``runtime`` is given). With ``profile_dir`` the first edge runs
    under cProfile and the second under py-spy."""
    from bench.scaling import pyspy

    env = child_env(threads)
    kids = []
    for k, node in enumerate(nodes):
        device = "cpu" if runtime == "onnx" else ctx.device  # ONNX Runtime's edge runs on the CPU only
        edge = ["edge", "--node", node, "--broker", ctx.broker_url, "--once", "--device", device]
        edge += ["--runtime", runtime] if runtime else []
        args = procs_args("edge", "--opts", opts, "--", *edge) if opts is not None else mistnet_args(*edge)
        argv0 = None
        if profile_dir is not None and k == 0:
            args = ["-m", "cProfile", "-o", str(profile_dir / "edge.prof"), *args]
        elif profile_dir is not None and k == 1 and pyspy():
            argv0 = pyspy_command(str(pyspy()), profile_dir)
        kid = spawn(node, args, logdir, env, argv0=argv0)
        started.append(kid)
        kids.append(kid)
    return kids


def run_system(
    ctx: Context,
    scn: Scenario,
    dirs: list[Path],
    opts: str | None = None,
    profile_dir: Path | None = None,
    runtime: str | None = None,
) -> dict[str, Any]:
    """One system run: cloud + one edge process per folder; throughput, bytes, peak RSS."""
    name = ctx.unique(f"b{scn.arch[-1]}{scn.imgsz}-")
    job = yolo_job(ctx, scn, dirs, name)
    logdir = ctx.workdir / "logs" / name
    threads = threads_per_edge(ctx, len(dirs))
    nodes = [f"{name}-e{k + 1}" for k in range(len(dirs))]
    with children() as started, RssSampler() as rss:
        cloud_args = cloud_command(ctx, job, name, "--collect-only", "--hold")
        if profile_dir is not None:
            cloud_args += ["--profile", str(profile_dir / "cloud.prof")]
        cloud = spawn("cloud", procs_args(*cloud_args), logdir, child_env())
        started.append(cloud)
        rss.watch("cloud", cloud.pid)
        if ctx.broker_pid:
            rss.watch("broker", ctx.broker_pid)
        for kid in start_edges(ctx, started, nodes, threads, logdir, opts, profile_dir, runtime):
            rss.watch(kid.name, kid.pid)
        result = await_result(cloud, started[1:], ctx.timeout())
        for kid in started[1:]:
            if kid.wait(60) != 0:
                raise BenchError(f"edge {kid.name} exited with {kid.returncode}: {kid.log}")
    edges = result["edges"]
    t0 = min(e["t_start"] for e in edges.values())
    t1 = max(e["t_end"] for e in edges.values())
    samples = sum(e["samples"] for e in edges.values())
    packets = sum(e["packet_bytes"] for e in edges.values())
    payload = sum(e["payload_bytes"] for e in edges.values())
    floor = max(e["feature_bytes_per_sample"] for e in edges.values())
    cpu = {
        "edges": sum(rss.cpu_between(n, t0, t1) for n in nodes) / samples,
        "cloud": rss.cpu_between("cloud", t0, t1) / samples,
        "broker": rss.cpu_between("broker", t0, t1) / samples,
    }
    return {
        "cpu_s_per_image": cpu,
        "images": samples,
        "seconds": t1 - t0,
        "images_per_s": samples / (t1 - t0),
        "wire_bytes_per_image": packets / samples,
        "payload_bytes_per_image": payload / samples,
        "activation_bytes_per_image": floor,
        "wire_ratio": packets / samples / floor,
        "messages": sum(e["messages"] for e in edges.values()),
        "edge_peak_rss_mib": max(rss.peaks.get(n, 0) for n in nodes) / 2**20,
        "cloud_peak_rss_mib": rss.peaks.get("cloud", 0) / 2**20,
        "threads_per_edge": threads,
    }


def run_bare(ctx: Context, scn: Scenario, dirs: list[Path], optimised: bool = False) -> dict[str, Any]:
    """The baseline: one ``bench.procs bare`` per folder, started together."""
    tag = ctx.unique("bare-opt-" if optimised else "bare-")
    logdir = ctx.workdir / "logs" / tag
    threads = threads_per_edge(ctx, len(dirs))
    with children() as started, RssSampler() as rss:
        for k, d in enumerate(dirs):
            args = [
                "bare",
                "--arch",
                scn.arch,
                "--imgsz",
                str(scn.imgsz),
                "--cut",
                str(scn.cut),
                "--data",
                str(d),
                "--batch",
                str(ctx.profile.transfer_batch),
                "--device",
                ctx.device,
                "--wait-go",
            ]
            if optimised:
                args.append("--optimised")
            started.append(spawn(f"bare{k + 1}", procs_args(*args), logdir, child_env(threads), stdin=True))
        for kid in started:
            rss.watch(kid.name, kid.pid)
        wait_ready(started, ctx.timeout("ready"))
        for kid in started:
            kid.send("go")
        results = [kid.result(ctx.timeout()) for kid in started]
    t0 = min(r["t_start"] for r in results)
    t1 = max(r["t_end"] for r in results)
    images = sum(r["images"] for r in results)
    cpu = sum(rss.cpu_between(k.name, t0, t1) for k in started) / images
    return {
        "images": images,
        "seconds": t1 - t0,
        "images_per_s": images / (t1 - t0),
        "threads_per_edge": threads,
        "cpu_s_per_image": cpu,
        "peak_rss_mib": max(rss.peaks.values()) / 2**20,
    }


def bench_scenario(ctx: Context, scn: Scenario, dirs: list[Path]) -> dict[str, Any]:
    """plain baseline, prepared-head baseline, system; ``repeats`` times, interleaved."""
    plain: list[dict[str, Any]] = []
    prepared: list[dict[str, Any]] = []
    system: list[dict[str, Any]] = []
    for r in range(ctx.profile.repeats):
        ctx.log(f"edge {scn.name}: repeat {r + 1}/{ctx.profile.repeats}")
        plain.append(run_bare(ctx, scn, dirs))
        prepared.append(run_bare(ctx, scn, dirs, optimised=True))
        system.append(run_system(ctx, scn, dirs))
        ctx.log(
            f"  plain {plain[-1]['images_per_s']:.2f} img/s, prepared head {prepared[-1]['images_per_s']:.2f}, "
            f"system {system[-1]['images_per_s']:.2f}"
        )
    ips = [s["images_per_s"] for s in system]
    base = [p["images_per_s"] for p in plain]
    prep = [p["images_per_s"] for p in prepared]
    last = system[-1]
    sys_cpu = {k: median([s["cpu_s_per_image"][k] for s in system]) for k in ("edges", "cloud", "broker")}
    plain_cpu = median([p["cpu_s_per_image"] for p in plain])
    prep_cpu = median([p["cpu_s_per_image"] for p in prepared])
    return {
        "scenario": scn.name,
        "images": last["images"],
        "edges": len(dirs),
        "threads_per_edge": last["threads_per_edge"],
        "system_images_per_s": median(ips),
        "plain_head_images_per_s": median(base),
        "prepared_head_images_per_s": median(prep),
        "system_runs": ips,
        "plain_runs": base,
        "prepared_runs": prep,
        "edge_throughput_ratio": paired_ratio(ips, base),
        "edge_overhead_ratio": paired_ratio(ips, prep),
        "head_speedup": paired_ratio(prep, base),
        "ratio_spread": spread([s / b for s, b in zip(ips, base, strict=True)]),
        "cpu_s_per_image": {
            "plain_head": plain_cpu,
            "prepared_head": prep_cpu,
            **{f"system_{k}": v for k, v in sys_cpu.items()},
        },
        # CPU-time ratios barely move with other processes' load: plain head CPU per image over the
        # edge processes' CPU per image (edge only), and over edges + cloud + broker (all on this host).
        "edge_cpu_ratio": plain_cpu / sys_cpu["edges"] if sys_cpu["edges"] else float("nan"),
        "edge_cpu_overhead_ratio": prep_cpu / sys_cpu["edges"] if sys_cpu["edges"] else float("nan"),
        "system_cpu_ratio": plain_cpu / sum(sys_cpu.values()) if sum(sys_cpu.values()) else float("nan"),
        "wire_bytes_per_image": last["wire_bytes_per_image"],
        "payload_bytes_per_image": last["payload_bytes_per_image"],
        "activation_bytes_per_image": last["activation_bytes_per_image"],
        "wire_ratio": max(s["wire_ratio"] for s in system),
        "edge_peak_rss_mib": max(s["edge_peak_rss_mib"] for s in system),
        "cloud_peak_rss_mib": max(s["cloud_peak_rss_mib"] for s in system),
    }


def bench_ablation(ctx: Context, scn: Scenario, dirs: list[Path]) -> dict[str, Any]:
    """Each extractor optimisation added in turn, end to end, against the plain baseline."""
    rows: dict[str, list[float]] = {label: [] for label, _ in ABLATION}
    base: list[float] = []
    for r in range(ctx.profile.ablation_repeats):
        ctx.log(f"ablation {scn.name}: repeat {r + 1}/{ctx.profile.ablation_repeats}")
        base.append(run_bare(ctx, scn, dirs)["images_per_s"])
        for label, opts in ABLATION:
            rows[label].append(run_system(ctx, scn, dirs, opts)["images_per_s"])
            ctx.log(f"  {label}: {rows[label][-1]:.2f} img/s (plain head {base[-1]:.2f})")
    return {
        "scenario": scn.name,
        "plain_head_images_per_s": median(base),
        "steps": [
            {
                "step": label,
                "opts": opts,
                "images_per_s": median(rows[label]),
                "ratio_to_plain_head": paired_ratio(rows[label], base),
                "runs": rows[label],
            }
            for label, opts in ABLATION
        ],
    }


def profile_run(ctx: Context, scn: Scenario, dirs: list[Path]) -> dict[str, Any]:
    """One more system run with the cloud and the first edge under cProfile, the second under py-spy."""
    from bench.scaling import top_cprofile, top_pyspy

    pdir = ctx.workdir / "profiles" / scn.name.replace("@", "-")
    pdir.mkdir(parents=True, exist_ok=True)
    ctx.log(f"edge {scn.name}: profiled run")
    run_system(ctx, scn, dirs, profile_dir=pdir)
    return {
        "scenario": scn.name,
        "cloud_cprofile": top_cprofile(pdir / "cloud.prof"),
        "edge_cprofile": top_cprofile(pdir / "edge.prof"),
        "edge_pyspy": top_pyspy(pdir / "edge.pyspy.txt"),
    }


def run(ctx: Context) -> dict[str, Any]:
    prof = ctx.profile
    dirs = edge_dirs(ctx, prof.edge_images, prof.edges)
    scenarios = [bench_scenario(ctx, scn, dirs) for scn in prof.scenarios]
    ablation_dirs = edge_dirs(ctx, prof.ablation_images, prof.edges, tag="ablation") if prof.ablation else dirs
    ablation = [bench_ablation(ctx, scn, ablation_dirs) for scn in prof.ablation]
    profiles = [profile_run(ctx, prof.scenarios[-2 if len(prof.scenarios) > 1 else 0], dirs)] if prof.profile else []
    return {
        "scenarios": scenarios,
        "ablation": ablation,
        "profiles": profiles,
        "epsilon": prof.epsilon,
        "transfer_batch": prof.transfer_batch,
        "device": ctx.device,
    }
