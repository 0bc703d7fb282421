"""``mistnet demo``: broker, cloud and edges as separate processes on this machine, over MQTT only.

Three scenarios:

- ``mnist`` (default): LeNet-5 pretrained on a public slice of MNIST, edges holding private slices.
- ``coco128``: the pretrained YOLOv5 checkpoint (default ``../shared/weights/yolov5n.pt``) on COCO128
  (default ``../shared/data/coco128``). The images are split deterministically into one folder per
  edge and a held-out folder the cloud evaluates on; the folders hold symlinks to the original
  images and labels, so no data is copied.
- ``coco-person``: the same checkpoint on person images it was never trained on (default
  ``../shared/data/coco-person``), optionally under a COCO-C shift that every labelled image gets
  (edges and held-out, never the cloud's public images: the cloud does not have the edges'
  conditions); the cloud adapts on a folder of unlabelled public photos (default
  ``../shared/data/public-images``). With ``baselines``, the same images also train a centralized
  fine-tune (what uploading them would give) and the pretrained model is scored beside it.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field
from rich.console import Console
from safetensors.torch import save_file

from broker.launcher import start_embedded_broker
from cloud_agent.pretrain import pretrain_classifier
from common import constants as C
from common.datasets.mnist import load_tensors, prepare_mnist
from common.datasets.shift import Shift
from common.datasets.yolo import discover_images
from common.errors import DatasetError, MistnetError, SpecError
from common.jobspec import (
    AdaptSpec,
    CloudSpec,
    CollectSpec,
    EdgeSpec,
    HeadStatistics,
    JobSpec,
    ModelSpec,
    PrivacySpec,
    load_job,
)
from common.lifecycle import spawn
from common.models.lenet import LeNet5
from common.protocol import JobSummary, Message
from common.transport import BrokerOptions
from mistnet.flags import find_default, missing_hint
from mistnet.monitor import StatusBoard, follow, status_link
from scenarios.defaults import (
    COCO_BATCH_SIZE,
    COCO_CUT,
    COCO_EPOCHS,
    COCO_HELD_OUT,
    COCO_IMAGE_SIZE,
    COCO_PUBLIC,
    COCO_TRANSFER_SAMPLES,
    DEFAULT_COCO128,
    DEFAULT_COCO_PERSON,
    DEFAULT_PUBLIC_IMAGES,
    DEFAULT_YOLO_WEIGHTS,
    MNIST_CUT,
    MNIST_EPOCHS,
    PERSON_EPOCHS,
    PERSON_HELD_OUT,
)
from scenarios.folders import ImageSplit, link_yolo_folder, shifted_split, split_images

SCENARIOS = ("mnist", "coco128", "coco-person")

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
    per_edge: int | None = None  # detection: images per edge; None: all that the held-out split leaves
    held_out: int | None = None  # detection: images the cloud keeps for evaluation; None: the scenario's
    # detection: unlabelled images the cloud adapts with: a number split off the data (0: no adaptation)
    # or a folder of images; None: the scenario's default
    public: int | Path | None = None
    shift: Shift | None = None  # detection: a COCO-C corruption of every labelled image
    baselines: bool = False  # detection: also the pretrained model's score and a centralized fine-tune
    bits: int | Literal["auto"] = "auto"  # bits per activation on the wire (privacy.bits)
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


# detection ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectionScenario:
    """A detection scenario's defaults."""

    name: str
    title: str
    data: Path
    held_out: int
    public: int | Path  # images split off the data, or a folder of unlabelled images
    fetchable: bool  # `mistnet fetch NAME` installs the data
    epochs: int

    def default_data(self) -> Path:
        return find_default(self.data, self.name) if self.fetchable else self.data

    def missing_hint(self) -> str:
        flag = "--data DIR (YOLO layout: images/ and labels/)"
        return missing_hint(self.name, flag) if self.fetchable else f"pass {flag}"


DETECTION_SCENARIOS = {
    "coco128": DetectionScenario("coco128", "COCO128", DEFAULT_COCO128, COCO_HELD_OUT, COCO_PUBLIC, True, COCO_EPOCHS),
    "coco-person": DetectionScenario(
        "coco-person", "coco-person", DEFAULT_COCO_PERSON, PERSON_HELD_OUT, DEFAULT_PUBLIC_IMAGES, False, PERSON_EPOCHS
    ),
}


