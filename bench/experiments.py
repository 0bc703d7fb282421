"""What each change to the cloud's receive path and the trainer's data path is worth, measured:
``python -m bench.experiments [--quick]`` writes ``bench/results/experiments.json`` (rendered in
docs/benchmarks.md by the next ``mistnet bench``). Nothing here is used by the system.

- transport: the protocol run of ``bench.transport`` with one of the cloud's optimisations undone
  at a time (through ``bench.procs proto-recv`` options), and one suggestion not adopted (glibc's
  malloc thresholds raised in the cloud process), interleaved with the system as shipped and with
  raw paho; plus the system through a broker without ``set_tcp_nodelay``.
- training (MNIST, where the data path weighs the most): the trainer's epoch over the spool as
  shipped (one query and one vectorised unpack per batch), against the data path before issue #6
  (one query and one unpack per sample) and the plain in-memory loop.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench import transport
from bench.profiles import FULL, QUICK
from bench.util import MIB, RESULTS, Context, bench_broker, median, paired_ratio

# name -> (proto-recv options, extra environment of the cloud process, the edge's window in chunks)
TRANSPORT_ARMS: dict[str, tuple[list[str], dict[str, str], int | None]] = {
    "as shipped": ([], {}, None),
    "no in-memory assembly: each chunk persisted in its own transaction, then copied into samples": (
        ["--hold-s", "0", "--max-batch-bytes", "1"],
        {},
        None,
    ),
    "segment file not fsync'd before each commit (safe against a crash of the cloud, not of the machine)": (
        ["--no-segment-sync"],
        {},
        None,
    ),
    "each batch fsync'd and committed before the next batch is handled (no pipelining)": (
        ["--no-pipeline"],
        {},
        None,
    ),
    "Nagle's algorithm on the cloud's connection": (["--nagle"], {}, None),
    "glibc's malloc defaults in the cloud (no reuse of large buffers)": (["--default-malloc"], {}, None),
    "window of 16 chunks (4 MiB) instead of 64": ([], {}, 16),
}
NAGLE_BROKER_ARM = "broker without set_tcp_nodelay (mosquitto's default)"


def transport_arms(ctx: Context, plain_broker: tuple[str, int | None], mib: int, repeats: int) -> dict[str, Any]:
    from common import constants as C

    blob = transport.transfer_bytes()
    transfers = max(1, round(mib * MIB / blob))
    chunks = transfers * math.ceil(blob / C.DEFAULT_CHUNK_BYTES)
    raw: list[float] = []
    arms: dict[str, list[dict[str, Any]]] = {k: [] for k in [*TRANSPORT_ARMS, NAGLE_BROKER_ARM]}
    for r in range(repeats):
        raw.append(transport.run_raw(ctx, chunks, C.DEFAULT_CHUNK_BYTES)["mb_per_s"])
        for name, (extra, env, window) in TRANSPORT_ARMS.items():
            arms[name].append(transport.run_proto(ctx, transfers, extra, env, window=window))
        arms[NAGLE_BROKER_ARM].append(transport.run_proto(ctx, transfers, broker=plain_broker))
        ctx.log(
            f"transport arms {r + 1}/{repeats}: raw {raw[-1]:.0f} MB/s, "
            + ", ".join(f"{k[:24]} {v[-1]['mb_per_s']:.0f}" for k, v in arms.items())
        )
    out: dict[str, Any] = {}
    for name, runs in arms.items():
        rates = [x["mb_per_s"] for x in runs]
        out[name] = {
            "mb_per_s": median(rates),
            "ratio_to_raw": paired_ratio(rates, raw),
            "runs": rates,
            "receiver_cpu_s_per_mb": median([x["cpu_s"]["proto-recv"] / (x["bytes"] / 1e6) for x in runs]),
            "spilled_chunks": median([x["spilled_chunks"] for x in runs]),
        }
    return {"megabytes": transfers * blob / 1e6, "raw_mb_per_s": median(raw), "raw_runs": raw, "arms": out}


class PerSample(torch.utils.data.Dataset[Any]):
    """The spool read one sample (one query) at a time: the data path before issue #6."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        return self.data[index]


def per_sample_collate(samples: list[Any]) -> Any:
    """The collate before issue #6: each sample's bits unpacked on their own, then stacked."""
    from cloud_agent.tasks import Batch
    from common.datasets.mnist import decode_label
    from common.privacy import decode_features

    decoded = [decode_features(s.layout, s.features, s.bits) for s in samples]
    features = {layer: torch.stack([d[layer] for d in decoded]) for layer in decoded[0]}
    return Batch(features, torch.tensor([decode_label(s.label) for s in samples], dtype=torch.long))


