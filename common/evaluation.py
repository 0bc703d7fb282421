"""Detection accuracy: mAP@0.5 and mAP@0.5:0.95 computed by pycocotools, upstream val.py settings.

The model is reached only through ``predict_fn`` (a batch of letterboxed images in, the model's eval
output out), so the same evaluation serves the plain pretrained model and MistNet's
head -> bits -> tail path. Ground truth and detections are built as COCO structures in memory, in
original-image pixels, and scored by ``COCOeval`` (no hand-written AP).
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from common import constants as C
from common.batchnorm import reestimate_head, spread
from common.datasets.yolo import YoloDataset, YoloSample, rect_shape
from common.split import run_head, run_tail
from common.yolo_postprocess import non_max_suppression, scale_boxes

PredictFn = Callable[[torch.Tensor], Any]
ProgressFn = Callable[[int, int], None]
FeatureTransform = Callable[[dict[int, torch.Tensor]], dict[int, torch.Tensor]]

# upstream val.py
CONF_THRES = 0.001
IOU_THRES = 0.6
MAX_DET = 300


def model_predict_fn(model: nn.Module) -> PredictFn:
    """The plain path: the whole model in eval mode."""
    model.eval()
    return model


def with_local_head(model: nn.Module, cut: int, dataset: YoloDataset, batch_size: int = 16) -> nn.Module:
    """A copy of ``model`` whose head's BatchNorm statistics are those of ``dataset``'s images
    (letterboxed square, as edges feed the head): how a site runs a model trained with
    ``model.head_statistics: local`` (:mod:`common.batchnorm`). No labels are read."""
    local = copy.deepcopy(model)
    indices = spread(dataset.usable, C.HEAD_STATISTICS_IMAGES)

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, len(indices), batch_size):
            images = [s.image for s in map(dataset.load, indices[start : start + batch_size]) if s.image is not None]
            if images:
                yield torch.from_numpy(np.stack(images))

    reestimate_head(local, cut, batches())
    return local


def split_predict_fn(model: nn.Module, cut: int, transform: FeatureTransform) -> PredictFn:
    """Head, then ``transform`` on the head outputs (MistNet: bits + randomization), then tail."""
    model.eval()

    def predict(x: torch.Tensor) -> Any:
        return run_tail(model, transform(run_head(model, x, cut)), cut)

    return predict


def predictions_of(output: Any) -> torch.Tensor:
    """Decoded ``[B, N, 5+nc]`` from a model's eval output (upstream returns (decoded, raw))."""
    pred = output[0] if isinstance(output, tuple) else output
    if not isinstance(pred, torch.Tensor) or pred.dim() != 3:
        raise ValueError("predict_fn must return eval-mode detector output [B, N, 5+nc] "
                         "(is the model in training mode?)")
    return pred


