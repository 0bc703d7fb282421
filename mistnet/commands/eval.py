"""``mistnet eval``: a detector's mAP@0.5 and mAP@0.5:0.95 on a YOLO-format dataset."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from common.errors import CheckpointError, DatasetError
from mistnet.flags import image_size, positive_int

log = logging.getLogger("mistnet.eval")


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "eval",
        help="measure a detector's mAP on a YOLO-format dataset",
        description="Loads weights safely (official YOLOv5 .pt, a state_dict, safetensors or a MistNet "
        "checkpoint), runs every image of the dataset and scores the detections with "
        "pycocotools at upstream val.py settings (conf 0.001, IoU 0.6, 300 per image).",
    )
    p.add_argument("--model", required=True, type=Path, help="weights file")
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="dataset: a COCO128-style folder (images/ + labels/), a folder holding one, or a .txt list",
    )
    p.add_argument(
        "--imgsz",
        type=image_size,
        default=None,
        help="input size in pixels (default: the checkpoint's image_size, else 640)",
    )
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass (default 16)")
    p.add_argument(
        "--square",
        action="store_true",
        help="square letterbox for every image (as edges feed the head) instead of upstream "
        "val.py's rectangular batches",
    )
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def predict_fn_for(model: Any, metadata: dict[str, Any], dataset: Any) -> Any:
    """The plain model, or for a MistNet checkpoint (metadata has ``cut_layer``) head -> bits -> tail,
    since its tail was trained on privatized bits and never sees real-valued features; with the
    head's BatchNorm statistics of ``dataset``'s images when it was trained with
    ``model.head_statistics: local`` (its edges ran their heads that way)."""
    from common.evaluation import model_predict_fn, split_predict_fn, with_local_head
    from common.jobspec import HeadStatistics
    from common.privacy import feature_transform

    cut = metadata.get("cut_layer")
    if cut is None:
        return model_predict_fn(model)
    if metadata.get("head_statistics") == HeadStatistics.LOCAL:
        log.info("re-estimating the head's BatchNorm statistics on %s (head_statistics: local)", dataset.root)
        model = with_local_head(model, int(cut), dataset)
    return split_predict_fn(model, int(cut), feature_transform(metadata))


def run(args: argparse.Namespace) -> int:
    from common.checkpoint import load_model
    from common.datasets.yolo import YoloDataset
    from common.evaluation import evaluate_model
    from common.models.archs import default_image_size, is_detector

    model, weights = load_model(args.model)
    if not is_detector(weights.arch):
        raise CheckpointError(f"{args.model} holds a {weights.arch} model; eval measures detectors (yolov5*)")
    model.to(args.device)
    args.imgsz = args.imgsz or int(weights.metadata.get("image_size") or default_image_size(weights.arch))
    dataset = YoloDataset(args.data, args.imgsz)
    _check_classes(dataset, weights.num_classes)
    result = _evaluate(evaluate_model, predict_fn_for(model, weights.metadata, dataset), dataset, args)
    for s in result["skipped"][:5]:
        log.warning("skipped %s: %s", s["path"], s["reason"])
    if len(result["skipped"]) > 5:
        log.warning("skipped %d more images", len(result["skipped"]) - 5)
    summary = {k: result[k] for k in ("images", "boxes", "map50", "map50_95", "imgsz")}
    summary.update(model=str(args.model), seconds=result["seconds"])
    if args.json:
        print(json.dumps(summary))
    else:
        print(_table(summary, weights.arch, weights.num_classes, len(result["skipped"]), not args.square))
    return 0


def _check_classes(dataset: Any, num_classes: int) -> None:
    top = max(
        (int(dataset.source_labels(i)[:, 0].max()) for i in dataset.usable if len(dataset.source_labels(i))), default=-1
    )
    if top >= num_classes:
        raise DatasetError(f"dataset {dataset.root} has class id {top}, but the model has {num_classes} classes")


def _evaluate(evaluate_model: Any, predict: Any, dataset: Any, args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("eval", total=len(dataset))
        return dict(
            evaluate_model(
                predict,
                dataset,
                args.imgsz,
                args.batch_size,
                rect=not args.square,
                device=args.device,
                progress=lambda done, total: bar.update(task, completed=done),
            )
        )


def _table(s: dict[str, Any], arch: str, nc: int, skipped: int, rect: bool) -> str:
    rows = [
        ("model", f"{s['model']} ({arch}, {nc} classes)"),
        ("images", f"{s['images']} ({s['boxes']} boxes, {skipped} skipped)"),
        ("imgsz", f"{s['imgsz']} ({'rect batches' if rect else 'square'})"),
        ("mAP@0.5", f"{s['map50']:.3f}"),
        ("mAP@0.5:0.95", f"{s['map50_95']:.3f}"),
        ("time", f"{s['seconds']:.1f} s"),
    ]
    return "\n".join(f"{k:<13} {v}" for k, v in rows)
