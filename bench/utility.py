"""Utility under privacy on COCO128: held-out and in-sample mAP of each method at each ε.

``python -m bench.utility`` (``make utility``) writes ``bench/results/utility.json`` and regenerates
the table and plot of ``docs/privacy-utility.md``. Everything runs through the shipped code: the
edges' :class:`~edge_agent.torch_head.TorchExtractor` and encoder fill a real spool, the cloud's
:func:`~cloud_agent.adaptation.adapt` and :class:`~cloud_agent.trainer.Trainer` adapt and train,
and every model is scored by :func:`~common.evaluation.evaluate_model` through the deployed path
(head → levels → decoder → tail), without randomization at evaluation (as the cloud evaluates).

Splits (``scenarios.folders.split_images``, seed 0, disjoint): 32 held-out images (never sent, never
trained on), 32 public images (unlabelled, the cloud's), 2 edges x 32 labelled images.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cloud_agent.adaptation import Adaptation, adapt
from cloud_agent.spool import Spool, SpoolFeatures
from cloud_agent.tasks.detection import Detection
from cloud_agent.trainer import History, TrainConfig, Trainer
from common.checkpoint import load_model
from common.datasets.yolo import YoloDataset, YoloEdgeDataset, discover_images
from common.evaluation import evaluate_model, model_predict_fn, split_predict_fn
from common.jobspec import AdaptSpec
from common.models.cutdecoder import attach
from common.privacy import BitEncoder, feature_transform
from edge_agent.torch_head import TorchExtractor
from scenarios.defaults import DEFAULT_COCO128, DEFAULT_YOLO_WEIGHTS
from scenarios.folders import link_yolo_folder, split_images

log = logging.getLogger("mistnet.bench.utility")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "utility.json"
CUT = 4
EDGES = 2
PER_EDGE = 32
HELD_OUT = 32
PUBLIC = 32
TRANSFER = 16
BATCH = 16
REFERENCE_LR = 0.01  # the Sedna example's recipe: whole tail, SGD, no BN re-estimation
FINETUNE_LR = 0.001

METHODS = {
    "pretrained": "pretrained, full precision (no MistNet): the ceiling",
    "zero-shot": "x > 0 bits, pretrained tail untouched",
    "reference": "x > 0 bits, whole tail fine-tuned (SGD lr 0.01, the reference recipe)",
    "bn": "x > 0 bits, only the tail's BatchNorm statistics re-estimated on the edges' bits",
    "adapted": "calibrated thresholds + cut decoder trained on public images at the job's ε; no edge-data training",
    "adapted+decoder-ft": "adapted, then the cut decoder fine-tuned on the edges' labelled bits (lr 0.001)",
    "adapted+tail-ft": "adapted, then decoder and whole tail fine-tuned on the edges' labelled bits (lr 0.001)",
}


@dataclass
class UtilityRow:
    method: str
    epsilon: float | None
    held_out: tuple[float, float]
    in_sample: tuple[float, float]
    seconds: float


@dataclass
class Setup:
    weights: Path
    imgsz: int
    epochs: int
    decoder_epochs: int
    folders: dict[str, Path]
    workdir: Path
    device: str = "cpu"

    @property
    def edges(self) -> list[str]:
        return [f"edge{k}" for k in range(1, EDGES + 1)]


def coco128_folders(data: Path, workdir: Path) -> dict[str, Path]:
    split = split_images(discover_images(data), EDGES, PER_EDGE, HELD_OUT, public=PUBLIC)
    folders = {f"edge{k}": link_yolo_folder(imgs, workdir / f"edge{k}") for k, imgs in enumerate(split.edges, 1)}
    folders["held-out"] = link_yolo_folder(split.held_out, workdir / "held-out")
    folders["public"] = link_yolo_folder(split.public, workdir / "public", labels=False)
    folders["in-sample"] = link_yolo_folder([p for imgs in split.edges for p in imgs], workdir / "in-sample")
    return folders


def score(setup: Setup, predict: Callable[[torch.Tensor], Any], folder: str) -> tuple[float, float]:
    result = evaluate_model(predict, YoloDataset(setup.folders[folder], setup.imgsz), setup.imgsz, 16, rect=False)
    return round(float(result["map50"]), 4), round(float(result["map50_95"]), 4)


def scores(setup: Setup, model: nn.Module, encoding: dict[str, Any] | None) -> dict[str, tuple[float, float]]:
    predict = model_predict_fn(model) if encoding is None else split_predict_fn(model, CUT, feature_transform(encoding))
    return {k: score(setup, predict, k) for k in ("held-out", "in-sample")}


def edges_spool(
    setup: Setup, model: nn.Module, encoder: BitEncoder, name: str, local_statistics: bool = False
) -> SpoolFeatures:
    """What the edges would send: each edge's images through its head (with ``local_statistics``, its
    BatchNorm statistics re-estimated on that edge's images) and encoder, committed."""
    shutil.rmtree(setup.workdir / name, ignore_errors=True)
    spool = Spool(setup.workdir / name / "spool.sqlite")
    for node in setup.edges:
        if spool.counts(node).samples:
            continue
        dataset = YoloEdgeDataset(setup.folders[node], setup.imgsz)
        extractor = TorchExtractor(
            copy.deepcopy(model), CUT, encoder, dataset, TRANSFER, setup.device, local_statistics
        )
        for t in range(extractor.transfers):
            spool.commit_transfer(node, extractor.extract(t))
    return SpoolFeatures(spool, setup.edges)


