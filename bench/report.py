"""Results on disk: one JSON per benchmark plus ``summary.json``, PNG plots, and the markdown page."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import string
from pathlib import Path
from typing import Any

from bench import train_scaling
from bench.util import RESULTS

REFERENCE_MB_PER_EDGE = 400.11  # "Received 400.11 MB" for 128 images of yolov5s at 640 (Sedna issue)

GOALS = {
    "edge_throughput_ratio": (">=", 0.85),
    "wire_bytes_ratio": ("<=", 1.03),
    "transport_ratio": (">=", 0.7),
    "train_throughput_ratio": (">=", 0.9),
    "edge_peak_rss_mib": ("<=", 1024.0),
    "edge_rss_growth": ("<=", 1.10),
    "cloud_rss_growth": ("<=", 1.10),
    "onnx_edge_peak_rss_mib": ("<=", 256.0),
    "onnx_edge_throughput_ratio": (">=", 0.9),
    "edge_installed_mb": ("<=", 300.0),
}


def _finite(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The one object ``mistnet bench --json`` prints."""
    edge = results["edge"]["scenarios"]
    train = results["train"]
    memory = results["memory"]
    s640 = [s for s in edge if s["scenario"] == "yolov5s@640"]
    ddp = results.get("train_scaling", {}).get("rows", [])  # absent from runs made before it existed
    summary: dict[str, Any] = {
        "profile": results["profile"],
        "device": results["device"],
        "edge_throughput_ratio": min(s["edge_throughput_ratio"] for s in edge),
        "edge_overhead_ratio": min(s["edge_overhead_ratio"] for s in edge),
        "edge_cpu_ratio": min(s["edge_cpu_ratio"] for s in edge),
        "edge_cpu_overhead_ratio": min(s["edge_cpu_overhead_ratio"] for s in edge),
        "wire_bytes_ratio": max(s["wire_ratio"] for s in edge),
        "transport_ratio": results["transport"]["transport_ratio"],
        "train_throughput_ratio": min(y["train_throughput_ratio"] for y in train["yolo"])
        if train["yolo"]
        else train["mnist"]["train_throughput_ratio"],
        "train_throughput_ratio_mnist": train["mnist"]["train_throughput_ratio"],
        "edge_peak_rss_mib": memory["edge_peak_rss_mib"],
        "edge_rss_growth": memory["edge_rss_growth"],
        "cloud_rss_growth": memory["cloud_rss_growth"],
        "onnx_edge_peak_rss_mib": results["runtimes"]["onnx"]["edge_peak_rss_mib"],
        "onnx_edge_throughput_ratio": results["runtimes"]["onnx_throughput_ratio"],
        "edge_installed_mb": results["runtimes"]["installed_mb"]["edge"],
        "wire_mb_128_yolov5s_640": s640[0]["wire_bytes_per_image"] * 128 / 1e6 if s640 else None,
        "scaling_collect_s": {str(r["edges"]): r["collect_s"] for r in results["scaling"]["rows"]},
        "train_scaling_efficiency": {f"{r['task']} x{r['ranks']}": r["efficiency"] for r in ddp if r["ranks"] > 1},
        "machine": {k: results["machine"].get(k) for k in ("date", "cpu", "cpus")},
        "load": results["load"],
        "seconds": results["seconds"],
    }
    summary["goals_met"] = {k: _meets(summary[k], *GOALS[k]) for k in GOALS}
    return summary


def _meets(value: Any, op: str, target: float) -> bool:
    v = _finite(value)
    if math.isnan(v):
        return False
    return v >= target if op == ">=" else v <= target


