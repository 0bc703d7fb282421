"""Training curves and a job report, from a cloud work directory.

* :func:`write_plots` draws ``loss.png`` (training loss per epoch: every part of the loss and their
  sum) and ``metrics.png`` (held-out metrics per epoch, with the value before training at epoch 0)
  with matplotlib's Agg canvas: no display, no pyplot state, safe in any thread.
* :func:`plot_workdir` is what :class:`cloud_agent.finish.Finish` calls once the checkpoint is
  written: the plots land next to ``final.safetensors``; a plotting problem is logged, never raised.
* :class:`JobReport` reads a work directory without changing it (the spool is opened read-only):
  the spool's meta (``phase``, ``history``, ``metrics_before``, ``checkpoint``, ``missing``), what
  each edge delivered, and the checkpoint's metadata. ``mistnet report JOBDIR`` prints it and writes
  ``report.md`` with the plots.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import sqlite3
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cloud_agent.trainer import History
from common.errors import MistnetError

log = logging.getLogger("mistnet.cloud.report")

LOSS_PNG = "loss.png"
METRICS_PNG = "metrics.png"
REPORT_MD = "report.md"
SPOOL = "spool.sqlite"
CHECKPOINT = "final.safetensors"
MAX_HEADER_BYTES = 16 * 1024 * 1024


class ReportError(MistnetError):
    """The directory is not a cloud work directory, or the report cannot be written."""


# Plots ------------------------------------------------------------------------------------------------


def _new_axes() -> Any:
    """One figure on the Agg canvas: no display, no global pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig.add_subplot()


def _save(ax: Any, path: Path, title: str, xlabel: str, ylabel: str, margins: tuple[float, float]) -> Path:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.margins(x=margins[0], y=margins[1])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.figure.savefig(path)
    return path


