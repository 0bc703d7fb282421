"""Measurements of changes suggested *outside* the benchmark's own files (the cloud's spool and
collector, the trainer's data path), so their effect is a number, not a guess. Nothing here is
used by the system; ``python -m bench.experiments [--quick]`` writes
``bench/results/experiments.json``.

- transport: the protocol run of ``bench.transport`` with the cloud's spool tuned
  (``wal_autocheckpoint`` so the WAL is not checkpointed every few transfers, and
  ``synchronous=OFF``), with one SQLite transaction per inbox drain (acknowledgements sent after
  COMMIT), and with both; interleaved with the unchanged protocol and raw paho.
- training (MNIST, where the data path weighs the most): the trainer's epoch with the spool read
  one query per batch (``__getitems__``) and the bits of a whole batch unpacked at once, against
  the unchanged loader and the plain in-memory loop.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import transport
from bench.profiles import FULL, QUICK
from bench.util import MIB, RESULTS, Context, median, paired_ratio

SPOOL_PRAGMAS = "wal_autocheckpoint=100000,synchronous=OFF"
TRANSPORT_ARMS = {
    "unchanged": [],
    "spool pragmas": ["--spool-pragma", SPOOL_PRAGMAS],
    "group commit": ["--group-commit"],
    "group commit + pragmas": ["--group-commit", "--spool-pragma", SPOOL_PRAGMAS],
}


def transport_arms(ctx: Context, mib: int, repeats: int) -> dict[str, Any]:
    from common import constants as C

    blob = transport.transfer_bytes()
    transfers = max(1, round(mib * MIB / blob))
    chunks = transfers * math.ceil(blob / C.DEFAULT_CHUNK_BYTES)
    raw: list[float] = []
    arms: dict[str, list[float]] = {k: [] for k in TRANSPORT_ARMS}
    for r in range(repeats):
        raw.append(transport.run_raw(ctx, chunks, C.DEFAULT_CHUNK_BYTES)["mb_per_s"])
        for name, extra in TRANSPORT_ARMS.items():
            arms[name].append(transport.run_proto(ctx, transfers, extra)["mb_per_s"])
        ctx.log(
            f"transport arms {r + 1}/{repeats}: raw {raw[-1]:.0f} MB/s, "
            + ", ".join(f"{k} {v[-1]:.0f}" for k, v in arms.items())
        )
    return {
        "megabytes": transfers * blob / 1e6,
        "raw_mb_per_s": median(raw),
        "arms": {k: {"mb_per_s": median(v), "ratio_to_raw": paired_ratio(v, raw), "runs": v} for k, v in arms.items()},
    }


def batched_loader(trainer: Any, batch: int) -> Any:
    """The trainer's data, read one SQL query per batch and decoded with one unpackbits per batch."""
    from torch.utils.data import DataLoader

    from cloud_agent.spool import StoredSample, _layout
    from cloud_agent.tasks import Batch
    from common.datasets.mnist import decode_label
    from common.protocol import packed_size

    data = trainer.data

    class Batched(torch.utils.data.Dataset[StoredSample]):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, index: int) -> StoredSample:
            return data[index]

        def __getitems__(self, indices: list[int]) -> list[StoredSample]:
            rowids = [data.rowids[i] for i in indices]
            marks = ",".join("?" * len(rowids))
            rows = data.spool.db.execute(
                f"SELECT rowid, node, id, bits, layout, label, features FROM samples WHERE rowid IN ({marks})", rowids
            ).fetchall()
            by_rowid = {r[0]: r for r in rows}
            out = []
            for rowid in rowids:
                _, node, sid, bits, layout, label, features = by_rowid[rowid]
                out.append(StoredSample(node, int(sid), bytes(label), int(bits), _layout(layout), bytes(features)))
            return out

    def collate(samples: list[StoredSample]) -> Any:
        layout = samples[0].layout
        sizes = packed_size(layout, 1)
        raw = np.frombuffer(b"".join(s.features for s in samples), np.uint8).reshape(len(samples), -1)
        features, offset = {}, 0
        for f, size in zip(layout, sizes, strict=True):
            bits = np.unpackbits(raw[:, offset : offset + size], axis=1, count=math.prod(f.shape))
            features[f.layer] = torch.from_numpy(bits.reshape(len(samples), *f.shape)).float()
            offset += size
        labels = torch.tensor([decode_label(s.label) for s in samples], dtype=torch.long)
        return Batch(features, labels)

    return DataLoader(Batched(), batch_size=batch, shuffle=True, collate_fn=collate)


