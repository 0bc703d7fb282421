"""Post-processing of YOLOv5 outputs: box formats, non-maximum suppression, mapping boxes back.

Mirrors upstream ``utils/general.py`` (``non_max_suppression``, ``scale_boxes``) so that mAP figures
are comparable with upstream ``val.py``, minus its wall-clock time limit (results must not depend
on how busy the machine is).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision

# Upstream's caps: boxes fed to NMS per image and the largest box side (pixels).
MAX_NMS = 30000
MAX_WH = 7680


def xywh2xyxy(x: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) to (x1, y1, x2, y2)."""
    y = x.clone()
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def xyxy2xywh(x: torch.Tensor) -> torch.Tensor:
    """(x1, y1, x2, y2) to (cx, cy, w, h)."""
    y = x.clone()
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def non_max_suppression(prediction: torch.Tensor, conf_thres: float = 0.25, iou_thres: float = 0.45,
                        max_det: int = 300, multi_label: bool = False, agnostic: bool = False,
                        classes: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Per image ``[n, 6]`` rows (x1, y1, x2, y2, conf, cls) from decoded ``[B, N, 5+nc]`` predictions.

    ``conf`` is objectness x class probability. ``multi_label`` keeps every class above
    ``conf_thres`` for a box (upstream val.py's mAP setting), otherwise only the best class.
    """
    if not 0 <= conf_thres <= 1 or not 0 <= iou_thres <= 1:
        raise ValueError(f"thresholds must lie in 0..1, got conf {conf_thres}, iou {iou_thres}")
    nc = prediction.shape[2] - 5
    multi_label &= nc > 1
    output = []
    for x in prediction:
        x = x[x[:, 4] > conf_thres]
        output.append(_nms_one(x, nc, conf_thres, iou_thres, max_det, multi_label, agnostic, classes))
    return output


def _nms_one(x: torch.Tensor, nc: int, conf_thres: float, iou_thres: float, max_det: int,
             multi_label: bool, agnostic: bool, classes: Sequence[int] | None) -> torch.Tensor:
    if not x.shape[0]:
        return x.new_zeros((0, 6))
    scores = x[:, 5:] * x[:, 4:5]
    box = xywh2xyxy(x[:, :4])
    if multi_label:
        i, j = (scores > conf_thres).nonzero(as_tuple=False).T
        dets = torch.cat((box[i], scores[i, j, None], j[:, None].float()), 1)
    else:
        conf, j = scores.max(1, keepdim=True)
        dets = torch.cat((box, conf, j.float()), 1)[conf.view(-1) > conf_thres]
    if classes is not None:
        dets = dets[(dets[:, 5:6] == torch.tensor(classes, device=dets.device)).any(1)]
    if not dets.shape[0]:
        return dets.new_zeros((0, 6))
    dets = dets[dets[:, 4].argsort(descending=True)[:MAX_NMS]]
    groups = torch.zeros_like(dets[:, 5]) if agnostic else dets[:, 5]
    keep = torchvision.ops.batched_nms(dets[:, :4], dets[:, 4], groups, iou_thres)[:max_det]
    return dets[keep]


def clip_boxes(boxes: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Clamp xyxy boxes in place to an image of ``shape`` (h, w)."""
    boxes[..., [0, 2]] = boxes[..., [0, 2]].clamp(0, shape[1])
    boxes[..., [1, 3]] = boxes[..., [1, 3]].clamp(0, shape[0])
    return boxes


def scale_boxes(boxes: torch.Tensor, ratio: float, pad: tuple[float, float],
                orig_hw: tuple[int, int]) -> torch.Tensor:
    """xyxy boxes in letterboxed-input pixels back to original-image pixels (a new tensor)."""
    out = boxes.clone()
    out[..., [0, 2]] -= pad[0]
    out[..., [1, 3]] -= pad[1]
    out[..., :4] /= ratio
    return clip_boxes(out, orig_hw)


def letterbox_geometry(orig_hw: tuple[int, int], size: int) -> tuple[float, tuple[float, float]]:
    """(ratio, pad) of a square letterbox without the image at hand, as upstream's ``scale_boxes``."""
    h0, w0 = orig_hw
    gain = min(size / h0, size / w0)
    return gain, ((size - w0 * gain) / 2, (size - h0 * gain) / 2)
