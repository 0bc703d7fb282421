"""``mistnet demo``: broker, cloud and edges as separate processes on this machine, over MQTT only.

Two scenarios:

- ``mnist`` (default): LeNet-5 pretrained on a public slice of MNIST, edges holding private slices.
- ``coco128``: the pretrained YOLOv5 checkpoint (default ``../shared/weights/yolov5n.pt``) on COCO128
  (default ``../shared/data/coco128``). The images are split deterministically into one folder per
  edge and a held-out folder the cloud evaluates on; the folders hold symlinks to the original
  images and labels, so no data is copied.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.console import Console
from safetensors.torch import save_file

from broker.launcher import start_embedded_broker
from cloud_agent.pretrain import pretrain_classifier
from common import constants as C
from common.datasets.mnist import load_tensors, prepare_mnist
from common.datasets.yolo import discover_images, img2label_path
from common.errors import DatasetError, MistnetError, SpecError
from common.lifecycle import child_options
from common.models.lenet import LeNet5
from common.protocol import JobSummary
from common.spec import AdaptSpec, CloudSpec, CollectSpec, EdgeSpec, JobSpec, ModelSpec, PrivacySpec
from common.transport import BrokerOptions
from mistnet.flags import DEFAULT_COCO128, DEFAULT_YOLO_WEIGHTS, find_default, missing_hint
from mistnet.monitor import StatusBoard, follow, status_link

SCENARIOS = ("mnist", "coco128")

MNIST_EPOCHS = 6
MNIST_CUT = 2
COCO_EPOCHS = 10
COCO_CUT = 4  # edges run layers 0-3, as the reference example
COCO_IMAGE_SIZE = 320
COCO_HELD_OUT = 32
COCO_PUBLIC = 32  # the cloud's public images: threshold calibration and cut decoder (privacy-utility.md)
COCO_BATCH_SIZE = 16
# Fine-tuning on ~100 images memorises them: at 0.01 held-out mAP collapses within a few epochs
# (see shared/notes/mistnet-utility-measurements.md); 0.001, the Sedna example's rate, keeps it.
COCO_LEARNING_RATE = 0.001
COCO_TRANSFER_SAMPLES = 16


@dataclass(frozen=True)
class DemoOptions:
    edges: int = 2
    epsilon: float = 100.0
    epochs: int | None = None  # None: the scenario's default
    cut_layer: int | None = None  # None: the scenario's default
    workdir: Path | None = None
    json: bool = False
    scenario: str = "mnist"
    data: Path | None = None  # coco128: the YOLO-format dataset to split
    model: Path | None = None  # coco128: the pretrained YOLOv5 checkpoint
    image_size: int = COCO_IMAGE_SIZE
    per_edge: int | None = None  # coco128: images per edge; None: all that the held-out split leaves
    held_out: int = COCO_HELD_OUT  # coco128: images the cloud keeps for evaluation
    public: int = COCO_PUBLIC  # coco128: unlabelled images the cloud adapts with (0: no adaptation)
    bits: int = 1  # bits per activation on the wire
    decoder_epochs: int = C.DEFAULT_DECODER_EPOCHS
    learning_rate: float | None = None
    batch_size: int | None = None  # cloud training batch; None: the scenario's default


def write_job(spec: JobSpec, path: Path) -> Path:
    doc = {"kind": "MistNetJob", **spec.model_dump(mode="json", exclude_none=True)}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def prepare_mnist_job(opts: DemoOptions, root: Path) -> Path:
    """Data split, pretrained LeNet-5 on the public slice, and the job file."""
    split = prepare_mnist(root / "data", opts.edges)
    images, labels = load_tensors(split.public)
    model = LeNet5()
    pretrain_classifier(model, images, labels)
    weights = root / "lenet5-pretrained.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(weights),
        metadata={"mistnet": '{"arch": "lenet5", "num_classes": 10}'},
    )
    spec = JobSpec(
        name="mnist-demo",
        model=ModelSpec(arch="lenet5", num_classes=10, pretrained=str(weights)),
        cut_layer=opts.cut_layer or MNIST_CUT,
        privacy=PrivacySpec(epsilon=opts.epsilon),
        edges=[EdgeSpec(node=f"edge{k}", dataset=str(p), batch_size=64) for k, p in enumerate(split.edges, 1)],
        cloud=CloudSpec(
            epochs=MNIST_EPOCHS if opts.epochs is None else opts.epochs,
            batch_size=opts.batch_size or 64,
            learning_rate=opts.learning_rate or 0.02,
            validation=str(split.test),
            output=str(root / "mnist-demo.safetensors"),
        ),
        collect=CollectSpec(timeout_s=120),
    )
    return write_job(spec, root / "job.yaml")


# coco128 -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSplit:
    edges: list[list[Path]]
    held_out: list[Path]
    public: list[Path]


def split_images(
    images: list[Path], edges: int, per_edge: int | None, held_out: int, seed: int = 0, public: int = 0
) -> ImageSplit:
    """A seeded shuffle of the (sorted) images: ``held_out`` for the cloud's evaluation, then ``public``
    unlabelled images for its adaptation, then ``per_edge`` per edge (default: the rest, shared
    equally). Disjoint; the same inputs always give the same split."""
    if edges < 1 or held_out < 1:
        raise SpecError(f"need at least one edge and one held-out image, got {edges} and {held_out}")
    order = sorted(images, key=lambda p: p.as_posix())
    random.Random(seed).shuffle(order)
    per = (len(order) - held_out - public) // edges if per_edge is None else per_edge
    if per < 1 or held_out + public + edges * per > len(order):
        raise DatasetError(
            f"{len(order)} images cannot give {held_out} held-out, {public} public images and "
            f"{edges} edge(s) x {per if per > 0 else 'at least 1'} images"
        )
    rest = order[held_out + public :]
    return ImageSplit(
        [rest[k * per : (k + 1) * per] for k in range(edges)], order[:held_out], order[held_out : held_out + public]
    )


def link_yolo_folder(images: list[Path], dest: Path, labels: bool = True) -> Path:
    """``dest/images/*`` and (``labels``) ``dest/labels/*.txt`` as symlinks to the originals (YOLO layout)."""
    if dest.exists():
        shutil.rmtree(dest)  # only symlinks of an earlier run: the originals are untouched
    (dest / "images").mkdir(parents=True)
    (dest / "labels").mkdir()
    for image in images:
        link = dest / "images" / image.name
        if link.exists():
            raise DatasetError(f"two images named {image.name}: cannot link both into {dest}")
        link.symlink_to(image.resolve())
        label = img2label_path(image)
        if labels and label.is_file():
            (dest / "labels" / label.name).symlink_to(label.resolve())
    return dest


def prepare_coco128_job(opts: DemoOptions, root: Path) -> Path:
    """Per-role dataset folders (symlinks) and the job file for the pretrained YOLOv5 checkpoint."""
    from common.checkpoint import load_weights

    data = opts.data or find_default(DEFAULT_COCO128, "coco128")
    weights = opts.model or find_default(DEFAULT_YOLO_WEIGHTS, "yolov5n")
    if not data.exists():
        hint = missing_hint("coco128", "--data DIR (YOLO layout: images/ and labels/)")
        raise DatasetError(f"COCO128 not found at {data}: {hint}")
    if not weights.is_file():
        hint = missing_hint("yolov5n", "--model PATH")
        raise MistnetError(f"pretrained YOLOv5 weights not found at {weights}: {hint}")
    split = split_images(discover_images(data), opts.edges, opts.per_edge, opts.held_out, public=opts.public)
    folders = root / "data"
    edge_dirs = [link_yolo_folder(imgs, folders / f"edge{k}") for k, imgs in enumerate(split.edges, 1)]
    validation = link_yolo_folder(split.held_out, folders / "held-out")
    # Images only: adaptation needs no labels, and the cloud is given none.
    public = link_yolo_folder(split.public, folders / "public", labels=False) if split.public else None
    loaded = load_weights(weights)
    spec = JobSpec(
        name="coco128-demo",
        model=ModelSpec(
            arch=loaded.arch,
            num_classes=loaded.num_classes,
            pretrained=str(weights.resolve()),
            image_size=opts.image_size,
        ),
        cut_layer=opts.cut_layer or COCO_CUT,
        privacy=PrivacySpec(epsilon=opts.epsilon, bits=opts.bits),
        edges=[
            EdgeSpec(node=f"edge{k}", dataset=str(d), batch_size=COCO_TRANSFER_SAMPLES)
            for k, d in enumerate(edge_dirs, 1)
        ],
        cloud=CloudSpec(
            epochs=COCO_EPOCHS if opts.epochs is None else opts.epochs,
            batch_size=opts.batch_size or COCO_BATCH_SIZE,
            learning_rate=opts.learning_rate or COCO_LEARNING_RATE,
            validation=str(validation),
            output=str(root / "coco128-demo.safetensors"),
            public=str(public) if public else None,
            adapt=AdaptSpec(epochs=opts.decoder_epochs),
        ),
        collect=CollectSpec(timeout_s=300),
    )
    return write_job(spec, root / "job.yaml")


# running -----------------------------------------------------------------------------------------


def prepare_job(opts: DemoOptions, root: Path) -> tuple[Path, str]:
    """The scenario's job file and the job's name."""
    if opts.scenario == "mnist":
        return prepare_mnist_job(opts, root), "mnist-demo"
    if opts.scenario == "coco128":
        return prepare_coco128_job(opts, root), "coco128-demo"
    raise SpecError(f"unknown demo scenario {opts.scenario!r}; choose one of {', '.join(SCENARIOS)}")


def mistnet_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mistnet.cli", *args]


def run_demo(opts: DemoOptions) -> JobSummary:
    root = opts.workdir or Path(tempfile.mkdtemp(prefix="mistnet-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    console.print(
        f"[bold]MistNet demo[/]: {opts.scenario}, {opts.edges} edges, epsilon {opts.epsilon:g}, workdir {root}"
    )
    job, name = prepare_job(opts, root)
    with start_embedded_broker(root / "broker") as broker:
        console.print(f"broker: {broker.kind} at {broker.url}")
        logs = root / "logs"
        logs.mkdir(exist_ok=True)
        procs = [
            subprocess.Popen(
                mistnet_command("edge", "--node", f"edge{k}", "--broker", broker.url, "--once"),
                stdout=subprocess.DEVNULL,
                stderr=(logs / f"edge{k}.log").open("wb"),
                **child_options(),
            )
            for k in range(1, opts.edges + 1)
        ]
        cloud = subprocess.Popen(
            mistnet_command(
                "cloud", "--job", str(job), "--broker", broker.url, "--workdir", str(root / "cloud"), "--json"
            ),
            stdout=subprocess.PIPE,
            stderr=(logs / "cloud.log").open("wb"),
            **child_options(),
        )
        try:
            watch(BrokerOptions(url=broker.url), cloud, console, name)
            out, _ = cloud.communicate(timeout=60)
        finally:
            for p in [*procs, cloud]:
                if p.poll() is None:
                    p.terminate()
            for p in [*procs, cloud]:  # none may outlive the demo (Ctrl-C, SIGTERM)
                p.wait(timeout=30)
    if cloud.returncode != 0:
        raise MistnetError(f"the cloud agent failed (exit {cloud.returncode}); see {logs / 'cloud.log'}")
    return JobSummary.model_validate_json(out)


def watch(broker: BrokerOptions, cloud: subprocess.Popen[bytes], console: Console, job: str = "mnist-demo") -> None:
    """Progress from the status topics until the cloud process ends (plain lines when not on a terminal)."""
    board = StatusBoard(job)
    link = status_link(broker)
    link.connect()
    try:
        follow(link, board, console, lambda: cloud.poll() is None, tail_s=0.3)
    finally:
        link.close()


def print_summary(summary: JobSummary, console: Console, started: float) -> None:
    console.print(
        f"\n[bold]job {summary.job}: {summary.phase.value}[/] in {time.monotonic() - started:.1f} s "
        f"(cloud {summary.duration_s:.1f} s)"
    )
    for node, edge in summary.edges.items():
        per = edge.wire_bytes / edge.samples if edge.samples else 0
        console.print(f"  {node}: {edge.samples} samples, {edge.wire_bytes:,} bytes on the wire ({per:.1f} B/sample)")
    metrics = summary.metrics
    for key, value in metrics.items():
        if key.endswith("_before"):
            continue
        before = metrics.get(f"{key}_before")
        shown = f"{before:.4f} before training -> {value:.4f} after" if before is not None else f"{value:.4f}"
        console.print(f"  held-out {key}: {shown}")
    console.print(f"  checkpoint: {summary.checkpoint}")
