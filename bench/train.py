"""Training throughput: the cloud's trainer reading the spool, against a plain loop over tensors.

The spool is filled with real features (the edge extractor on COCO128 or MNIST, randomized at the
profile's ε, committed as the collector commits transfers). *System*: ``Trainer.train_epoch`` over
``Trainer.loader`` (``SpoolFeatures.__getitems__``: one SQLite query per batch, the batch's bits
unpacked at once by the task's ``collate``; learning-rate schedule, gradient clipping, the task's
loss). *Baseline*: the same tail, loss and optimizer in a plain loop over the same batches already
decoded in memory. Both run
in this process with the same threads, one epoch each, interleaved, after one untimed warm-up step.

YOLO scenarios use ``cloud_agent.tasks.detection.Detection`` (upstream's YOLOv5 loss); MNIST uses
``Classification`` (cross-entropy), where the tail is tiny and the data path weighs the most.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from bench.profiles import Scenario
from bench.util import COCO128, Context, median, paired_ratio
from cloud_agent.spool import Spool, SpoolFeatures
from cloud_agent.tasks import Batch, CloudTask
from cloud_agent.trainer import TrainConfig, Trainer, freeze_head, param_groups
from common.models.registry import build
from common.privacy import BitEncoder, feature_transform
from common.split import run_tail
from edge_agent.torch_head import TorchExtractor


def fill_spool(spool: Spool, node: str, model: nn.Module, cut: int, dataset: Any, batch: int, epsilon: float) -> int:
    """Features of every sample, extracted by a copy of ``model``'s head and committed as the
    collector commits verified transfers."""
    head = copy.deepcopy(model)
    extractor = TorchExtractor(head, cut, BitEncoder(epsilon), dataset, batch)
    spool.set_total(node, len(dataset))
    for t in range(extractor.transfers):
        spool.commit_transfer(node, extractor.extract(t))
    return spool.counts(node).samples


def plain_epoch(model: nn.Module, cut: int, task: CloudTask, batches: list[Batch], opt: torch.optim.Optimizer) -> None:
    model.train()
    for b in batches:
        out = run_tail(model, b.features, cut)
        loss, _ = task.loss(model, out, b.targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_task(
    ctx: Context, label: str, model: nn.Module, cut: int, task: CloudTask, dataset: Any, transfer: int, batch: int,
    repeats: int, workers_arm: bool = False,
) -> dict[str, Any]:  # fmt: skip
    device = ctx.device
    root = ctx.workdir / "train" / label
    root.mkdir(parents=True, exist_ok=True)
    spool = Spool(root / "spool.sqlite")
    samples = fill_spool(spool, "edge", model, cut, dataset, transfer, ctx.profile.epsilon)
    data = SpoolFeatures(spool, ["edge"])
    config = TrainConfig(
        epochs=max(1, repeats + 1), batch_size=batch, learning_rate=0.001, device=device, recalibrate_bn=False
    )
    spool_model = copy.deepcopy(model)
    trainer = Trainer(spool_model, cut, task, data, config, root / "state", feature_transform({}))
    plain_model, opt, batches = plain_arm(model, cut, task, data, config, batch)

    def spool_epoch(epoch: int, loader: DataLoader[Any] | None = None) -> None:
        trainer.train_epoch(loader or trainer.loader(torch.Generator().manual_seed(epoch)), epoch, None)

    def sync() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    # Warm-up, untimed: one whole epoch of each (the first epochs run several times slower here:
    # allocator, oneDNN primitive caches, thread pools).
    plain_epoch(plain_model, cut, task, batches, opt)
    spool_epoch(0)
    runs: dict[str, list[float]] = {"plain": [], "spool": [], "read": [], "workers": []}
    for r in range(repeats):

        def run_plain() -> None:
            plain_epoch(plain_model, cut, task, batches, opt)
            sync()

        def run_spool(loader: DataLoader[Any] | None = None, epoch: int = r + 1) -> None:
            spool_epoch(epoch, loader)
            sync()

        runs["plain"].append(timed(run_plain))
        runs["spool"].append(timed(run_spool))
        runs["read"].append(timed(lambda: [None for _ in trainer.loader(None, shuffle=False)]))
        if workers_arm:
            loader = workers_loader(trainer, spool.path, 2)
            runs["workers"].append(timed(lambda loader=loader: run_spool(loader)))  # type: ignore[misc]
        ctx.log(
            f"train {label} {r + 1}/{repeats}: plain {samples / runs['plain'][-1]:.1f} img/s, "
            f"spool {samples / runs['spool'][-1]:.1f} img/s"
        )
    spool.close()
    return throughput(label, samples, batch, runs)


def plain_arm(
    model: nn.Module, cut: int, task: CloudTask, data: SpoolFeatures, config: TrainConfig, batch: int
) -> tuple[nn.Module, torch.optim.Optimizer, list[Batch]]:
    """The baseline: a copy of ``model`` with the trainer's frozen head and optimizer, and the spool's
    batches decoded in memory once."""
    plain_model = copy.deepcopy(model).to(config.device)
    params = freeze_head(plain_model, cut)
    opt = torch.optim.SGD(
        param_groups(params, config.weight_decay), lr=config.learning_rate, momentum=config.momentum, nesterov=True
    )
    stored = [data[i] for i in range(len(data))]
    batches = [task.collate(stored[i : i + batch]).to(config.device) for i in range(0, len(stored), batch)]
    return plain_model, opt, batches


def throughput(label: str, samples: int, batch: int, runs: dict[str, list[float]]) -> dict[str, Any]:
    """Images per second of each arm (seconds per epoch in ``runs``) and the paired ratios."""
    plain_ips = [samples / s for s in runs["plain"]]
    spool_ips = [samples / s for s in runs["spool"]]
    out: dict[str, Any] = {
        "task": label,
        "samples": samples,
        "batch_size": batch,
        "plain_images_per_s": median(plain_ips),
        "spool_images_per_s": median(spool_ips),
        "plain_runs": plain_ips,
        "spool_runs": spool_ips,
        "train_throughput_ratio": paired_ratio(spool_ips, plain_ips),
        "spool_read_images_per_s": median([samples / s for s in runs["read"]]),
    }
    if runs["workers"]:
        w_ips = [samples / s for s in runs["workers"]]
        out["spool_2_workers_images_per_s"] = median(w_ips)
        out["spool_2_workers_ratio"] = paired_ratio(w_ips, plain_ips)
    return out


def workers_loader(trainer: Trainer, path: Path, workers: int) -> DataLoader[Any]:
    """The trainer's loader with worker processes, each opening its own spool connection: the
    change suggested for ``Trainer.loader`` (measured here, not used by the trainer)."""

    def reopen(_: int) -> None:
        info = torch.utils.data.get_worker_info()
        if info is not None:
            info.dataset.spool = Spool(path)  # type: ignore[attr-defined]

    return trainer.loader(None, num_workers=workers, worker_init_fn=reopen, persistent_workers=False)


def bench_yolo(ctx: Context, scn: Scenario) -> dict[str, Any]:
    from cloud_agent.tasks.detection import Detection
    from common.datasets.yolo import YoloEdgeDataset

    prof = ctx.profile
    model = build(scn.arch, 80)
    dataset = YoloEdgeDataset(COCO128, scn.imgsz, indices=list(range(prof.train_images)))
    val = ctx.workdir / "data" / "train-val"
    if not val.exists():
        from bench.util import coco_images, link_images

        link_images(coco_images(2), val)
    task = Detection(val, scn.imgsz)
    result = bench_task(
        ctx, scn.name, model, scn.cut, task, dataset, prof.transfer_batch, prof.train_batch, prof.train_repeats
    )
    result["loss"] = "cloud_agent.tasks.detection.Detection (YOLOv5 loss)"
    return result


def bench_mnist(ctx: Context) -> dict[str, Any]:
    from cloud_agent.tasks.classification import Classification
    from common.datasets.mnist import MnistShard, prepare_mnist
    from common.models.lenet import LeNet5

    prof = ctx.profile
    split = prepare_mnist(ctx.workdir / "data" / "mnist-train", 1)
    dataset = MnistShard(split.edges[0])
    if prof.mnist_train_samples < len(dataset):
        import numpy as np

        images, labels = dataset.images[: prof.mnist_train_samples], dataset.labels[: prof.mnist_train_samples]
        path = split.edges[0].with_name("train-subset.npz")
        np.savez(path, images=images, labels=labels)
        dataset = MnistShard(path)
    task = Classification(split.test)
    result = bench_task(
        ctx,
        "lenet5-mnist",
        LeNet5(),
        2,
        task,
        dataset,
        64,
        prof.mnist_train_batch,
        prof.train_repeats,
        workers_arm=True,
    )
    result["loss"] = "cloud_agent.tasks.classification.Classification (cross-entropy)"
    return result


def run(ctx: Context) -> dict[str, Any]:
    torch.set_num_threads(ctx.cpus)
    yolo = [bench_yolo(ctx, scn) for scn in ctx.profile.train]
    mnist = bench_mnist(ctx)
    return {"yolo": yolo, "mnist": mnist, "device": ctx.device, "threads": torch.get_num_threads()}
