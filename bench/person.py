"""Learning from the edges: person detection under a distribution shift the pretrained model never saw.

``python -m bench.person --shift contrast:5 --epsilons 100,4,2,1`` (``make learning``) measures, on
``../shared/data/coco-person`` split as ``mistnet demo --scenario coco-person`` splits it (200
held-out images, 2 edges x 300), every labelled image under the shift:

- ``pretrained``: the official checkpoint, full precision: where the edges start.
- ``centralized``: every layer fine-tuned on the edges' raw images (``mistnet train``): what uploading
  them would give, the non-private upper bound.
- ``frozen-head``: the tail fine-tuned on the float head outputs of the raw images (no bits, no
  randomization): the most a method that keeps the edges' head frozen at the cut can reach.
- ``adapted``: MistNet before any edge data: thresholds and cut decoder from the cloud's public images.
- ``mistnet``: adapted, then trained on what the edges send (randomized at ε), the epoch chosen on
  held-back received samples; scored through the deployed path (head → levels → decoder → tail).

Everything runs through the shipped code (edge extractor and encoder filling a real spool, the
cloud's adaptation and trainer); the images the rows are scored on are never sent nor trained on.
Rows are appended to ``bench/results/person.json`` as they are measured; ``python -m
bench.utility_doc`` renders them into ``docs/privacy-utility.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.person_doc import LOCAL_HEAD, RESULTS, levels_variant, variant
from bench.utility import Setup, edges_spool
from cloud_agent.adaptation import Adaptation, adapt
from cloud_agent.centralized import INPUT, ImageDetection, ImageSamples, fine_tune
from cloud_agent.spool import SpoolFeatures
from cloud_agent.tasks import Batch, Privatize
from cloud_agent.tasks.detection import Detection
from cloud_agent.trainer import History, TrainConfig, Trainer, selection_split
from common import constants as C
from common.checkpoint import load_model
from common.datasets.shift import Shift
from common.datasets.yolo import YoloDataset, discover_images
from common.evaluation import with_local_head
from common.jobspec import AdaptSpec, CloudSpec, HeadStatistics, ModelSpec, auto_bits
from common.models.cutdecoder import attach
from common.privacy import BitEncoder, feature_transform
from common.split import run_head
from scenarios.defaults import (
    COCO_BATCH_SIZE,
    COCO_CUT,
    DEFAULT_COCO_PERSON,
    DEFAULT_PUBLIC_IMAGES,
    DEFAULT_YOLO_WEIGHTS,
    PERSON_HELD_OUT,
)
from scenarios.folders import link_yolo_folder, shifted_split, split_images

log = logging.getLogger("mistnet.bench.person")

EDGES = 2
SEED = 0


@dataclass
class PersonRow:
    shift: str
    method: str
    epsilon: float | None
    map50: float
    map50_95: float
    seconds: float
    selected_epoch: int | None = None
    variant: str = ""  # the MistNet settings of a trained row (:func:`variant`)


@dataclass
class Bench:
    setup: Setup
    shift: str
    epochs: int
    out: Path
    adaptations: Path  # shared by every shift: the public images are never shifted
    bits: int | None = None  # bits per activation; None: the job default at each ε (privacy.bits: auto)
    train_decoder: bool = CloudSpec().train_decoder
    translate: int = CloudSpec().translate
    learning_rate: float = C.DETECTION_LEARNING_RATE  # every method's
    local_head: bool = ModelSpec.model_fields["head_statistics"].default == HeadStatistics.LOCAL

    def record(self, row: PersonRow) -> None:
        print(json.dumps(asdict(row)), flush=True)
        doc = json.loads(self.out.read_text()) if self.out.exists() else {"rows": []}
        rows = [r for r in doc["rows"] if row_key(r) != row_key(asdict(row))] + [asdict(row)]
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps({"imgsz": self.setup.imgsz, "epochs": self.epochs, "rows": rows}, indent=1))

    def levels(self, eps: float) -> int:
        """Bits per activation at ε: the bench's, or as ``privacy.bits: auto`` chooses them."""
        return auto_bits(eps) if self.bits is None else self.bits

    def held_out(self) -> Path:
        return self.setup.folders["held-out"]

    def pretrained(self) -> None:
        """The official model as it is; and, with ``local_head``, with its first ``COCO_CUT`` layers'
        BatchNorm statistics re-estimated on the scored images (what the edges' heads do, no training)."""
        for local in (False, True) if self.local_head else (False,):
            t0 = time.monotonic()
            model, _ = load_model(self.setup.weights)
            if local:
                model = with_local_head(model, COCO_CUT, YoloDataset(self.held_out(), self.setup.imgsz))
            got = ImageDetection(self.held_out(), self.setup.imgsz).evaluate(model, 0, lambda f: f, self.setup.device)
            self.record(PersonRow(self.shift, "pretrained", None, *map_pair(got), round(time.monotonic() - t0, 1),
                                  variant=LOCAL_HEAD if local else ""))  # fmt: skip

    def centralized(self) -> None:
        t0 = time.monotonic()
        state = self.setup.workdir / "centralized"
        shutil.rmtree(state, ignore_errors=True)
        edges = [self.setup.folders[e] for e in self.setup.edges]
        result = fine_tune(self.setup.weights, edges, self.held_out(), self.setup.imgsz, self.config(), state)
        last = last_metrics(result.history)
        self.record(PersonRow(self.shift, "centralized", None, *map_pair(last), round(time.monotonic() - t0, 1)))

    def frozen_head(self) -> None:
        t0 = time.monotonic()
        model, _ = load_model(self.setup.weights)
        task = HeadFeatures(model, self.held_out(), self.setup.imgsz)
        edges = ImageSamples([self.setup.folders[e] for e in self.setup.edges], self.setup.imgsz)
        state = self.setup.workdir / "frozen-head"
        shutil.rmtree(state, ignore_errors=True)
        torch.manual_seed(SEED)
        trainer = Trainer(model, COCO_CUT, task, edges, self.config(), state, lambda f: f)
        last = last_metrics(trainer.fit(History(), lambda r: None))
        self.record(PersonRow(self.shift, "frozen-head", None, *map_pair(last), round(time.monotonic() - t0, 1)))

    def adaptation(self, eps: float) -> tuple[Adaptation, float]:
        """The job's adaptation at ε and the seconds it took (made once per work directory)."""
        name = f"eps{eps:g}-bits{self.levels(eps)}-decoder{self.setup.decoder_epochs}"
        path = self.adaptations / f"{name}.safetensors"
        took = path.with_suffix(".json")
        if path.exists() and took.exists():
            return Adaptation.load(path), json.loads(took.read_text())["seconds"]
        t0 = time.monotonic()
        model, _ = load_model(self.setup.weights)
        spec = AdaptSpec(epochs=self.setup.decoder_epochs)
        found = adapt(model, COCO_CUT, self.setup.folders["public"], self.setup.imgsz, [eps], self.levels(eps), True,
                      spec, self.setup.device, SEED, log.info)  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        found.save(path)
        seconds = round(time.monotonic() - t0, 1)
        took.write_text(json.dumps({"seconds": seconds}))
        return found, seconds

    def mistnet(self, eps: float) -> None:
        t0 = time.monotonic()
        adaptation, adapting = self.adaptation(eps)
        model = adapted_model(self.setup.weights, adaptation)
        task = Detection(self.held_out(), self.setup.imgsz, self.translate, self.local_head)
        transform = feature_transform(adaptation.encoding())
        before = task.evaluate(model, COCO_CUT, transform, self.setup.device)
        levels = levels_variant(self.levels(eps), self.local_head)
        seconds = round(adapting + time.monotonic() - t0, 1)
        self.record(PersonRow(self.shift, "adapted", eps, *map_pair(before), seconds, variant=levels))
        t1 = time.monotonic()
        encoder = BitEncoder(eps, seed=SEED + 1, bits=self.levels(eps), thresholds=adaptation.thresholds)
        pretrained = load_model(self.setup.weights)[0]
        received = edges_spool(self.setup, pretrained, encoder, f"eps{eps:g}-spool", self.local_head)
        trainer = self.trainer(model, task, received, f"eps{eps:g}", transform)
        trainer.fit(History(), lambda r: log.info("ε %g epoch %d: %s %s held-back %s", eps, r.epoch, r.losses,
                                                 r.metrics, r.selection_score))  # fmt: skip
        chosen = trainer.restore_selected()
        got = task.evaluate(model, COCO_CUT, transform, self.setup.device)
        epoch = chosen.epoch if chosen is not None else None
        settings = variant(self.levels(eps), self.train_decoder, self.translate, self.learning_rate, self.local_head)
        row = PersonRow(self.shift, "mistnet", eps, *map_pair(got), round(time.monotonic() - t1, 1), epoch, settings)
        self.record(row)

    def trainer(
        self, model: nn.Module, task: Detection, data: SpoolFeatures, name: str, transform: Privatize
    ) -> Trainer:
        """The cloud agent's trainer, with the job defaults the demo uses (``CloudSpec``)."""
        state = self.setup.workdir / name / "state"
        shutil.rmtree(state, ignore_errors=True)
        train, selection = selection_split(data, CloudSpec().selection_fraction, SEED)
        config = self.config(recalibrate_bn=False, train_decoder=self.train_decoder)
        return Trainer(model, COCO_CUT, task, train, config, state, transform, selection)

    def config(self, **options: Any) -> TrainConfig:
        """The training settings every method shares: the bench's epochs and learning rate, the demo's batch."""
        return TrainConfig(self.epochs, COCO_BATCH_SIZE, self.learning_rate, device=self.setup.device, seed=SEED,
                           **options)  # fmt: skip