def training_arms(ctx: Context, samples: int, repeats: int) -> dict[str, Any]:
    import copy

    import numpy as np
    from torch.utils.data import DataLoader

    from bench.train import fill_spool, plain_epoch, timed
    from cloud_agent.spool import Spool, SpoolFeatures
    from cloud_agent.tasks.classification import Classification
    from cloud_agent.trainer import TrainConfig, Trainer, freeze_head, param_groups
    from common.datasets.mnist import MnistShard, prepare_mnist
    from common.models.lenet import LeNet5
    from common.privacy import feature_transform

    torch.set_num_threads(ctx.cpus)
    split = prepare_mnist(ctx.workdir / "data" / "mnist-exp", 1)
    dataset = MnistShard(split.edges[0])
    if samples < len(dataset):
        path = split.edges[0].with_name("exp-subset.npz")
        np.savez(path, images=dataset.images[:samples], labels=dataset.labels[:samples])
        dataset = MnistShard(path)
    task = Classification(split.test)
    model = LeNet5()
    spool = Spool(ctx.workdir / "exp-train.sqlite")
    n = fill_spool(spool, "edge", model, 2, dataset, 64, ctx.profile.epsilon)
    data = SpoolFeatures(spool, ["edge"])
    config = TrainConfig(epochs=repeats + 2, batch_size=64, learning_rate=0.001, recalibrate_bn=False)
    trainer = Trainer(copy.deepcopy(model), 2, task, data, config, ctx.workdir / "exp-state", feature_transform({}))
    plain_model = copy.deepcopy(model)
    opt = torch.optim.SGD(param_groups(freeze_head(plain_model, 2), 5e-4), lr=0.001, momentum=0.937, nesterov=True)
    batches = [task.collate(data.__getitems__(list(range(s, min(s + 64, n))))) for s in range(0, n, 64)]

    def before() -> DataLoader[Any]:
        return DataLoader(PerSample(data), batch_size=64, shuffle=True, collate_fn=per_sample_collate)

    arms: dict[str, list[float]] = {
        "plain in-memory loop": [],
        "trainer, as shipped (one query + one unpack per batch)": [],
        "trainer, before (one query + one unpack per sample)": [],
    }
    for r in range(repeats + 1):  # the first round warms up, untimed
        shuffle = torch.Generator().manual_seed(r)
        seconds = [
            timed(lambda: plain_epoch(plain_model, 2, task, batches, opt)),
            timed(lambda: trainer.train_epoch(trainer.loader(shuffle), 1, None)),  # noqa: B023 (called at once)
            timed(lambda: trainer.train_epoch(before(), 1, None)),
        ]
        if r:
            for name, s in zip(arms, seconds, strict=True):
                arms[name].append(n / s)
    spool.close()
    plain = arms["plain in-memory loop"]
    return {
        "samples": n,
        "threads": torch.get_num_threads(),
        "arms": {
            k: {"images_per_s": median(v), "ratio_to_plain": paired_ratio(v, plain), "runs": v} for k, v in arms.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    from broker.launcher import local_mosquitto

    parser = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "experiments.json")
    args = parser.parse_args(argv)
    prof = QUICK if args.quick else FULL
    workdir = Path(tempfile.mkdtemp(prefix="mistnet-bench-exp-"))
    result: dict[str, Any] = {}
    with bench_broker(workdir / "broker").start() as broker, local_mosquitto(workdir / "plain-broker").start() as plain:
        pid = broker.process.pid if broker.process else None
        ctx = Context(prof, "cpu", workdir, broker.url, lambda s: print(s, file=sys.stderr), broker_pid=pid)
        from bench.util import LoadRecord, machine

        load = LoadRecord().start()
        result["machine"] = machine()
        plain_broker = (plain.url, plain.process.pid if plain.process else None)
        result["transport"] = transport_arms(ctx, plain_broker, 32 if args.quick else 128, 2 if args.quick else 5)
        result["training_mnist"] = training_arms(ctx, 1000 if args.quick else 3000, 2 if args.quick else 5)
        result["load"] = load.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        json.dumps(
            {
                "transport": {k: round(v["ratio_to_raw"], 3) for k, v in result["transport"]["arms"].items()},
                "training": {k: round(v["ratio_to_plain"], 3) for k, v in result["training_mnist"]["arms"].items()},
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
