"""``mistnet bench``: every benchmark in one run, then the results, plots and the markdown page."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import PARTS, edge, memory, report, runtimes, scaling, train, train_scaling, transport
from bench.profiles import PROFILES
from bench.util import BenchError, Context, LoadRecord, bench_broker, coco_images, default_docs, default_out, machine

MODULES = dict(zip(PARTS, (edge, runtimes, transport, train, memory, scaling, train_scaling), strict=True))


def check_device(device: str) -> None:
    from edge_agent.torch_head import check_device as check

    check(device)


def run_bench(
    profile: str = "full",
    device: str = "cpu",
    out: Path | None = None,
    docs: Path | None = None,
    log: Callable[[str], None] = print,
    keep: bool = False,
    only: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the benchmarks of ``profile`` and write results; returns the summary object. ``only``:
    these parts alone, the page rendered again with the other parts' results of an earlier run."""
    from broker.launcher import find_mosquitto

    if profile not in PROFILES:
        raise BenchError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    check_device(device)
    if find_mosquitto() is None:
        raise BenchError("mosquitto is not installed (apt-get install mosquitto): the benchmarks need it")
    coco_images(1)
    prof = PROFILES[profile]
    out = out or default_out(profile)
    docs = docs or default_docs(profile, out)
    workdir = Path(tempfile.mkdtemp(prefix=f"mistnet-bench-{profile}-"))
    log(f"mistnet bench: profile {profile}, device {device}, scratch {workdir}")
    load = LoadRecord().start()
    started = time.monotonic()
    results: dict[str, Any] = {
        "profile": profile,
        "device": device,
        "machine": machine(),
        "out": str(out),
        "ablation_images": prof.ablation_images,
    }
    try:
        with bench_broker(workdir / "broker").start() as broker:
            pid = broker.process.pid if broker.process else None
            ctx = Context(prof, device, workdir, broker.url, log, broker_pid=pid)
            for name in only or PARTS:
                t = time.monotonic()
                results[name] = MODULES[name].run(ctx)
                log(f"{name}: {time.monotonic() - t:.0f} s")
    finally:
        results["load"] = load.stop()
        if not keep and all(k in results for k in only or PARTS):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"scratch folder kept: {workdir}")
    results["seconds"] = time.monotonic() - started
    if only:
        return part_results(results, only, out, docs, log)
    summary = report.summarize(results)
    report.write_results(results, summary, out)
    images = report.plots(results, out)
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(report.markdown(results, summary, images, docs))
    log(f"results in {out}, page {docs}")
    return summary


def part_results(
    results: dict[str, Any], only: Sequence[str], out: Path, docs: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """``--only``: each part's JSON, then the page again from everything in ``out``."""
    for name in only:
        report.write_part(out, name, results[name])
    docs.parent.mkdir(parents=True, exist_ok=True)
    report.render(out, docs)
    log(f"results in {out}, page {docs}")
    return {"profile": results["profile"], "device": results["device"], **{k: results[k] for k in only}}