class HeadFeatures(ImageDetection):
    """Raw images through the model's own (frozen) head: batches hold its float outputs at the cut."""

    def __init__(self, model: nn.Module, validation: Path, image_size: int) -> None:
        super().__init__(validation, image_size)
        self.model = model

    @torch.no_grad()
    def collate(self, samples: list[Any]) -> Batch:
        batch = super().collate(samples)
        return Batch(run_head(self.model, batch.features[INPUT], COCO_CUT), batch.targets)


def last_metrics(history: History) -> dict[str, float]:
    return next(e.metrics for e in reversed(history.epochs) if e.metrics)


def row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return row["shift"], row["method"], row["epsilon"], row.get("variant", "")


def map_pair(metrics: dict[str, float]) -> tuple[float, float]:
    return round(metrics["map50"], 4), round(metrics["map50_95"], 4)


def adapted_model(weights: Path, adaptation: Adaptation) -> nn.Module:
    model, _ = load_model(weights)
    if adaptation.decoder is not None:
        attach(model, copy.deepcopy(adaptation.decoder))
    return model


def person_folders(data: Path, shift: Shift | None, public: Path, workdir: Path) -> dict[str, Path]:
    """coco-person split and shifted as ``mistnet demo --scenario coco-person`` does it."""
    split = split_images(discover_images(data), EDGES, None, PERSON_HELD_OUT)
    if shift is not None:
        split = shifted_split(split, data, shift, workdir / f"data-{shift.corruption}-{shift.severity}")
    folders = {f"edge{k}": link_yolo_folder(imgs, workdir / f"edge{k}") for k, imgs in enumerate(split.edges, 1)}
    folders["held-out"] = link_yolo_folder(split.held_out, workdir / "held-out")
    folders["public"] = public
    return folders


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.person", description=__doc__.splitlines()[0])
    p.add_argument("--shift", default="contrast:5", help="NAME:SEVERITY, or 'clean' (default contrast:5)")
    p.add_argument("--epsilons", default="100,4,2,1", help="comma-separated (default 100,4,2,1)")
    p.add_argument("--methods", default="pretrained,centralized,mistnet", help="comma-separated subset")
    p.add_argument("--data", type=Path, default=DEFAULT_COCO_PERSON)
    p.add_argument("--public", type=Path, default=DEFAULT_PUBLIC_IMAGES)
    p.add_argument("--weights", type=Path, default=DEFAULT_YOLO_WEIGHTS)
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--epochs", type=int, default=6, help="training epochs, MistNet and centralized alike")
    p.add_argument("--decoder-epochs", type=int, default=10)
    p.add_argument(
        "--translate", type=int, default=CloudSpec().translate, help="training batches move by up to N feature cells"
    )
    p.add_argument("--lr", type=float, default=C.DETECTION_LEARNING_RATE, help="learning rate of every method")
    p.add_argument("--bits", type=int, help="bits per activation (levels 2^bits); default: privacy.bits auto")
    p.add_argument(
        "--train-decoder",
        action=argparse.BooleanOptionalAction,
        default=CloudSpec().train_decoder,
        help="also train the cut decoder on the edges' bits (cloud.train_decoder)",
    )
    p.add_argument(
        "--head-statistics",
        choices=[h.value for h in HeadStatistics],
        default=ModelSpec.model_fields["head_statistics"].default.value,
        help="local: edges re-estimate their head's BatchNorm statistics on their images (model.head_statistics)",
    )
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mistnet-person"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    shift = None if args.shift == "clean" else Shift.parse(args.shift)
    workdir = args.workdir / args.shift.replace(":", "-")
    workdir.mkdir(parents=True, exist_ok=True)
    folders = person_folders(args.data, shift, args.public, workdir)
    setup = Setup(args.weights, args.imgsz, args.epochs, args.decoder_epochs, folders, workdir, args.device)
    bench = Bench(setup, args.shift, args.epochs, args.out, args.workdir / "adaptations", args.bits, args.train_decoder,
                  args.translate, args.lr, args.head_statistics == HeadStatistics.LOCAL)  # fmt: skip
    methods = args.methods.split(",")
    if "pretrained" in methods:
        bench.pretrained()
    if "centralized" in methods:
        bench.centralized()
    if "frozen-head" in methods:
        bench.frozen_head()
    if "mistnet" in methods:
        for eps in [float(e) for e in args.epsilons.split(",")]:
            bench.mistnet(eps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
