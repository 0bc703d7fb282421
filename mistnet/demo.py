"""``mistnet demo``: broker, cloud and edges as separate processes on this machine, over MQTT only."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.console import Console
from rich.live import Live

from broker.launcher import start_embedded_broker
from cloud_agent.pretrain import pretrain_classifier
from common.checkpoint import save_checkpoint
from common.datasets.mnist import load_tensors, prepare_mnist
from common.errors import MistnetError
from common.jobfile import to_native
from common.models.lenet import LeNet5
from common.protocol import JobSummary
from common.spec import CloudSpec, CollectSpec, EdgeSpec, JobSpec, ModelSpec, PrivacySpec
from common.transport import BrokerOptions
from mistnet.monitor import StatusBoard, drain, status_link


@dataclass(frozen=True)
class DemoOptions:
    edges: int = 2
    epsilon: float = 100.0
    epochs: int = 6
    cut_layer: int = 2
    workdir: Path | None = None
    json: bool = False


def write_job(spec: JobSpec, path: Path) -> Path:
    path.write_text(yaml.safe_dump(to_native(spec), sort_keys=False))
    return path


def prepare_mnist_job(opts: DemoOptions, root: Path) -> Path:
    """Data split, pretrained LeNet-5 on the public slice, and the job file."""
    split = prepare_mnist(root / "data", opts.edges)
    images, labels = load_tensors(split.public)
    model = LeNet5()
    pretrain_classifier(model, images, labels)
    weights = root / "lenet5-pretrained.safetensors"
    save_checkpoint(weights, model.state_dict(), {"arch": "lenet5", "num_classes": 10})
    spec = JobSpec(
        name="mnist-demo",
        model=ModelSpec(arch="lenet5", num_classes=10, pretrained=str(weights)),
        cut_layer=opts.cut_layer,
        privacy=PrivacySpec(epsilon=opts.epsilon),
        edges=[EdgeSpec(node=f"edge{k}", dataset=str(p), batch_size=64) for k, p in enumerate(split.edges, 1)],
        cloud=CloudSpec(
            epochs=opts.epochs,
            batch_size=64,
            learning_rate=0.02,
            validation=str(split.test),
            output=str(root / "mnist-demo.safetensors"),
        ),
        collect=CollectSpec(timeout_s=120),
    )
    return write_job(spec, root / "job.yaml")


def mistnet_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mistnet.cli", *args]


def run_demo(opts: DemoOptions) -> JobSummary:
    root = opts.workdir or Path(tempfile.mkdtemp(prefix="mistnet-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    console.print(f"[bold]MistNet demo[/]: MNIST, {opts.edges} edges, epsilon {opts.epsilon:g}, workdir {root}")
    job = prepare_mnist_job(opts, root)
    with start_embedded_broker(root / "broker") as broker:
        console.print(f"broker: {broker.kind} at {broker.url}")
        logs = root / "logs"
        logs.mkdir(exist_ok=True)
        procs = [
            subprocess.Popen(
                mistnet_command("edge", "--node", f"edge{k}", "--broker", broker.url, "--once"),
                stdout=subprocess.DEVNULL,
                stderr=(logs / f"edge{k}.log").open("wb"),
            )
            for k in range(1, opts.edges + 1)
        ]
        cloud = subprocess.Popen(
            mistnet_command(
                "cloud", "--job", str(job), "--broker", broker.url, "--workdir", str(root / "cloud"), "--json"
            ),
            stdout=subprocess.PIPE,
            stderr=(logs / "cloud.log").open("wb"),
        )
        try:
            watch(BrokerOptions(url=broker.url), cloud, console)
            out, _ = cloud.communicate(timeout=60)
        finally:
            for p in [*procs, cloud]:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                p.wait(timeout=10)
    if cloud.returncode != 0:
        raise MistnetError(f"the cloud agent failed (exit {cloud.returncode}); see {logs / 'cloud.log'}")
    return JobSummary.model_validate_json(out)


def watch(broker: BrokerOptions, cloud: subprocess.Popen[bytes], console: Console) -> None:
    """Live progress from the status topics until the cloud process ends."""
    board = StatusBoard("mnist-demo")
    link = status_link(broker)
    link.connect()
    try:
        with Live(board.render(), console=console, refresh_per_second=4, transient=False) as live:
            while cloud.poll() is None:
                drain(link, board, 0.25)
                live.update(board.render())
            drain(link, board, 0.3)
            live.update(board.render())
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
    for key, value in summary.metrics.items():
        console.print(f"  {key}: {value:.4f}")
    console.print(f"  checkpoint: {summary.checkpoint}")
