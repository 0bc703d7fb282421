"""``mistnet privacy-report``: a feature-inversion attack on what edges send, as SSIM/PSNR and pictures."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.errors import SpecError
from mistnet.flags import add_bits_flag, find_default, image_size, positive_int
from scenarios.defaults import DEFAULT_COCO128, DEFAULT_YOLO_WEIGHTS


def _epsilons(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"every epsilon must be > 0, got {text!r}")
    return values


def attacked_bits(asked: int | str, metadata: dict[str, Any], thresholds: str) -> Callable[[float], int]:
    """Bits per activation at each ε: a checkpoint's own (its thresholds fix them), else ``--bits``
    (``auto``: as a job's ``privacy.bits: auto`` with calibrated thresholds; zero thresholds give 1)."""
    from common.jobspec import auto_bits

    if metadata.get("thresholds"):
        return lambda eps: int(metadata.get("bits", 1))
    if thresholds == "zero":
        if asked not in ("auto", 1):
            raise SpecError(f"--bits {asked}: zero thresholds give 1 bit per activation (use --thresholds calibrated)")
        return lambda eps: 1
    return auto_bits if asked == "auto" else (lambda eps: int(asked))


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "privacy-report",
        help="measure how well the cloud can reconstruct edge images from their features",
        description="Trains an inversion decoder on public images (the cloud's) to reconstruct the image from "
        "what an edge sends, at each epsilon and from real-valued features (no MistNet), and scores it on "
        "held-out images with SSIM and PSNR. Writes privacy-report.json and reconstructions.png to --out.",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=find_default(DEFAULT_COCO128, "coco128"),
        help="YOLO-format images (default: COCO128 in ../shared, else from `mistnet fetch coco128`)",
    )
    p.add_argument(
        "--model",
        type=Path,
        default=find_default(DEFAULT_YOLO_WEIGHTS, "yolov5n"),
        help="pretrained weights or a MistNet checkpoint (default: yolov5n in ../shared, else fetched)",
    )
    p.add_argument("--cut", type=positive_int, help="cut layer (default: the checkpoint's, else 4)")
    p.add_argument("--imgsz", type=image_size, default=192, help="input size in pixels (default 192)")
    p.add_argument("--epsilons", type=_epsilons, default=[100.0, 4.0, 2.0, 1.0], help="default 100,4,2,1")
    add_bits_flag(p, "bits per activation of the levels attacked (default auto: as a job at each epsilon sends them)")
    p.add_argument("--epochs", type=positive_int, default=8, help="attack training epochs (default 8)")
    p.add_argument("--public", type=positive_int, default=32, help="public images the attacker trains on")
    p.add_argument("--held-out", type=positive_int, default=32, help="images the attack is scored on")
    p.add_argument(
        "--thresholds",
        choices=("calibrated", "zero"),
        default="calibrated",
        help="bit thresholds when the model has none (default: calibrated on the public images)",
    )
    p.add_argument("--out", type=Path, default=Path("privacy-report"), help="output folder")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from cloud_agent.adaptation import augmented_inputs, calibrate, calibration_outputs
    from common.checkpoint import load_model
    from common.datasets.yolo import YoloDataset, discover_images
    from common.privacy import thresholds_from_metadata
    from mistnet.privacy_report import plot_samples, run_attacks, table, write_privacy_report
    from scenarios.folders import link_yolo_folder, split_images

    console = Console(stderr=True)
    model, weights = load_model(args.model)
    cut = args.cut or int(weights.metadata.get("cut_layer") or 4)
    split = split_images(discover_images(args.data), 1, 1, args.held_out, public=args.public)
    work = args.out / "data"
    public = link_yolo_folder(split.public, work / "public", labels=False)
    held_out = link_yolo_folder(split.held_out, work / "held-out")
    bits_at = attacked_bits(args.bits, weights.metadata, args.thresholds)
    own = thresholds_from_metadata(weights.metadata)
    thresholds = {int(weights.metadata.get("bits", 1)): own} if own else {}  # none: a bit is x > 0
    if not own and args.thresholds == "calibrated":
        outputs = calibration_outputs(model, cut, augmented_inputs(discover_images(public), args.imgsz), "cpu")
        thresholds = {b: calibrate(outputs, b) for b in {bits_at(e) for e in args.epsilons}}
    results, shown, originals = run_attacks(
        model,
        cut,
        YoloDataset(public, args.imgsz),
        YoloDataset(held_out, args.imgsz),
        [None, *args.epsilons],
        thresholds,
        bits_at,
        args.epochs,
        lambda message: console.log(message),
    )
    meta = {
        "model": str(args.model),
        "cut_layer": cut,
        "imgsz": args.imgsz,
        "epochs": args.epochs,
        "public": len(split.public),
        "held_out": len(split.held_out),
        "thresholds": "checkpoint" if weights.metadata.get("thresholds") else args.thresholds,
    }
    report = write_privacy_report(results, args.out, meta)
    plot_samples(shown, originals, results, args.out / "reconstructions.png")
    if args.json:
        sys.stdout.write(json.dumps({**meta, "attacks": [r.__dict__ for r in results]}) + "\n")
    else:
        print(table(results, len(split.held_out)))
        print(f"\nwrote {report} and {args.out / 'reconstructions.png'}")
    return 0
