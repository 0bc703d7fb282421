"""Training scaling: the tail's training throughput on 1..N processes (DDP under torchrun).

Spools are filled once with real features, as ``bench.train`` fills them (LeNet-5/MNIST cut 2,
and the profile's first YOLO training scenario). For each rank count,
``python -m torch.distributed.run --standalone --nproc-per-node N -m bench.train_scaling ...``
runs ``DistributedTrainer.train_epoch``, the path ``mistnet cloud --nproc-per-node`` trains with
(each rank its share of every global batch of the job's size, gradients averaged by DDP): one
untimed epoch, then ``epochs`` timed ones between barriers; rank 0 reports samples per second. On
the CPU every rank runs one intra-op thread (a rank is one core, as it is one GPU on CUDA, where
rank r uses GPU r). Efficiency = throughput(N) ÷ (N × throughput(1)). Rank counts run interleaved,
``repeats`` times; medians.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.util import BenchError, Context, child_env, median, spawn

# What one scenario trains: arch, cut, image size (0: the arch's default), samples, global batch.
TrainScenario = tuple[str, int, int, int, int]


def rank_counts(ctx: Context) -> list[int]:
    """1..N: the profile's counts on the CPU, every visible GPU on CUDA."""
    if torch.device(ctx.device).type == "cuda":
        return list(range(1, torch.cuda.device_count() + 1))
    return [n for n in ctx.profile.train_scaling_ranks if n <= ctx.cpus]


def fill(ctx: Context, name: str, scenario: TrainScenario) -> Path:
    """A spool of ``scenario``'s real features (node ``edge``)."""
    from bench.train import fill_spool
    from cloud_agent.spool import Spool
    from common.models.registry import build

    arch, cut, imgsz, samples, _ = scenario
    path = ctx.workdir / "train-scaling" / name / "spool.sqlite"
    spool = Spool(path)
    model = build(arch, 10 if arch == "lenet5" else 80)
    if arch == "lenet5":
        from common.datasets.mnist import MnistShard, prepare_mnist

        dataset: Any = MnistShard(prepare_mnist(ctx.workdir / "data" / "train-scaling", 1).edges[0])
        dataset.images, dataset.labels = dataset.images[:samples], dataset.labels[:samples]
        transfer = 64
    else:
        from bench.util import COCO128
        from common.datasets.yolo import YoloEdgeDataset

        dataset = YoloEdgeDataset(COCO128, imgsz, indices=list(range(samples)))
        transfer = ctx.profile.transfer_batch
    fill_spool(spool, "edge", model, cut, dataset, transfer, ctx.profile.epsilon)
    spool.close()
    return path


def launch(ctx: Context, name: str, scenario: TrainScenario, spool: Path, ranks: int) -> float:
    """One torchrun run of ``ranks`` processes: samples per second over the timed epochs."""
    arch, cut, imgsz, _, batch = scenario
    run = ctx.unique(f"{name}-{ranks}-")
    out = ctx.workdir / "train-scaling" / name / f"{run}.json"
    args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "bench.train_scaling",
            "--spool", str(spool), "--arch", arch, "--cut", str(cut), "--imgsz", str(imgsz), "--batch", str(batch),
            "--epochs", str(ctx.profile.train_scaling_epochs), "--device", ctx.device, "--out", str(out)]  # fmt: skip
    child = spawn(run, args, ctx.workdir / "logs" / "train-scaling", child_env(1))
    if child.wait(ctx.timeout()) != 0:
        raise BenchError(f"train scaling {name} on {ranks} rank(s) failed: see {child.log}")
    return float(json.loads(out.read_text())["samples_per_s"])


def measure(ctx: Context, name: str, scenario: TrainScenario, counts: list[int]) -> list[dict[str, Any]]:
    """One row per rank count: median samples/s of interleaved runs, and the efficiency."""
    spool = fill(ctx, name, scenario)
    runs: dict[int, list[float]] = {n: [] for n in counts}
    for r in range(ctx.profile.train_scaling_repeats):
        for n in counts:
            runs[n].append(launch(ctx, name, scenario, spool, n))
            ctx.log(f"train scaling {name}, {n} rank(s), run {r + 1}: {runs[n][-1]:.1f} samples/s")
    rates = {n: median(runs[n]) for n in counts}
    one = rates[counts[0]] / counts[0]  # one rank's throughput (counts start at 1)
    return [{"task": name, "ranks": n, "samples": scenario[3], "batch_size": scenario[4], "samples_per_s": rates[n],
             "runs": runs[n], "efficiency": rates[n] / (n * one)} for n in counts]  # fmt: skip


def run(ctx: Context) -> dict[str, Any]:
    from bench.util import LoadRecord, machine

    prof = ctx.profile
    scenarios: dict[str, TrainScenario] = {
        "lenet5-mnist": ("lenet5", 2, 0, prof.mnist_train_samples, prof.mnist_train_batch)
    }
    for yolo in prof.train[:1]:
        scenarios[yolo.name] = (yolo.arch, yolo.cut, yolo.imgsz, prof.train_images, prof.train_batch)
    counts = rank_counts(ctx)
    load = LoadRecord().start()
    rows = (
        [row for name, scenario in scenarios.items() for row in measure(ctx, name, scenario, counts)] if counts else []
    )
    return {"device": ctx.device, "threads_per_rank": 1, "epochs": prof.train_scaling_epochs, "rows": rows,
            "machine": machine(), "load": load.stop()}  # fmt: skip


# The report ---------------------------------------------------------------------------------------