def write_plots(out_dir: Path, history: History, before: Mapping[str, float], job: str = "") -> list[Path]:
    """``loss.png`` and ``metrics.png`` in ``out_dir`` (each only when there is something to draw)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    epochs = history.epochs
    suffix = f" — {job}" if job else ""

    if epochs:
        ax = _new_axes()
        x = [e.epoch for e in epochs]
        parts = sorted({k for e in epochs for k in e.losses})
        if len(parts) > 1:
            for part in parts:
                ax.plot(x, [e.losses.get(part, math.nan) for e in epochs], marker="o", lw=1.2, label=part)
        total = [sum(e.losses.values()) if e.losses else math.nan for e in epochs]
        label = "total" if len(parts) > 1 else f"loss ({parts[0]})" if parts else "loss"
        ax.plot(x, total, marker="o", lw=2.2, color="black", label=label)
        written.append(_save(ax, out_dir / LOSS_PNG, f"Training loss per epoch{suffix}", "epoch", "training loss",
                             (0.08, 0.05)))

    names = sorted({k for e in epochs for k in e.metrics} | set(before))
    if names:
        ax = _new_axes()
        for name in names:
            points = [(e.epoch, e.metrics[name]) for e in epochs if name in e.metrics]
            if name in before:
                points.insert(0, (0, before[name]))
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            (line,) = ax.plot(xs, ys, marker="o", lw=2, label=name)
            if name in before:
                ax.plot([0], [before[name]], marker="s", ms=8, color=line.get_color(), ls="none")
            ax.annotate(f"{ys[-1]:.3f}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(6, 4))
        written.append(_save(ax, out_dir / METRICS_PNG, f"Held-out metrics per epoch{suffix}",
                             "epoch (0 = before training, square marker)", "metric on held-out data", (0.1, 0.12)))
    return written


def plot_workdir(workdir: Path, spool: Any, job: str = "") -> list[Path]:
    """The curves of a finished job next to its checkpoint; never raises (the job is done anyway)."""
    try:
        history = History.from_json(spool.get_meta("history"))
        before = json.loads(spool.get_meta("metrics_before") or "{}")
        paths = write_plots(workdir, history, before, job)
    except Exception as exc:  # a missing font or a full disk must not fail a trained job
        log.warning("could not draw the training curves in %s: %s", workdir, exc)
        return []
    log.info("training curves: %s", ", ".join(str(p) for p in paths) or "none (no epochs)")
    return paths


# Reading a work directory -------------------------------------------------------------------------------


@dataclass
class EdgeReport:
    node: str
    samples: int = 0
    skipped: int = 0
    total: int | None = None
    wire_bytes: int = 0
    missing_reason: str = ""

    @property
    def bytes_per_sample(self) -> float | None:
        return self.wire_bytes / self.samples if self.samples else None


@dataclass
class JobReport:
    workdir: str
    job: str
    phase: str
    started: float | None
    epochs: list[dict[str, Any]]
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    checkpoint: str | None
    edges: list[EdgeReport]
    model: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, workdir: Path) -> JobReport:
        meta, edges = read_spool(workdir)
        model = checkpoint_metadata(workdir / CHECKPOINT)
        history = History.from_json(meta.get("history"))
        with_metrics = [e for e in history.epochs if e.metrics]
        missing: dict[str, str] = json.loads(meta.get("missing") or "{}")
        for node, reason in missing.items():
            edges.setdefault(node, EdgeReport(node)).missing_reason = reason
        started = meta.get("started")
        return cls(
            workdir=str(workdir),
            job=str(model.get("job") or workdir.resolve().name),
            phase=meta.get("phase") or "pending",
            started=float(started) if started else None,
            epochs=[asdict(e) for e in history.epochs],
            metrics_before=json.loads(meta.get("metrics_before") or "{}"),
            metrics_after=dict(with_metrics[-1].metrics) if with_metrics else {},
            checkpoint=meta.get("checkpoint"),
            edges=[edges[n] for n in sorted(edges)],
            model=model,
        )

    @property
    def history(self) -> History:
        return History.from_json(json.dumps(self.epochs))

    def to_json(self) -> str:
        data = asdict(self)
        for edge, raw in zip(self.edges, data["edges"], strict=True):
            raw["bytes_per_sample"] = edge.bytes_per_sample
        return json.dumps(data, indent=2)


def read_spool(workdir: Path) -> tuple[dict[str, str], dict[str, EdgeReport]]:
    """The spool's meta table and per-edge totals, opened read-only (a running cloud is not disturbed)."""
    path = workdir / SPOOL
    if not path.is_file():
        raise ReportError(f"{path} does not exist: {workdir} is not a cloud work directory (mistnet cloud --workdir)")
    uri = path.resolve().as_uri()
    try:
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=5)
        try:
            return _query(db)
        finally:
            db.close()
    except sqlite3.OperationalError:
        pass
    # A WAL database whose -shm file cannot be created (read-only directory): read it as immutable.
    try:
        db = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=5)
        try:
            return _query(db)
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise ReportError(f"cannot read {path}: {exc}") from None


def _query(db: sqlite3.Connection) -> tuple[dict[str, str], dict[str, EdgeReport]]:
    meta = {str(k): str(v) for k, v in db.execute("SELECT key, value FROM meta")}
    edges: dict[str, EdgeReport] = {}
    for node, samples, skipped, wire in db.execute(
        "SELECT node, SUM(samples), SUM(skipped), SUM(wire_bytes) FROM transfers GROUP BY node"
    ):
        edges[node] = EdgeReport(node, int(samples or 0), int(skipped or 0), wire_bytes=int(wire or 0))
    for node, total in db.execute("SELECT node, total FROM nodes"):
        edges.setdefault(node, EdgeReport(node)).total = None if total is None else int(total)
    return meta, edges


