"""``mistnet demo``: the whole system on one machine, with live progress."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from mistnet.flags import add_bits_flag


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="run broker, cloud and edges locally on real data and print the summary",
        description="Starts a broker, a cloud agent and edge agents as separate processes that talk only over "
        "MQTT, runs a MistNet job with live progress and prints the summary. Scenarios: mnist (LeNet-5 on MNIST "
        "digits), coco128 (a pretrained YOLOv5 on COCO128, split between the edges and a held-out set the "
        "cloud reports mAP on, before and after training) and coco-person (the same model on 800 COCO person "
        "images it never saw, optionally under a COCO-C --shift, adapted on unlabelled public photos; "
        "--baselines adds the pretrained model's score and a centralized fine-tune on the edges' raw images).",
    )
    p.add_argument(
        "--scenario", choices=["mnist", "coco128", "coco-person"], default="mnist", help="which job (default mnist)"
    )
    p.add_argument("--edges", type=int, default=2, help="number of edge agents (default 2)")
    p.add_argument("--epsilon", type=float, default=100.0, help="LDP budget per bit (default 100)")
    p.add_argument("--epochs", type=int, help="cloud training epochs (default: mnist 6, coco128 10, coco-person 6)")
    p.add_argument("--cut-layer", type=int, help="edges run layers [0, N) (default: mnist 2, coco128 4)")
    p.add_argument("--learning-rate", type=float, help="cloud learning rate (default: mnist 0.02, coco128 0.001)")
    p.add_argument(
        "--data",
        type=Path,
        help="coco128: YOLO-format dataset to split (default ../shared/data/coco128 beside the checkout, "
        "else the copy `mistnet fetch coco128` installs)",
    )
    p.add_argument(
        "--model",
        type=Path,
        help="coco128: pretrained YOLOv5 checkpoint (default ../shared/weights/yolov5n.pt beside the checkout, "
        "else the copy `mistnet fetch yolov5n` installs)",
    )
    add_detection_flags(p)
    add_bits_flag(p, "bits per activation (default auto: 4 at the default ε 100 with public images, 1 at ε 4 or less)")
    p.add_argument("--workdir", type=Path, help="keep data, logs and checkpoint here (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON summary object on stdout")
    p.set_defaults(func=run)


def add_detection_flags(p: argparse.ArgumentParser) -> None:
    """The flags of the detection scenarios (coco128, coco-person)."""
    p.add_argument("--imgsz", type=int, default=320, help="detection: input size in pixels (default 320)")
    p.add_argument(
        "--held-out", type=int, help="detection: images kept for the cloud's evaluation (coco128 32, coco-person 200)"
    )
    p.add_argument("--per-edge", type=int, help="detection: images per edge (default: the rest, shared equally)")
    p.add_argument(
        "--public",
        type=public_images_flag,
        help="detection: unlabelled images the cloud adapts with (thresholds, cut decoder): a number split off "
        "the data (0: none) or a folder of images (default: coco128 32, coco-person ../shared/data/public-images)",
    )
    p.add_argument(
        "--shift",
        type=shift_flag,
        metavar="NAME:SEVERITY",
        help="detection: a COCO-C corruption of every labelled image, edges and held-out (e.g. contrast:5)",
    )
    p.add_argument(
        "--baselines",
        action="store_true",
        help="detection: also score the pretrained model and a centralized fine-tune on the edges' raw images",
    )


def public_images_flag(text: str) -> int | Path:
    """``--public``: a count of images to split off the data, or a folder of unlabelled images."""
    if text.strip().isdigit():
        return int(text)
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"neither a number of images nor a folder: {text}")
    return Path(text)


def shift_flag(text: str) -> Any:
    from common.datasets.shift import Shift
    from common.errors import DatasetError

    try:
        return Shift.parse(text)
    except DatasetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from common.errors import SpecError
    from mistnet.demo import DemoOptions, print_demo_summary, run_demo

    if args.edges < 1:
        raise SpecError(f"--edges must be at least 1, got {args.edges}")
    if not args.epsilon > 0:
        raise SpecError(f"--epsilon must be > 0, got {args.epsilon}")
    if args.epochs is not None and args.epochs < 0:
        raise SpecError(f"--epochs must be >= 0, got {args.epochs}")
    if args.baselines and args.scenario == "mnist":
        raise SpecError("--baselines needs a detection scenario (coco128, coco-person)")
    if args.imgsz < 32 or args.imgsz % 32:
        raise SpecError(f"--imgsz must be a positive multiple of 32, got {args.imgsz}")
    started = time.monotonic()
    summary = run_demo(
        DemoOptions(
            edges=args.edges,
            epsilon=args.epsilon,
            epochs=args.epochs,
            cut_layer=args.cut_layer,
            learning_rate=args.learning_rate,
            workdir=args.workdir,
            json=args.json,
            scenario=args.scenario,
            data=args.data,
            model=args.model,
            image_size=args.imgsz,
            held_out=args.held_out,
            per_edge=args.per_edge,
            public=args.public,
            shift=args.shift,
            baselines=args.baselines,
            bits=args.bits,
        )
    )
    if args.json:
        sys.stdout.write(summary.model_dump_json() + "\n")
    else:
        print_demo_summary(summary, Console(), started)
    return 0
