"""End to end over a real mosquitto: two edge processes and a cloud process, YOLOv5n on COCO128."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from common.checkpoint import load_weights
from mistnet.demo import DemoOptions, prepare_detection_job
from tests.agents import run_two_edge_job, spool_query

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "weights" / "yolov5n.pt"
COCO128 = SHARED / "data" / "coco128"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
]

IMGSZ = 192
PER_EDGE = 8


def test_two_edge_detection_job_reports_held_out_map_and_learns(tmp_path: Path, mosquitto) -> None:
    opts = DemoOptions(
        scenario="coco128",
        edges=2,
        per_edge=PER_EDGE,
        held_out=8,
        image_size=IMGSZ,
        epochs=3,
        batch_size=8,
        learning_rate=0.01,
        public=16,
        decoder_epochs=2,
    )
    job = prepare_detection_job(opts, tmp_path).path
    # Per-role folders are symlinks into the shared data, never copies.
    linked = sorted((tmp_path / "data" / "edge1" / "images").iterdir())
    assert len(linked) == PER_EDGE and all(p.is_symlink() for p in linked)
    summary = run_two_edge_job(job, mosquitto.url, tmp_path, 150)
    assert summary["phase"] == "done"
    assert all(e["samples"] == PER_EDGE for e in summary["edges"].values())
    # Held-out mAP before and after training, through head -> bits -> tail.
    metrics = summary["metrics"]
    assert set(metrics) == {"map50", "map50_95", "map50_before", "map50_95_before"}
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in metrics.values())
    # privacy.bits auto at ε 100 with public images: 4 bits per activation of layer 3 ([64, 24, 24] at
    # 192 px) plus labels and framing.
    per_sample = summary["edges"]["edge1"]["wire_bytes"] / PER_EDGE
    assert 64 * 24 * 24 * 4 / 8 <= per_sample < 64 * 24 * 24 * 4 / 8 * 1.15
    assert all(e["privacy"]["bits"] == 4 for e in summary["edges"].values())
    # The training loss (box + obj + cls per image) falls from the first epoch to the last.
    rows = spool_query(tmp_path / "cloud", "SELECT value FROM meta WHERE key='history'")
    history = json.loads(str(rows[0][0]))
    losses = [sum(e["losses"].values()) for e in history]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    # The cloud adapted on the public images before the job: the checkpoint carries the thresholds the
    # edges used and the cut decoder, so `mistnet eval` replays head -> thresholds -> decoder -> tail.
    weights = load_weights(summary["checkpoint"])
    assert weights.metadata["cut_layer"] == 4 and weights.metadata["bits"] == 4
    assert len(weights.metadata["thresholds"]["3"]) == 64 and weights.metadata["decoder"]["channels"] == {"3": 64}
    assert weights.decoder_state and (tmp_path / "cloud" / "adaptation.safetensors").exists()