def coco_ground_truth(targets: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]],
                      num_classes: int) -> dict[str, Any]:
    """COCO dataset dict from per-image normalized (cls, cx, cy, w, h); image id k+1, category cls+1."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    classes = set(range(num_classes))
    for k, (labels, (h, w)) in enumerate(zip(targets, sizes, strict=True)):
        images.append({"id": k + 1, "height": h, "width": w})
        for cls, cx, cy, bw, bh in labels.tolist():
            box = [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]
            annotations.append({"id": len(annotations) + 1, "image_id": k + 1, "category_id": int(cls) + 1,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
            classes.add(int(cls))
    return {"images": images, "annotations": annotations, "categories": [{"id": c + 1} for c in sorted(classes)]}


def coco_detections(detections: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
    """COCO result list from per-image ``[n, 6]`` (x1, y1, x2, y2, conf, cls) in original pixels."""
    results = []
    for k, det in enumerate(detections):
        for x1, y1, x2, y2, conf, cls in det.tolist():
            results.append({"image_id": k + 1, "category_id": int(cls) + 1,
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": conf})
    return results


def evaluate_detections(detections: Sequence[torch.Tensor], targets: Sequence[np.ndarray],
                        sizes: Sequence[tuple[int, int]], num_classes: int,
                        max_det: int = MAX_DET) -> dict[str, float]:
    """mAP@0.5 and mAP@0.5:0.95 over the classes present in ``targets`` (COCOeval, bbox)."""
    gt = coco_ground_truth(targets, sizes, num_classes)
    results = coco_detections(detections)
    if not gt["annotations"] or not results:
        return {"map50": 0.0, "map50_95": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        evaluator.params.maxDets = [1, 10, max_det]
        evaluator.evaluate()
        evaluator.accumulate()
    # precision[T iou, R recall, K class, A area, M maxDets]; -1 marks classes without ground truth.
    # Read directly: summarize() hard-codes maxDets=100 for its headline AP.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    at50 = precision[int(np.argmin(np.abs(evaluator.params.iouThrs - 0.5)))]
    return {"map50": _mean_valid(at50), "map50_95": _mean_valid(precision)}


def _mean_valid(precision: np.ndarray) -> float:
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else 0.0


def _batches(dataset: YoloDataset, imgsz: int, batch_size: int, rect: bool) -> Iterator[list[YoloSample]]:
    """Batches of samples, the next one decoded in a worker thread while the model runs.

    ``rect`` is upstream val.py's batching: images sorted by aspect ratio, each batch padded only to
    the rectangle its widest member needs (less padding, upstream-comparable mAP).
    """
    order = list(range(len(dataset)))
    if rect:
        order.sort(key=dataset.aspect)
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def load(chunk: list[int]) -> list[YoloSample]:
        shape = rect_shape([dataset.aspect(i) for i in chunk], imgsz) if rect else None
        return [dataset.load(i, imgsz, shape) for i in chunk]

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: Future[list[YoloSample]] | None = pool.submit(load, chunks[0]) if chunks else None
        for k in range(len(chunks)):
            assert pending is not None
            samples = pending.result()
            pending = pool.submit(load, chunks[k + 1]) if k + 1 < len(chunks) else None
            yield samples


def evaluate_model(predict_fn: PredictFn, dataset: YoloDataset, imgsz: int = 640, batch_size: int = 16, *,
                   conf_thres: float = CONF_THRES, iou_thres: float = IOU_THRES, max_det: int = MAX_DET,
                   rect: bool = True, device: str | torch.device = "cpu",
                   progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run ``predict_fn`` over every usable image, NMS as val.py (multi-label), score with COCOeval.

    ``rect`` (default) batches as upstream val.py does, which reproduces its published figures;
    ``rect=False`` letterboxes every image to a square, exactly what edges feed the head.

    Returns images and boxes evaluated, ``map50``, ``map50_95``, ``imgsz``, ``seconds`` and the
    ``skipped`` samples (index, path, reason).
    """
    start = time.perf_counter()
    detections: list[torch.Tensor] = []
    targets: list[np.ndarray] = []
    sizes: list[tuple[int, int]] = []
    num_classes, done = 0, 0
    for samples in _batches(dataset, imgsz, batch_size, rect):
        good = [s for s in samples if s.image is not None and s.letterbox is not None]
        if good:
            x = torch.from_numpy(np.stack([s.image for s in good if s.image is not None])).to(device)
            with torch.inference_mode():
                pred = predictions_of(predict_fn(x)).float().cpu()
            num_classes = pred.shape[2] - 5
            nms = non_max_suppression(pred, conf_thres, iou_thres, max_det, multi_label=True)
            for s, det in zip(good, nms, strict=True):
                assert s.letterbox is not None
                det[:, :4] = scale_boxes(det[:, :4], s.letterbox.ratio, s.letterbox.pad, s.letterbox.orig_hw)
                detections.append(det)
                targets.append(s.source_labels)
                sizes.append(s.letterbox.orig_hw)
        done += len(samples)
        if progress is not None:
            progress(done, len(dataset))
    scores = evaluate_detections(detections, targets, sizes, num_classes, max_det)
    return {
        "images": len(detections),
        "boxes": int(sum(len(t) for t in targets)),
        **scores,
        "imgsz": imgsz,
        "rect": rect,
        "seconds": round(time.perf_counter() - start, 3),
        "skipped": [{"index": s.index, "path": s.path, "reason": s.reason} for s in dataset.skipped],
    }