def checkpoint_metadata(path: Path) -> dict[str, Any]:
    """The MistNet metadata of a safetensors checkpoint, read from its header alone ({} when absent)."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_HEADER_BYTES:
                return {}
            header = json.loads(f.read(size))
        value = json.loads(header.get("__metadata__", {}).get("mistnet", "{}"))
    except (OSError, struct.error, ValueError, AttributeError):
        return {}
    return value if isinstance(value, dict) else {}


# Rendering --------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _model_line(model: Mapping[str, Any]) -> str:
    if not model:
        return "-"
    parts = [str(model.get("arch", "?"))]
    if "cut_layer" in model:
        parts.append(f"cut_layer {model['cut_layer']}")
    if "epsilon" in model:
        parts.append(f"ε {model['epsilon']:g}, {model.get('bits', 1)} bit(s) per activation")
    if model.get("image_size"):
        parts.append(f"image {model['image_size']}")
    return ", ".join(parts)


def _loss(epoch: Mapping[str, Any]) -> float | None:
    losses = epoch.get("losses") or {}
    return float(sum(losses.values())) if losses else None


def render_text(report: JobReport) -> str:
    lines = [
        f"job {report.job}: {report.phase}  ({report.workdir})",
        f"  started     {_when(report.started)}",
        f"  model       {_model_line(report.model)}",
    ]
    if report.epochs:
        first, last = _loss(report.epochs[0]), _loss(report.epochs[-1])
        lines.append(f"  training    {len(report.epochs)} epoch(s), loss {_fmt(first)} -> {_fmt(last)}")
    else:
        lines.append("  training    no completed epoch")
    for name in sorted(set(report.metrics_before) | set(report.metrics_after)):
        lines.append(
            f"  {name:<11} {_fmt(report.metrics_before.get(name))} before -> {_fmt(report.metrics_after.get(name))}"
        )
    for e in report.edges:
        per = f", {e.bytes_per_sample:.1f} B/sample" if e.bytes_per_sample else ""
        of = f" of {e.total}" if e.total is not None else ""
        missing = f"  MISSING: {e.missing_reason}" if e.missing_reason else ""
        lines.append(f"  edge {e.node}: {e.samples}{of} samples, {e.skipped} skipped, {e.wire_bytes} B{per}{missing}")
    lines.append(f"  checkpoint  {report.checkpoint or '-'}")
    return "\n".join(lines)


def render_markdown(report: JobReport, plots: list[Path]) -> str:
    out = [
        f"# MistNet job `{report.job}`",
        "",
        "| | |",
        "|---|---|",
        f"| phase | {report.phase} |",
        f"| started | {_when(report.started)} |",
        f"| model | {_model_line(report.model)} |",
        f"| epochs | {len(report.epochs)} |",
        f"| checkpoint | `{report.checkpoint}` |" if report.checkpoint else "| checkpoint | - |",
        "",
        "## Edges",
        "",
        "| node | samples | skipped | of | wire bytes | bytes/sample | missing |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for e in report.edges:
        per = f"{e.bytes_per_sample:.1f}" if e.bytes_per_sample else "-"
        total = "-" if e.total is None else str(e.total)
        out.append(
            f"| {e.node} | {e.samples} | {e.skipped} | {total} | {e.wire_bytes} | {per} | {e.missing_reason or '-'} |"
        )
    if not report.edges:
        out.append("| - | 0 | 0 | - | 0 | - | no edge delivered anything |")
    names = sorted(set(report.metrics_before) | set(report.metrics_after))
    out += ["", "## Held-out metrics", ""]
    if names:
        out += ["| metric | before training | after training | change |", "|---|---:|---:|---:|"]
        for name in names:
            b, a = report.metrics_before.get(name), report.metrics_after.get(name)
            change = f"{a - b:+.4f}" if a is not None and b is not None else "-"
            out.append(f"| {name} | {_fmt(b)} | {_fmt(a)} | {change} |")
    else:
        out.append("No held-out data (the job sets no `cloud.validation`).")
    out += ["", "## Training", ""]
    for plot in plots:
        out += [f"![{plot.stem}]({plot.name})", ""]
    if report.epochs:
        metric_names = sorted({k for ep in report.epochs for k in ep["metrics"]})
        head = ["epoch", "loss", *metric_names, "seconds", "samples/s"]
        out += ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for ep in report.epochs:
            cells = [str(ep["epoch"]), _fmt(_loss(ep))]
            cells += [_fmt(ep["metrics"].get(n)) for n in metric_names]
            cells += [f"{ep['seconds']:.1f}", f"{ep['images_per_s']:.0f}"]
            out.append("| " + " | ".join(cells) + " |")
    else:
        out.append("No completed epoch yet.")
    return "\n".join(out) + "\n"


def write_report(workdir: Path, out_dir: Path | None = None) -> tuple[JobReport, Path, list[Path]]:
    """Read ``workdir`` and write the plots and ``report.md`` into ``out_dir`` (default: ``workdir``)."""
    report = JobReport.load(workdir)
    out = out_dir or workdir
    try:
        plots = write_plots(out, report.history, report.metrics_before, report.job)
        path = out / REPORT_MD
        path.write_text(render_markdown(report, plots))
    except OSError as exc:
        raise ReportError(f"cannot write the report into {out}: {exc.strerror or exc}") from None
    return report, path, plots