def plot(data: dict[str, Any]) -> Any:
    """Per task: samples/s against ranks, next to perfect scaling (N × one rank)."""
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in data["rows"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = [r for r in data["rows"] if r["task"] == task]
        ranks = [r["ranks"] for r in rows]
        ax.bar(ranks, [r["samples_per_s"] for r in rows], color="tab:blue", label="measured (median)")
        ax.plot(ranks, [n * rows[0]["samples_per_s"] for n in ranks], "k--", lw=1, label="N × one rank")
        for r in rows:
            ax.annotate(
                f"{r['efficiency']:.2f}", (r["ranks"], r["samples_per_s"]), ha="center", va="bottom", fontsize=8
            )
        ax.set_xticks(ranks)
        ax.set_xlabel("ranks (DDP processes)")
        ax.set_ylabel("samples / s")
        ax.set_title(f"{task}, batch {rows[0]['batch_size']}", fontsize=9)
        ax.legend(fontsize=7)
    m, load = data.get("machine", {}), data.get("load", {})
    where = f"{m.get('cpus')} CPUs shared with other work, load {load.get('loadavg_1min_median')}"
    fig.suptitle(f"Tail training scaling, {data['device']} ({where}); labels: efficiency", fontsize=9)
    fig.tight_layout()
    return fig


def section(data: dict[str, Any] | None, image: str) -> list[str]:
    """The page's section: how the runs were made, on what, and the figures."""
    if not data or not data.get("rows"):
        return []
    m, load = data.get("machine", {}), data.get("load", {})
    lines = [
        "",
        "## Tail training on several processes (DDP)",
        "",
        "`mistnet cloud --nproc-per-node N` (or torchrun) trains the tail with DistributedDataParallel: each rank "
        "takes its share of every global batch of the job's size, DDP averages the gradients. Here spools of real "
        "features are trained by `DistributedTrainer.train_epoch` under `torch.distributed.run --standalone` with "
        f"1..N ranks ({data['threads_per_rank']} intra-op thread per rank on the CPU: a rank is one core; one GPU per "
        f"rank on CUDA), one untimed epoch then {data['epochs']} timed ones, rank counts interleaved. *Efficiency* = "
        "throughput(N) ÷ (N × throughput(1)).",
        "",
        f"Run: device `{data['device']}`, {m.get('date')}, {m.get('cpus')} × {m.get('cpu')}, torch {m.get('torch')}; "
        f"the machine is shared with other work (1-min load average median {load.get('loadavg_1min_median')}, max "
        f"{load.get('loadavg_1min_max')} on {load.get('cpus')} CPUs), so the ranks compete with it for the cores.",
        "",
        "| task | samples | global batch | ranks | samples/s (median) | runs | **efficiency** |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        runs = ", ".join(f"{x:.0f}" for x in r["runs"])
        lines.append(f"| {r['task']} | {r['samples']} | {r['batch_size']} | {r['ranks']} | {r['samples_per_s']:.1f} "
                     f"| {runs} | **{r['efficiency']:.2f}** |")  # fmt: skip
    return [
        *lines,
        "",
        "DDP is synchronous: every step waits for the slowest rank, so a rank that loses its core to other work "
        "stalls them all, and with one rank per core nothing is left over for the data path. LeNet-5's tail costs "
        "tens of microseconds per sample, so the per-step gradient all-reduce and Python overhead weigh most; "
        "YOLO's tail is compute-bound and scales better. Runs on a lent GPU, where there were any, are under"
        " *On a GPU* below.",
        "",
        f"![training scaling]({image})",
    ]


# The worker: one rank, started by torchrun ----------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from cloud_agent.distributed import Ranks
    from cloud_agent.spool import Spool, SpoolFeatures
    from cloud_agent.tasks import make_task
    from cloud_agent.trainer import TrainConfig
    from common.models.registry import build, default_image_size
    from common.privacy import feature_transform

    ranks = Ranks.join(args.device)
    spool = Spool(args.spool)
    data = SpoolFeatures(spool, ["edge"])
    model = build(args.arch, 10 if args.arch == "lenet5" else 80)
    task = make_task(args.arch, None, args.imgsz or default_image_size(args.arch))
    config = TrainConfig(epochs=args.epochs + 1, batch_size=args.batch, learning_rate=0.001, device=ranks.device,
                         recalibrate_bn=False)  # fmt: skip
    trainer = ranks.trainer(model, args.cut, task, data, config, args.out.parent / "state", feature_transform({}), None)

    def epoch(e: int) -> None:
        trainer.train_epoch(trainer.loader(torch.Generator().manual_seed(e)), e, None)
        if torch.device(ranks.device).type == "cuda":
            torch.cuda.synchronize()

    epoch(0)  # warm-up: allocator, oneDNN primitives, DDP buckets
    dist.barrier()
    t0 = time.perf_counter()
    for e in range(1, args.epochs + 1):
        epoch(e)
    dist.barrier()
    seconds = time.perf_counter() - t0
    if ranks.rank == 0:
        rate = len(data) * args.epochs / seconds
        args.out.write_text(json.dumps({"ranks": ranks.world_size, "seconds": seconds, "samples_per_s": rate}))
    spool.close()
    ranks.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="one rank of the training-scaling benchmark (run by torchrun)")
    p.add_argument("--spool", type=Path, required=True)
    p.add_argument("--arch", required=True)
    p.add_argument("--cut", type=int, required=True)
    p.add_argument("--imgsz", type=int, default=0)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True)
    worker(p.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