def training_arms(ctx: Context, repeats: int) -> dict[str, Any]:
    import copy

    from bench.train import fill_spool, plain_epoch
    from cloud_agent.spool import Spool, SpoolFeatures
    from cloud_agent.tasks import Classification
    from cloud_agent.trainer import TrainConfig, Trainer, freeze_head, param_groups
    from common.datasets.mnist import MnistShard, prepare_mnist
    from common.models.lenet import LeNet5
    from common.privacy import feature_transform

    torch.set_num_threads(ctx.cpus)
    split = prepare_mnist(ctx.workdir / "data" / "mnist-exp", 1)
    dataset = MnistShard(split.edges[0])
    task = Classification(split.test)
    model = LeNet5()
    spool = Spool(ctx.workdir / "exp-train.sqlite")
    n = fill_spool(spool, "edge", model, 2, dataset, 64, ctx.profile.epsilon)
    data = SpoolFeatures(spool, ["edge"])
    config = TrainConfig(epochs=repeats + 2, batch_size=64, learning_rate=0.001, recalibrate_bn=False)
    trainer = Trainer(copy.deepcopy(model), 2, task, data, config, ctx.workdir / "exp-state", feature_transform({}))
    plain_model = copy.deepcopy(model)
    opt = torch.optim.SGD(param_groups(freeze_head(plain_model, 2), 5e-4), lr=0.001, momentum=0.937, nesterov=True)
    batches = [task.collate([data[i] for i in range(s, min(s + 64, n))]) for s in range(0, n, 64)]

    def timed(fn: Any) -> float:
        t0 = time.perf_counter()
        fn()
        return n / (time.perf_counter() - t0)

    arms: dict[str, list[float]] = {
        "plain in-memory loop": [],
        "trainer, unchanged loader": [],
        "trainer, batched read + vectorised unpack": [],
    }
    for warm in (True, *([False] * repeats)):
        rates = [
            timed(lambda: plain_epoch(plain_model, 2, task, batches, opt)),
            timed(lambda: trainer.train_epoch(trainer.loader(torch.Generator().manual_seed(0)), 1, None)),
            timed(lambda: trainer.train_epoch(batched_loader(trainer, 64), 1, None)),
        ]
        if not warm:
            for name, rate in zip(arms, rates, strict=True):
                arms[name].append(rate)
    spool.close()
    plain = arms["plain in-memory loop"]
    return {
        "samples": n,
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
    with local_mosquitto(workdir / "broker").start() as broker:
        pid = broker.process.pid if broker.process else None
        ctx = Context(prof, "cpu", workdir, broker.url, lambda s: print(s, file=sys.stderr), broker_pid=pid)
        from bench.util import LoadRecord, machine

        load = LoadRecord().start()
        result["machine"] = machine()
        result["transport"] = transport_arms(ctx, 32 if args.quick else 128, 2 if args.quick else 3)
        result["training_mnist"] = training_arms(ctx, 2 if args.quick else 5)
        result["load"] = load.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        json.dumps(
            {
                "transport": {k: round(v["ratio_to_raw"], 3) for k, v in result["transport"]["arms"].items()},
                "training": {k: round(v["ratio_to_plain"], 3) for k, v in result["training_mnist"]["arms"].items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
