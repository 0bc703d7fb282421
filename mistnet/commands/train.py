"""``mistnet train``: a plain fine-tune of a whole detector on raw labelled images.

The non-private upper bound MistNet is measured against (``mistnet demo --baselines`` runs it on the
edges' images): every layer trainable, the cloud trainer's recipe and loss, horizontal flips. Writes
the checkpoint atomically (``mistnet eval`` reads it), ``OUT.run/loss.png`` and ``metrics.png``,
and keeps per-epoch state in ``OUT.run/`` so a run stopped midway resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mistnet.flags import image_size, positive_int


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "train",
        help="fine-tune a whole YOLOv5 checkpoint on raw labelled images (the upload-the-images baseline)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, required=True, help="YOLOv5 checkpoint to start from (.pt or .safetensors)")
    p.add_argument("--data", type=Path, action="append", required=True, help="YOLO-format folder; repeat for more")
    p.add_argument("--val", type=Path, help="YOLO-format folder scored after every epoch (mAP)")
    p.add_argument("--imgsz", type=image_size, default=640, help="square input size in pixels (default 640)")
    p.add_argument("--epochs", type=positive_int, default=10, help="training epochs (default 10)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per step (default 16)")
    p.add_argument("--learning-rate", type=float, default=0.001, help="peak SGD learning rate (default 0.001)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    p.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cloud_agent.centralized import fine_tune, save_fine_tuned
    from cloud_agent.report import write_plots
    from cloud_agent.trainer import TrainConfig
    from common.errors import SpecError
    from mistnet.progress import EpochProgress

    if not args.learning_rate > 0:
        raise SpecError(f"--learning-rate must be > 0, got {args.learning_rate}")
    config = TrainConfig(args.epochs, args.batch_size, args.learning_rate, device=args.device)
    with EpochProgress("train", args.epochs) as progress:
        result = fine_tune(
            args.model, args.data, args.val, args.imgsz, config, args.out.with_suffix(".run"),
            progress.epoch, progress.step,
        )  # fmt: skip
    save_fine_tuned(result, args.model, args.imgsz, args.out)
    plots = write_plots(args.out.with_suffix(".run"), result.history, result.before, args.out.stem)
    last = next((e.metrics for e in reversed(result.history.epochs) if e.metrics), {})
    summary = {"checkpoint": str(args.out), "epochs": len(result.history.epochs), "metrics": last,
               "metrics_before": result.before, "plots": [str(p) for p in plots]}  # fmt: skip
    print(json.dumps(summary) if args.json else "\n".join(f"{k}: {v}" for k, v in summary.items()))
    return 0