def write_results(results: dict[str, Any], summary: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key in ("edge", "runtimes", "transport", "train", "memory", "scaling", "train_scaling"):
        written.append(write_part(out, key, results[key]))
    meta = {k: results[k] for k in ("profile", "device", "machine", "load", "seconds", "out", "ablation_images")}
    (out / "run.json").write_text(json.dumps(meta, indent=1) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return [*written, out / "run.json", out / "summary.json"]


def write_part(out: Path, key: str, part: dict[str, Any]) -> Path:
    path = out / f"{key}.json"
    path.write_text(json.dumps(part, indent=1, default=str) + "\n")
    return path


# Plots ---------------------------------------------------------------------------------------------


def plots(results: dict[str, Any], out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = {"edge": _save(edge_plot(plt, results["edge"]["scenarios"]), out / "edge_throughput.png")}
    if results["edge"].get("ablation"):
        made["ablation"] = _save(ablation_plot(plt, results["edge"]["ablation"][0]), out / "ablation.png")
    made["transport"] = _save(transport_plot(plt, results["transport"]), out / "transport.png")
    made["scaling"] = _save(scaling_plot(plt, results["scaling"]), out / "scaling.png")
    made["memory"] = _save(memory_plot(plt, results["memory"]), out / "memory.png")
    if results.get("train_scaling", {}).get("rows"):
        made["train_scaling"] = _save(train_scaling.plot(results["train_scaling"]), out / "train_scaling.png")
    plt.close("all")
    return made


def edge_plot(plt: Any, edge: list[dict[str, Any]]) -> Any:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [s["scenario"] for s in edge]
    width = 0.27
    for i, (key, label) in enumerate(
        (
            ("plain_head_images_per_s", "bare head, plain torch (baseline)"),
            ("prepared_head_images_per_s", "bare head, prepared as the extractor does"),
            ("system_images_per_s", "whole system (acknowledged by the cloud)"),
        )
    ):
        xs = [j + (i - 1) * width for j in range(len(names))]
        ax.bar(xs, [s[key] for s in edge], width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("images / s (2 edges)")
    ax.set_title("Edge throughput, medians")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def ablation_plot(plt: Any, ab: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    steps = ab["steps"]
    ax.barh([s["step"] for s in steps][::-1], [s["images_per_s"] for s in steps][::-1], color="tab:green")
    ax.axvline(ab["plain_head_images_per_s"], color="k", ls="--", lw=1, label="bare head, plain torch")
    ax.set_xlabel("images / s")
    ax.set_title(f"Extractor optimisations, end to end ({ab['scenario']})")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def transport_plot(plt: Any, tr: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(
        ["raw paho QoS 1", "MistNet protocol"],
        [tr["raw_mb_per_s"], tr["protocol_mb_per_s"]],
        color=["tab:gray", "tab:blue"],
    )
    for i, runs in enumerate((tr["raw_runs"], tr["protocol_runs"])):
        ax.plot([i] * len(runs), runs, "k.", ms=4)
    ax.set_ylabel("MB / s")
    ax.set_title(f"Transport ({tr['chunk_bytes'] // 1024} KiB chunks), ratio {tr['transport_ratio']:.2f}")
    fig.tight_layout()
    return fig


def scaling_plot(plt: Any, scaling: dict[str, Any]) -> Any:
    rows = scaling["rows"]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["edges"] for r in rows], [r["collect_s"] for r in rows], "o-")
    ax.set_xlabel("MNIST edges")
    ax.set_ylabel("collection wall time (s)")
    ax.set_xticks([r["edges"] for r in rows])
    ax.set_title(f"Scaling, {scaling['total_samples']} samples in all")
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    return fig


def memory_plot(plt: Any, mem: dict[str, Any]) -> Any:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, part, who in ((axes[0], mem["edge"], "edge"), (axes[1], mem["cloud"], "cloud")):
        for label, run in part["runs"].items():
            traces = run["rss_trace"]
            trace_key = "cloud" if who == "cloud" else next((k for k in traces if k != "cloud"), "")
            if trace_key and traces.get(trace_key):
                ax.plot(
                    [t for t, _ in traces[trace_key]],
                    [r for _, r in traces[trace_key]],
                    label=f"{label} ({run['images']} img)",
                )
        ax.set_title(f"{who} RSS ({part['scenario']})", fontsize=9)
        ax.set_xlabel("s")
        ax.set_ylabel("MiB")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# Markdown ------------------------------------------------------------------------------------------


def _f(x: Any, nd: int = 2) -> str:
    v = _finite(x)
    return "n/a" if math.isnan(v) else f"{v:.{nd}f}"


# The page's fixed text, in blocks with $fields (the sections below fill them in and add the tables).
TEMPLATE = Path(__file__).resolve().parent / "templates" / "benchmarks.md"


@functools.cache
def _blocks() -> dict[str, str]:
    """The template's blocks by name: each runs from its ``<!-- name -->`` line to the next one."""
    blocks: dict[str, list[str]] = {}
    lines: list[str] = []  # what comes before the first block: the template's own comment
    for line in TEMPLATE.read_text().splitlines():
        if (marker := re.fullmatch(r"<!-- (\w+) -->", line)) is not None:
            lines = blocks[marker[1]] = []
        else:
            lines.append(line)
    return {name: "\n".join(text) for name, text in blocks.items()}


def block(name: str, **fields: Any) -> list[str]:
    """The lines of the template's block ``name`` with its fields filled in."""
    return string.Template(_blocks()[name]).substitute(fields).split("\n")


def markdown(results: dict[str, Any], summary: dict[str, Any], images: dict[str, Path], doc: Path) -> str:
    def rel(p: Path) -> str:
        return os.path.relpath(p.resolve(), doc.parent.resolve())

    lines = head_section(results, summary, rel(Path(results["out"])))
    lines += edge_section(results, rel(images["edge"]), rel(images["ablation"]) if "ablation" in images else "")
    lines += runtimes_section(results["runtimes"])
    lines += transport_section(results["transport"], rel(images["transport"]))
    lines += training_section(results["train"])
    scaling_plot = rel(images["train_scaling"]) if "train_scaling" in images else ""
    lines += train_scaling.section(results.get("train_scaling"), scaling_plot)
    lines += memory_section(results["memory"], rel(images["memory"]))
    lines += scaling_section(results["scaling"], rel(images["scaling"]))
    lines += profiles_section(results)
    lines += gpu_section(doc)
    lines += cloud_changes_section(results, summary)
    lines += block("segment_spool")  # issue 14, measured 2026-12-05: the SQLite-only spool no longer exists to run
    lines += experiments_section()
    lines += block("notes")
    lines += [*block("how_to_run"), ""]
    return "\n".join(lines)


# The places of the summary table's figures: decimals shown.
SUMMARY_DECIMALS = {
    "edge_throughput_ratio": 2, "edge_overhead_ratio": 2, "edge_cpu_ratio": 2, "edge_cpu_overhead_ratio": 2,
    "wire_bytes_ratio": 4, "transport_ratio": 2, "train_throughput_ratio": 2, "train_throughput_ratio_mnist": 2,
    "edge_peak_rss_mib": 0, "edge_rss_growth": 3, "cloud_rss_growth": 3, "onnx_edge_peak_rss_mib": 0,
    "onnx_edge_throughput_ratio": 2, "edge_installed_mb": 0,
}  # fmt: skip


def head_section(results: dict[str, Any], summary: dict[str, Any], raw: str) -> list[str]:
    """Title, the run's machine and load, and the summary table against the goals."""
    m, load, mem = results["machine"], results["load"], results["memory"]
    mark = {True: "met", False: "**not met**"}
    lines = block(
        "head",
        results=raw, profile=results["profile"], device=results["device"], date=m.get("date"), cpus=m.get("cpus"),
        cpu=m.get("cpu"), memory_gib=m.get("memory_gib"), torch=m.get("torch"),
        mosquitto=m.get("mosquitto", "mosquitto"), minutes=f"{results['seconds'] / 60:.1f}",
        load_median=load["loadavg_1min_median"], load_max=load["loadavg_1min_max"], load_cpus=load["cpus"],
        cpu_percent=load["cpu_percent_median"], edge_scenario=mem["edge"]["scenario"], factor=mem["factor"],
        runtimes_scenario=results["runtimes"]["scenario"],
        **{key: _f(summary[key], nd) for key, nd in SUMMARY_DECIMALS.items()},
        **{f"met_{key}": mark[met] for key, met in summary["goals_met"].items()},
    )  # fmt: skip
    if summary.get("wire_mb_128_yolov5s_640"):
        lines += [
            f"Bytes on the wire for 128 images of yolov5s at 640 px (cut 4): "
            f"**{summary['wire_mb_128_yolov5s_640']:.1f} MB**, against the reference system's "
            f"{REFERENCE_MB_PER_EDGE} MB per edge (float32 tensors, pickled): "
            f"{REFERENCE_MB_PER_EDGE / summary['wire_mb_128_yolov5s_640']:.0f}x less.",
            "",
        ]
    return lines


def edge_section(results: dict[str, Any], plot: str, ablation_plot: str) -> list[str]:
    """Edge throughput and wire efficiency per scenario, and what each extractor optimisation is worth."""
    edge = results["edge"]
    first = edge["scenarios"][0]
    lines = block(
        "edge", images=first["images"], edges=first["edges"], threads=first["threads_per_edge"],
        epsilon=f"{edge['epsilon']:g}", transfer_batch=edge["transfer_batch"],
    )  # fmt: skip
    for s in edge["scenarios"]:
        c = s["cpu_s_per_image"]
        lines.append(
            f"| {s['scenario']} | {_f(s['plain_head_images_per_s'])} | {_f(s['prepared_head_images_per_s'])} | "
            f"{_f(s['system_images_per_s'])} | **{_f(s['edge_throughput_ratio'])}** "
            f"({_f(s['ratio_spread'][0])}–{_f(s['ratio_spread'][1])}) | {_f(s['edge_overhead_ratio'])} | "
            f"{_f(c['plain_head'], 3)} · {_f(c['prepared_head'], 3)} · {_f(c['system_edges'], 3)} · "
            f"{_f(c['system_cloud'], 4)} · {_f(c['system_broker'], 4)} | {_f(s['wire_bytes_per_image'], 0)} | "
            f"{_f(s['activation_bytes_per_image'], 0)} | **{_f(s['wire_ratio'], 4)}** | "
            f"{_f(s['edge_peak_rss_mib'], 0)} |"
        )
    lines += ["", f"![edge throughput]({plot})", ""]
    if edge.get("ablation"):
        ab = edge["ablation"][0]
        lines += block("ablation", scenario=ab["scenario"], images=ctx_images(results))
        lines += [f"| {s['step']} | {_f(s['images_per_s'])} | {_f(s['ratio_to_plain_head'])} |" for s in ab["steps"]]
        lines += ["", f"![ablation]({ablation_plot})", ""]
    return lines


def transport_section(tr: dict[str, Any], plot: str) -> list[str]:
    """The protocol against raw paho through the same broker."""
    lines = block(
        "transport", megabytes=f"{tr['megabytes']:.0f}", transfers=tr["transfers"],
        transfer_bytes=f"{tr['transfer_bytes']:,}", chunk_kib=tr["chunk_bytes"] // 1024, window=tr["window"],
        spilled=tr.get("protocol_spilled_chunks", "n/a"), acks=_f(tr.get("protocol_acks_per_transfer"), 2),
    )  # fmt: skip
    cpu = tr["cpu_s_per_mb"]
    raw_cpu = " · ".join(_f(v, 4) for v in cpu["raw"].values())
    proto_cpu = " · ".join(_f(v, 4) for v in cpu["protocol"].values())
    return [
        *lines,
        f"| raw paho QoS 1 | {_f(tr['raw_mb_per_s'], 1)} | {', '.join(_f(x, 0) for x in tr['raw_runs'])} | {raw_cpu} |",
        f"| MistNet protocol | {_f(tr['protocol_mb_per_s'], 1)} | {', '.join(_f(x, 0) for x in tr['protocol_runs'])} "
        f"| {proto_cpu} |",
        f"| **ratio** | **{_f(tr['transport_ratio'])}** | | |",
        "",
        f"![transport]({plot})",
        "",
    ]


def training_section(train: dict[str, Any]) -> list[str]:
    """The trainer reading the spool against a plain loop over the same batches in memory."""
    lines = block("training", threads=train["threads"], device=train["device"])
    for t in [*train["yolo"], train["mnist"]]:
        lines.append(
            f"| {t['task']} ({t['loss'].split(' ')[0].rsplit('.', 1)[-1]}) | {t['samples']} | {t['batch_size']} | "
            f"{_f(t['plain_images_per_s'], 1)} | {_f(t['spool_images_per_s'], 1)} | "
            f"**{_f(t['train_throughput_ratio'])}** | {_f(t['spool_read_images_per_s'], 0)} |"
        )
    mn = train["mnist"]
    if "spool_2_workers_ratio" in mn:
        lines += [
            "",
            *block("training_workers", images_per_s=_f(mn["spool_2_workers_images_per_s"], 1),
                   ratio=_f(mn["spool_2_workers_ratio"])),
        ]  # fmt: skip
    return lines


def memory_section(mem: dict[str, Any], plot: str) -> list[str]:
    """Peak RSS of the edge and the cloud, and its growth with the data."""
    factor = mem["factor"]
    lines = block(
        "memory", edge_scenario=mem["edge"]["scenario"], cloud_scenario=mem["cloud"]["scenario"], factor=factor
    )
    for part in ("edge", "cloud"):
        for label, run in mem[part]["runs"].items():
            lines.append(
                f"| {part} {mem[part]['scenario']} {label} | {run['images']} | {_f(run['edge_peak_rss_mib'], 0)} "
                f"({_f(run.get('edge_sampled_peak_mib'), 0)}) | {_f(run['cloud_peak_rss_mib'], 0)} "
                f"({_f(run.get('cloud_sampled_peak_mib'), 0)}) | {run['phase']} |"
            )
    growth = block(
        "memory_growth", factor=factor, edge_growth=_f(mem["edge"]["edge_rss_growth"], 3),
        cloud_collect_growth=_f(mem["edge"]["cloud_collect_rss_growth"], 3),
        cloud_growth=_f(mem["cloud"]["cloud_rss_growth"], 3),
    )  # fmt: skip
    return [*lines, "", *growth, "", f"![memory]({plot})", ""]


def scaling_section(sc: dict[str, Any], plot: str) -> list[str]:
    """Collection wall time as MNIST edges are added."""
    lines = block("scaling", total_samples=sc["total_samples"], max_edges=max(r["edges"] for r in sc["rows"]))
    for r in sc["rows"]:
        c = r["cpu_s"]
        lines.append(
            f"| {r['edges']} | {_f(r['collect_s'])} | {', '.join(_f(x) for x in r['collect_runs'])} | "
            f"{_f(r['last_ready_s'])} | {_f(c['edges'])} · {_f(c['cloud'])} · {_f(c['broker'])} |"
        )
    return [*lines, "", f"![scaling]({plot})", ""]


def profiles_section(results: dict[str, Any]) -> list[str]:
    """The top functions of the edge and the cloud, by cProfile and py-spy, where the run profiled them."""
    sc = results["scaling"]
    profiles = [*results["edge"].get("profiles", []), *([sc["profiles"]] if sc.get("profiles") else [])]
    if not profiles:
        return []
    lines = ["## Where the time goes", ""]
    for p in profiles:
        what = p.get("scenario") or f"MNIST, {p.get('edges')} edges"
        for key, title in (
            ("edge_cprofile", "edge, cProfile (tottime)"),
            ("cloud_cprofile", "cloud (offer + collect), cProfile (tottime)"),
        ):
            if p.get(key):
                lines += [f"**{what}: {title}**", "", "| function | calls | tottime s | cumtime s |"]
                lines.append("|---|---|---|---|")
                lines += [
                    f"| `{r['function']}` | {r['calls']} | {r['tottime_s']} | {r['cumtime_s']} |" for r in p[key][:10]
                ]
                lines.append("")
        if p.get("edge_pyspy"):
            lines += [f"**{what}: edge, py-spy (share of active samples, self)**", "", "| function | share |"]
            lines.append("|---|---|")
            lines += [f"| `{r['function']}` | {r['share']:.1%} |" for r in p["edge_pyspy"][:10]]
            lines.append("")
    return lines


def runtimes_section(rt: dict[str, Any]) -> list[str]:
    """The torch and onnx edges side by side, and (from ``python -m bench.agreement``) how often their
    released levels differ."""
    lines = [
        "## Torch and onnx edges",
        "",
        f"Measured {rt.get('date', 'in the run above')}: one edge with {rt['threads']} thread(s), {rt['images']} "
        f"COCO128 images of {rt['scenario']} at cut 4, "
        "the real cloud, mosquitto on loopback; `mistnet edge --runtime torch` and `--runtime onnx` alternate "
        "(images/s from the resume acknowledgement to the last committed transfer; peak RSS of the edge "
        "process). The onnx edge imports no torch: it runs the cloud's ONNX export of the head with ONNX "
        "Runtime and quantizes, randomizes and packs with the same numpy code as the torch edge. Installed "
        "size: the files of the base dependencies and the extra, with everything they require, as installed "
        "here (`python -m bench.installed`; this machine's torch is the CUDA build).",
        "",
        "| runtime | img/s | ÷ torch | edge peak RSS MiB | edge CPU s/img | wire B/img | installed MB |",
        "|---|---|---|---|---|---|---|",
    ]
    extra = {"torch": "edge-torch", "onnx": "edge"}
    for r in ("torch", "onnx"):
        ratio = _f(rt["onnx_throughput_ratio"]) if r == "onnx" else "1"
        lines.append(
            f"| {r} | {_f(rt[r]['images_per_s'])} | {ratio} | {_f(rt[r]['edge_peak_rss_mib'], 0)} | "
            f"{_f(rt[r]['edge_cpu_s_per_image'], 3)} | {_f(rt[r]['wire_bytes_per_image'], 0)} | "
            f"{_f(rt['installed_mb'][extra[r]], 0)} (`mistnet[{extra[r]}]`) |"
        )
    lines.append("")
    agreement, load = RESULTS / "agreement.json", RESULTS / "load.json"
    if agreement.is_file():
        lines += agreement_lines(json.loads(agreement.read_text()))
    if load.is_file():
        lines += load_lines(json.loads(load.read_text()))
    return lines


def load_lines(data: dict[str, Any]) -> list[str]:
    """What ``python -m bench.load`` measured: many light edges through one broker."""
    check = data["spool_check"]
    return [
        f"### {data['edges']} {data['runtime']} edges through one mosquitto",
        "",
        f"`python -m bench.load`: {data['edges']} `mistnet edge --runtime {data['runtime']}` processes (one thread "
        f"each) and one cloud agent collecting {data['samples']:,} MNIST digits (LeNet-5, cut 2) through one "
        f"mosquitto: **every sample stored exactly once: {'yes' if data['exactly_once'] else 'no'}** "
        f"({check['samples']:,} samples of {check['nodes']} nodes in the spool). Collected "
        f"{_f(data['collect_s'], 1)} s after the offer. Peak RSS: edges {_f(data['edge_peak_rss_mib_max'], 0)} MiB "
        f"at most (mean {_f(data['edge_peak_rss_mib_mean'], 0)}, {_f(data['edges_peak_rss_mib_sum'] / 1024, 1)} GiB "
        f"together), cloud {_f(data['cloud_peak_rss_mib'], 0)} MiB, mosquitto "
        f"{_f(data['broker_peak_rss_mib'], 1)} MiB. With torch edges the load test (`tests/test_load.py`) "
        "stays at 16.",
        "",
    ]


def agreement_lines(data: dict[str, Any]) -> list[str]:
    lines = [
        "### Do they release the same levels?",
        "",
        "`python -m bench.agreement`: the torch edge's head (BatchNorm folded, channels-last) and the onnx "
        "edge's run on the same letterboxed images; the fraction of activations whose level *before* "
        "randomization differs, with `x > 0` and with 1-bit thresholds calibrated as the cloud calibrates "
        "them (on public images). *Raw quantiles* are the per-channel medians as calibration used to leave "
        "them, on activation values many samples share up to rounding (the letterbox padding's): there float "
        "rounding decides the level; calibration now moves each threshold past the public values within "
        "2^-12 of it, to the middle of the next gap (`common.privacy.off_ties`). yolov5s runs with random "
        "weights (no yolov5s checkpoint is at hand): it exercises the shapes and kernels, not trained "
        f"activations. Goal: under {data['goal']:.1%}; worst of `x > 0` and calibrated: {data['worst']:.2e}.",
        "",
        "| model | weights | images | cut | outputs | x > 0 | calibrated | raw quantiles |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        weights = Path(r["weights"]).name if r["weights"] != "random init" else "random init"
        lines.append(
            f"| {r['arch']} | {weights} | {r['images']} | {r['cut']} | {r['outputs']} | "
            f"{r['disagreement x>0']:.1e} | {r['disagreement calibrated']:.1e} | "
            f"{r['disagreement raw quantiles']:.1e} |"
        )
    return [*lines, ""]


def gpu_section(doc: Path) -> list[str]:
    """The last run on a lent GPU, when its results were saved under bench/results/cuda-quick/."""
    folder = Path(__file__).resolve().parent / "results" / "cuda-quick"
    edge_file, summary_file = folder / "edge640-cuda.json", folder / "summary.json"
    if not edge_file.exists():
        return []
    data = json.loads(edge_file.read_text())
    m = data.get("machine", {})
    lines = [
        "## On a GPU",
        "",
        f"`--device cuda` on a lent {m.get('gpu', 'GPU')} ({m.get('cpus')} CPUs, torch {m.get('torch')}, "
        f"{m.get('date')}): the edge benchmark at 640 px, COCO128 on 2 edges with "
        f"{data['scenarios'][0]['threads_per_edge']} intra-op threads each, {len(data['scenarios'][0]['system_runs'])} "
        "interleaved repeats. There the edges are bound by JPEG decoding and letterboxing on the CPU, not by the "
        "head.",
        "",
        "| scenario | plain head img/s | prepared head img/s | system img/s | ratio | CPU ratio | wire ratio | "
        "edge peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in data["scenarios"]:
        lines.append(
            f"| {s['scenario']} | {_f(s['plain_head_images_per_s'], 1)} | {_f(s['prepared_head_images_per_s'], 1)} | "
            f"{_f(s['system_images_per_s'], 1)} | {_f(s['edge_throughput_ratio'])} "
            f"({_f(s['ratio_spread'][0])}–{_f(s['ratio_spread'][1])}) | {_f(s['edge_cpu_ratio'])} | "
            f"{_f(s['wire_ratio'], 4)} | {_f(s['edge_peak_rss_mib'], 0)} |"
        )
    if summary_file.exists():
        q = json.loads(summary_file.read_text())
        lines += [
            "",
            f"`mistnet bench --quick --device cuda` on a lent {q.get('machine', {}).get('gpu', 'GPU')} "
            f"({q.get('machine', {}).get('date')}; {os.path.relpath(folder, doc.parent)}/): "
            f"transport ratio {_f(q['transport_ratio'])}, training ratio {_f(q['train_throughput_ratio'])} "
            f"(YOLO, 8 images; the trainer with AMP against a plain fp32 loop) and "
            f"{_f(q['train_throughput_ratio_mnist'])} (MNIST), edge peak RSS {_f(q['edge_peak_rss_mib'], 0)} MiB "
            "(a CUDA context adds ~400 MiB on the host). The torch/onnx edge comparison of that run ran on the CPU "
            "(the onnx edge runs on the CPU only).",
        ]
    lines.append("")
    return lines


# The last full run before issue #6 changed the cloud's receive path and the trainer's data path
# (docs/benchmarks.md of that run): what the section below compares this run with.
BEFORE_ISSUE_6 = {
    "date": "2026-11-26 19:03 UTC",
    "loadavg": 4.68,
    "transport_ratio": 0.07,
    "protocol_mb_per_s": 28.7,
    "raw_mb_per_s": 359.7,
    "receiver_cpu_s_per_mb": 0.0186,
    "train_throughput_ratio": 1.12,
    "train_throughput_ratio_mnist": 0.58,
}


def cloud_changes_section(results: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """Issue #6: the cloud's receive path and the trainer's data path, before and after."""
    b = BEFORE_ISSUE_6
    tr = results["transport"]
    proto_cpu = sum(tr["cpu_s_per_mb"]["protocol"].values())
    cpus = int(summary["machine"]["cpus"])
    return block(
        "cloud_changes", before_date=b["date"], before_loadavg=b["loadavg"],
        before_transport_ratio=_f(b["transport_ratio"]), before_protocol_mb_per_s=_f(b["protocol_mb_per_s"], 1),
        before_raw_mb_per_s=_f(b["raw_mb_per_s"], 1), before_receiver_cpu_s_per_mb=_f(b["receiver_cpu_s_per_mb"], 4),
        before_train_throughput_ratio=_f(b["train_throughput_ratio"]),
        before_train_throughput_ratio_mnist=_f(b["train_throughput_ratio_mnist"]),
        transport_ratio=_f(summary["transport_ratio"]), protocol_mb_per_s=_f(tr["protocol_mb_per_s"], 1),
        raw_mb_per_s=_f(tr["raw_mb_per_s"], 1),
        receiver_cpu_s_per_mb=_f(tr["cpu_s_per_mb"]["protocol"].get("proto-recv"), 4),
        train_throughput_ratio=_f(summary["train_throughput_ratio"]),
        train_throughput_ratio_mnist=_f(summary["train_throughput_ratio_mnist"]),
        protocol_cpu=_f(proto_cpu, 4), raw_cpu=_f(sum(tr["cpu_s_per_mb"]["raw"].values()), 4), cpus=cpus,
        ceiling=_f(cpus / proto_cpu, 0),
    )  # fmt: skip


def experiments_section() -> list[str]:
    """What each change is worth, measured by ``python -m bench.experiments`` (its last saved run)."""
    path = Path(__file__).resolve().parent / "results" / "experiments.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    tr, tm = data["transport"], data["training_mnist"]
    if "as shipped" not in tr["arms"]:  # results of an older version of the experiments
        return []
    lines = [
        "## What each cloud-side change is worth, measured",
        "",
        f"`python -m bench.experiments` ({data['machine'].get('date')}, load average median "
        f"{data['load']['loadavg_1min_median']}): the transport run with one change undone at a time (options of "
        "`bench.procs proto-recv`), interleaved with the system as shipped and raw paho; and the MNIST training "
        "epoch with the data path before issue #6.",
        "",
        f"Transport, {tr['megabytes']:.0f} MB (raw paho {_f(tr['raw_mb_per_s'], 0)} MB/s):",
        "",
        "| cloud side | MB/s | ratio to raw paho | cloud CPU s per MB | chunks persisted early |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {_f(v['mb_per_s'], 1)} | {_f(v['ratio_to_raw'])} | {_f(v['receiver_cpu_s_per_mb'], 4)} | "
        f"{_f(v['spilled_chunks'], 0)} |"
        for k, v in tr["arms"].items()
    ]
    lines += [
        "",
        f"Training, LeNet-5/MNIST, {tm['samples']} samples, {tm.get('threads', '?')} threads:",
        "",
        "| data path | img/s | ratio to plain loop |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {_f(v['images_per_s'], 0)} | {_f(v['ratio_to_plain'])} |" for k, v in tm["arms"].items()]
    lines.append("")
    return lines


def ctx_images(results: dict[str, Any]) -> int:
    return int(results.get("ablation_images", 0)) or int(results["edge"]["scenarios"][0]["images"])


def render(out: Path, docs: Path) -> Path:
    """Plots and the markdown page again from the JSON of an earlier run (no measuring)."""
    results: dict[str, Any] = json.loads((out / "run.json").read_text())
    for key in ("edge", "runtimes", "transport", "train", "memory", "scaling", "train_scaling"):
        if (out / f"{key}.json").exists():  # train_scaling: not in runs made before it existed
            results[key] = json.loads((out / f"{key}.json").read_text())
    results["out"] = str(out)  # the folder read, wherever the run that wrote it put it
    results.setdefault("ablation_images", 64)
    summary = summarize(results)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    images = plots(results, out)
    docs.write_text(markdown(results, summary, images, docs))
    return docs


if __name__ == "__main__":
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"
    page = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    print(render(target, page))
