"""`mistnet train`: the centralized fine-tune baseline, its checkpoint, curves and resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cloud_agent.centralized import ImageSamples
from common.datasets.yolo import discover_images
from scenarios.folders import link_yolo_folder

SHARED = Path(__file__).resolve().parents[2] / "shared"
WEIGHTS = SHARED / "weights" / "yolov5n.pt"
COCO128 = SHARED / "data" / "coco128"

pytestmark = pytest.mark.slow


def mistnet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mistnet.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("centralized")
    images = discover_images(COCO128)
    return link_yolo_folder(images[:4], root / "train"), link_yolo_folder(images[4:6], root / "val")


def test_flip_mirrors_boxes_with_the_image(folders: tuple[Path, Path]) -> None:
    plain = ImageSamples([folders[0]], 128, flip=False)[0]
    torch.manual_seed(0)
    flips = [ImageSamples([folders[0]], 128, flip=True)[0] for _ in range(16)]
    mirrored = [s for s in flips if not torch.equal(s.image, plain.image)]
    assert 0 < len(mirrored) < 16
    for s in mirrored:
        assert torch.equal(s.image, plain.image.flip(-1))
        assert torch.allclose(s.labels[:, 1], 1 - plain.labels[:, 1])
        assert torch.equal(s.labels[:, [0, 2, 3, 4]], plain.labels[:, [0, 2, 3, 4]])


def test_train_writes_an_evaluable_checkpoint_with_curves_and_resumes(folders: tuple[Path, Path], tmp_path: Path):
    train, val = folders
    out = tmp_path / "ft.safetensors"
    common = ["train", "--model", str(WEIGHTS), "--data", str(train), "--val", str(val), "--imgsz", "96",
              "--batch-size", "2", "--out", str(out), "--json"]  # fmt: skip
    first = mistnet(*common, "--epochs", "1")
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads(first.stdout)
    assert summary["epochs"] == 1 and set(summary["metrics"]) == {"map50", "map50_95"}
    assert set(summary["metrics_before"]) == {"map50", "map50_95"}
    assert (tmp_path / "ft.run" / "loss.png").stat().st_size > 1000
    # Asked for a second epoch with the same output, the run resumes after the first.
    second = mistnet(*common, "--epochs", "2")
    assert second.returncode == 0, second.stderr[-2000:]
    assert json.loads(second.stdout)["epochs"] == 2
    assert "resuming training after epoch 1" in second.stderr
    scored = mistnet("eval", "--model", str(out), "--data", str(val), "--imgsz", "96", "--square", "--json")
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert json.loads(scored.stdout)["map50_95"] == pytest.approx(json.loads(second.stdout)["metrics"]["map50_95"],
                                                                  abs=1e-3)  # fmt: skip


def test_train_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    missing = mistnet("train", "--model", str(WEIGHTS), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    size = mistnet("train", "--model", str(WEIGHTS), "--data", str(COCO128), "--imgsz", "100", "--out", "x")
    assert size.returncode == 2 and "multiple of 32" in size.stderr


def test_demo_baselines_name_evaluable_checkpoints(tmp_path: Path) -> None:
    from rich.console import Console

    from common.datasets.shift import Shift
    from mistnet.demo import DemoOptions, prepare_detection_job, run_baselines

    opts = DemoOptions(scenario="coco-person", shift=Shift("fog", 3), per_edge=2, held_out=2, public=0,
                       image_size=96, epochs=1, batch_size=2)  # fmt: skip
    prepared = prepare_detection_job(opts, tmp_path)
    baselines = run_baselines(prepared, tmp_path, Console(stderr=True))
    assert set(baselines) == {"pretrained", "pretrained_local_head", "centralized"}
    assert baselines["pretrained"].checkpoint is None
    assert set(baselines["pretrained"].metrics) == {"map50", "map50_95"}
    assert baselines["pretrained_local_head"].metrics != baselines["pretrained"].metrics
    held_out = str(tmp_path / "data" / "held-out")
    scored = mistnet("eval", "--model", str(baselines["centralized"].checkpoint), "--data", held_out, "--imgsz", "96",
                     "--square", "--json")  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-2000:]
    expected = baselines["centralized"].metrics["map50_95"]
    assert json.loads(scored.stdout)["map50_95"] == pytest.approx(expected, abs=1e-3)