@dataclass(frozen=True)
class PreparedJob:
    """A scenario's job file and the folders its baselines read."""

    path: Path
    spec: JobSpec
    edges: list[Path]  # detection: the edges' labelled folders (the centralized baseline trains on them)


def public_folder(public: int | Path, split: ImageSplit, folders: Path) -> Path | None:
    """The cloud's unlabelled images: a folder as given, or the images split off the data (no labels)."""
    if isinstance(public, Path):
        if not public.is_dir():
            raise DatasetError(f"public images not found at {public}: pass --public DIR or a number")
        return public.resolve()
    return link_yolo_folder(split.public, folders / "public", labels=False) if split.public else None


def prepare_detection_job(opts: DemoOptions, root: Path) -> PreparedJob:
    """Per-role dataset folders (symlinks) and the job file for the pretrained YOLOv5 checkpoint."""
    from common.checkpoint import load_weights

    scenario = DETECTION_SCENARIOS[opts.scenario]
    data = opts.data or scenario.default_data()
    weights = opts.model or find_default(DEFAULT_YOLO_WEIGHTS, "yolov5n")
    if not data.exists():
        raise DatasetError(f"{scenario.title} not found at {data}: {scenario.missing_hint()}")
    if not weights.is_file():
        hint = missing_hint("yolov5n", "--model PATH")
        raise MistnetError(f"pretrained YOLOv5 weights not found at {weights}: {hint}")
    folders = root / "data"
    public = scenario.public if opts.public is None else opts.public
    held_out = scenario.held_out if opts.held_out is None else opts.held_out
    count = public if isinstance(public, int) else 0
    split = split_images(discover_images(data), opts.edges, opts.per_edge, held_out, public=count)
    if opts.shift is not None:
        dest = folders / f"shifted-{opts.shift.corruption}-{opts.shift.severity}"
        split = shifted_split(split, data, opts.shift, dest)
    edge_dirs = [link_yolo_folder(imgs, folders / f"edge{k}") for k, imgs in enumerate(split.edges, 1)]
    validation = link_yolo_folder(split.held_out, folders / "held-out")
    adapt_on = public_folder(public, split, folders)
    loaded = load_weights(weights)
    name = f"{scenario.name}-demo"
    spec = JobSpec(
        name=name,
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
            epochs=scenario.epochs if opts.epochs is None else opts.epochs,
            batch_size=opts.batch_size or COCO_BATCH_SIZE,
            learning_rate=opts.learning_rate or C.DETECTION_LEARNING_RATE,
            validation=str(validation),
            output=str(root / f"{name}.safetensors"),
            public=str(adapt_on) if adapt_on else None,
            adapt=AdaptSpec(epochs=opts.decoder_epochs),
        ),
        collect=CollectSpec(timeout_s=300),
    )
    return PreparedJob(write_job(spec, root / "job.yaml"), spec, edge_dirs)


# running -----------------------------------------------------------------------------------------


def prepare_job(opts: DemoOptions, root: Path) -> PreparedJob:
    """The scenario's job file and spec, and the folders its baselines read."""
    if opts.scenario == "mnist":
        path = prepare_mnist_job(opts, root)
        return PreparedJob(path, load_job(path), [])
    if opts.scenario in DETECTION_SCENARIOS:
        return prepare_detection_job(opts, root)
    raise SpecError(f"unknown demo scenario {opts.scenario!r}; choose one of {', '.join(SCENARIOS)}")


def mistnet_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mistnet.cli", *args]


class BaselineResult(Message):
    """A model the demo scores beside MistNet's on the same held-out images."""

    checkpoint: str | None = None
    metrics: dict[str, float]


class DemoSummary(JobSummary):
    """``mistnet demo --json``: the job's summary, plus its baselines when asked for."""

    baselines: dict[str, BaselineResult] = Field(default_factory=dict)