def train(setup: Setup, model: nn.Module, data: SpoolFeatures, name: str, epochs: int, **options: Any) -> nn.Module:
    state = setup.workdir / name / "state"
    shutil.rmtree(state, ignore_errors=True)  # a fresh run, never a resumed one
    config = TrainConfig(epochs=epochs, batch_size=BATCH, device=setup.device, eval_interval=max(epochs, 1), **options)
    trainer = Trainer(model, CUT, Detection(None, setup.imgsz), data, config, state, feature_transform({}))
    trainer.fit(History(), on_epoch=lambda r: log.info("%s epoch %d: %s (%.0f s)", name, r.epoch, r.losses, r.seconds))
    return model.eval()


class Measurement:
    """Runs the methods at each ε and records a :class:`UtilityRow` per (method, ε)."""

    def __init__(self, setup: Setup, methods: list[str], on_row: Callable[[UtilityRow], None] | None = None) -> None:
        self.setup = setup
        self.methods = methods
        self.pretrained, _ = load_model(setup.weights)
        self.rows: list[UtilityRow] = []
        self.on_row = on_row

    def wanted(self, method: str) -> bool:
        return method in self.methods

    def record(
        self, method: str, eps: float | None, t0: float, model: nn.Module, encoding: dict[str, Any] | None
    ) -> None:
        got = scores(self.setup, model, encoding)
        row = UtilityRow(method, eps, got["held-out"], got["in-sample"], round(time.monotonic() - t0, 1))
        print(json.dumps(asdict(row)), flush=True)
        self.rows.append(row)
        if self.on_row is not None:
            self.on_row(row)

    def fresh(self, adaptation: Adaptation | None = None) -> nn.Module:
        model = copy.deepcopy(self.pretrained)
        if adaptation is not None and adaptation.decoder is not None:
            attach(model, copy.deepcopy(adaptation.decoder))
        return model

    def run(self, epsilons: list[float]) -> list[UtilityRow]:
        if self.wanted("pretrained"):
            self.record("pretrained", None, time.monotonic(), self.fresh(), None)
        for eps in epsilons:
            self.reference_methods(eps)
            if any(m.startswith("adapted") for m in self.methods):
                self.adapted_methods(eps)
        return self.rows

    def reference_methods(self, eps: float) -> None:
        tag = f"eps{eps:g}"
        if self.wanted("zero-shot"):
            self.record("zero-shot", eps, time.monotonic(), self.fresh(), {})
        if not (self.wanted("bn") or self.wanted("reference")):
            return
        bits = edges_spool(self.setup, self.pretrained, BitEncoder(eps, seed=1), f"{tag}-bits")
        if self.wanted("bn"):
            t0 = time.monotonic()
            model = train(self.setup, self.fresh(), bits, f"{tag}-bn", 0, learning_rate=FINETUNE_LR)
            self.record("bn", eps, t0, model, {})
        if self.wanted("reference"):
            t0 = time.monotonic()
            options = {"learning_rate": REFERENCE_LR, "recalibrate_bn": False}
            model = train(self.setup, self.fresh(), bits, f"{tag}-ref", self.setup.epochs, **options)
            self.record("reference", eps, t0, model, {})

    def adapted_methods(self, eps: float) -> None:
        tag = f"eps{eps:g}"
        setup = self.setup
        t0 = time.monotonic()
        spec = AdaptSpec(epochs=setup.decoder_epochs)
        adaptation = adapt(
            self.fresh(), CUT, setup.folders["public"], setup.imgsz, [eps], 1, True, spec, setup.device, 0, log.info
        )
        encoding = adaptation.encoding()
        if self.wanted("adapted"):
            self.record("adapted", eps, t0, self.fresh(adaptation), encoding)
        finetunes = [(m, n) for m, n in (("adapted+decoder-ft", 0), ("adapted+tail-ft", None)) if self.wanted(m)]
        if not finetunes:
            return
        levels = edges_spool(
            setup, self.pretrained, BitEncoder(eps, seed=1, thresholds=adaptation.thresholds), f"{tag}-levels"
        )
        for method, tail_layers in finetunes:
            t1 = time.monotonic()
            options = {"learning_rate": FINETUNE_LR, "recalibrate_bn": False, "tail_layers": tail_layers,
                       "train_decoder": True}  # fmt: skip
            model = train(setup, self.fresh(adaptation), levels, f"{tag}-{method}", setup.epochs, **options)
            self.record(method, eps, t1, model, encoding)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.utility", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_COCO128)
    p.add_argument("--weights", type=Path, default=DEFAULT_YOLO_WEIGHTS)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--epsilons", default="100,4,2,1", help="comma-separated (default 100,4,2,1)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs")
    p.add_argument("--decoder-epochs", type=int, default=10)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mistnet-utility"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--merge", action="store_true", help="keep the other rows of an existing --out file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.workdir.mkdir(parents=True, exist_ok=True)
    setup = Setup(
        args.weights,
        args.imgsz,
        args.epochs,
        args.decoder_epochs,
        coco128_folders(args.data, args.workdir),
        args.workdir,
        args.device,
    )
    # Rows are saved as they come (a long run that stops early keeps what it measured); with --merge,
    # rows of earlier runs for other (method, ε) pairs are kept.
    kept = json.loads(args.out.read_text())["rows"] if args.merge and args.out.exists() else []
    rows = [UtilityRow(**{**r, "held_out": tuple(r["held_out"]), "in_sample": tuple(r["in_sample"])}) for r in kept]

    def save(row: UtilityRow) -> None:
        rows[:] = [r for r in rows if (r.method, r.epsilon) != (row.method, row.epsilon)] + [row]
        doc = {"imgsz": args.imgsz, "epochs": args.epochs, "decoder_epochs": args.decoder_epochs}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**doc, "rows": [asdict(r) for r in rows]}, indent=1))

    Measurement(setup, args.methods.split(","), save).run([float(e) for e in args.epsilons.split(",")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