def run_demo(opts: DemoOptions) -> DemoSummary:
    root = opts.workdir or Path(tempfile.mkdtemp(prefix="mistnet-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    console.print(
        f"[bold]MistNet demo[/]: {opts.scenario}, {opts.edges} edges, epsilon {opts.epsilon:g}, workdir {root}"
    )
    prepared = prepare_job(opts, root)
    job, name = prepared.path, prepared.spec.name
    with start_embedded_broker(root / "broker") as broker:
        console.print(f"broker: {broker.kind} at {broker.url}")
        logs = root / "logs"
        logs.mkdir(exist_ok=True)
        procs = [
            spawn(
                mistnet_command("edge", "--node", f"edge{k}", "--broker", broker.url, "--once"),
                stdout=subprocess.DEVNULL,
                stderr=(logs / f"edge{k}.log").open("wb"),
            )
            for k in range(1, opts.edges + 1)
        ]
        cloud = spawn(
            mistnet_command(
                "cloud", "--job", str(job), "--broker", broker.url, "--workdir", str(root / "cloud"), "--json"
            ),
            stdout=subprocess.PIPE,
            stderr=(logs / "cloud.log").open("wb"),
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
    summary = JobSummary.model_validate_json(out)
    baselines = run_baselines(prepared, root, console) if opts.baselines else {}
    return DemoSummary(**summary.model_dump(), baselines=baselines)


def run_baselines(prepared: PreparedJob, root: Path, console: Console) -> dict[str, BaselineResult]:
    """The pretrained model and a centralized fine-tune on the edges' raw images (same epochs,
    batch size and learning rate as the job), scored on the job's held-out images."""
    from cloud_agent.centralized import ImageDetection, fine_tune, save_fine_tuned
    from cloud_agent.trainer import TrainConfig
    from common.checkpoint import load_model
    from common.datasets.yolo import YoloDataset
    from common.evaluation import with_local_head
    from mistnet.progress import EpochProgress

    spec = prepared.spec
    if not prepared.edges or spec.cloud.validation is None or spec.model.pretrained is None:
        raise SpecError(f"the {spec.name} scenario has no baselines (they need labelled images and a checkpoint)")
    weights, size = Path(spec.model.pretrained), spec.model.image_size or 640
    task = ImageDetection(Path(spec.cloud.validation), size)
    console.print("baseline: the pretrained model, full precision, on the held-out images")
    pretrained = task.evaluate(load_model(weights)[0], 0, lambda f: f, "cpu")
    found = {"pretrained": BaselineResult(metrics=pretrained)}
    if spec.model.head_statistics == HeadStatistics.LOCAL:
        console.print("baseline: the same, its head's BatchNorm statistics those of the held-out images")
        local = with_local_head(load_model(weights)[0], spec.cut_layer, YoloDataset(Path(spec.cloud.validation), size))
        found["pretrained_local_head"] = BaselineResult(metrics=task.evaluate(local, 0, lambda f: f, "cpu"))
    console.print(f"baseline: centralized fine-tune on the edges' raw images, {spec.cloud.epochs} epochs")
    config = TrainConfig(spec.cloud.epochs, spec.cloud.batch_size, spec.cloud.learning_rate, seed=spec.seed)
    out = root / "centralized.safetensors"
    with EpochProgress("centralized", config.epochs) as progress:
        result = fine_tune(weights, prepared.edges, Path(spec.cloud.validation), size, config, out.with_suffix(".run"),
                           progress.epoch, progress.step)  # fmt: skip
    save_fine_tuned(result, weights, size, out)
    last = next((e.metrics for e in reversed(result.history.epochs) if e.metrics), result.before)
    return {**found, "centralized": BaselineResult(checkpoint=str(out), metrics=last)}


def watch(broker: BrokerOptions, cloud: subprocess.Popen[bytes], console: Console, job: str = "mnist-demo") -> None:
    """Progress from the status topics until the cloud process ends (plain lines when not on a terminal)."""
    board = StatusBoard(job)
    link = status_link(broker)
    link.connect()
    try:
        follow(link, board, console, lambda: cloud.poll() is None, tail_s=0.3)
    finally:
        link.close()


def print_demo_summary(summary: JobSummary, console: Console, started: float) -> None:
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
    if isinstance(summary, DemoSummary):
        for name, baseline in summary.baselines.items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in baseline.metrics.items())
            where = f" ({baseline.checkpoint})" if baseline.checkpoint else ""
            console.print(f"  baseline {name}: held-out {shown}{where}")
