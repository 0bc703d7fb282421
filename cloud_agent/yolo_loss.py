"""YOLOv5's training loss (upstream ``utils/loss.py`` ``ComputeLoss``), computed for the cloud's tail.

Everything geometric comes from the model's own ``Detect`` layer (``model.model[-1]``): its anchors
(in grid units, per level), strides and class count. Targets are upstream's
``[n, 6]`` rows ``(image index, class, cx, cy, w, h)``, normalized to the (letterboxed) input.

Per level, a target is assigned to every anchor whose width and height ratios to it are all below
``anchor_t`` (4), in its own grid cell and in the up to two neighbouring cells its centre is
closest to (offset ``g`` = 0.5): that is what lets the ``2·sigmoid - 0.5`` centre parametrisation
reach it. The loss is then

- box: 1 - CIoU between the decoded prediction and the target (``torchvision.ops``),
- objectness: BCE against the (detached, clamped) CIoU at assigned cells and 0 elsewhere,
  weighted per level by ``balance`` (4.0, 1.0, 0.4 for P3, P4, P5),
- class: BCE against one-hot classes at assigned cells (skipped for a single-class model),

each scaled by its gain (box 0.05, obj 1.0, cls 0.5, upstream ``hyp.scratch-low``) adjusted the
way upstream ``train.py`` does for the number of levels, classes and the image size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, complete_box_iou_loss

from common.models.yolo import Detect

# Upstream's reference numbers: COCO's class count and image size the gains were tuned at.
REFERENCE_CLASSES = 80
REFERENCE_IMAGE_SIZE = 640
# Objectness weight per level: P3-P5, or P3-P7 for five-level heads.
BALANCE_3 = (4.0, 1.0, 0.4)
BALANCE_5 = (4.0, 1.0, 0.25, 0.06, 0.02)
# Neighbour-cell offsets (own cell, left, up, right, down), in units of the bias ``g``.
NEIGHBOUR_OFFSETS = ((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1))
TARGET_COLUMNS = 6  # image index, class, cx, cy, w, h

log = logging.getLogger("mistnet.cloud.loss")


@dataclass(frozen=True)
class LossGains:
    """Loss hyper-parameters as upstream ``hyp.scratch-low.yaml`` writes them (before scaling)."""

    box: float = 0.05
    obj: float = 1.0
    cls: float = 0.5
    anchor_t: float = 4.0
    neighbour_bias: float = 0.5

    def scaled(self, levels: int, classes: int, image_size: int) -> LossGains:
        """Upstream ``train.py``'s adjustment: per level, per class count, per image area."""
        per_level = 3 / levels
        return replace(
            self,
            box=self.box * per_level,
            cls=self.cls * classes / REFERENCE_CLASSES * per_level,
            obj=self.obj * (image_size / REFERENCE_IMAGE_SIZE) ** 2 * per_level,
        )


@dataclass(frozen=True)
class LevelTargets:
    """Targets assigned to one detection level: one row per (target, anchor, cell) match."""

    image: torch.Tensor  # [m] long
    anchor: torch.Tensor  # [m] long
    gy: torch.Tensor  # [m] long, cell row
    gx: torch.Tensor  # [m] long, cell column
    box: torch.Tensor  # [m, 4] float: centre relative to the cell, size in grid units
    anchor_wh: torch.Tensor  # [m, 2] float, grid units
    cls: torch.Tensor  # [m] long

    def __len__(self) -> int:
        return int(self.image.shape[0])


def detect_layer(model: nn.Module) -> Detect:
    layers = getattr(model, "model", None)
    head = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    if not isinstance(head, Detect):
        raise TypeError(f"{type(model).__name__} has no YOLOv5 Detect layer as its last layer")
    return head


class YoloLoss:
    """``loss, parts = YoloLoss(model)(raw_maps, targets)``.

    ``raw_maps`` is the Detect layer's training-mode output, per level ``[B, na, ny, nx, 5+nc]``.
    ``loss`` is the per-image loss times the batch size (upstream's convention, which its learning
    rates assume); ``parts`` holds the per-image ``box``, ``obj`` and ``cls`` terms as floats, so
    ``sum(parts.values())`` is ``loss / B``.
    """

    def __init__(self, model: nn.Module, gains: LossGains | None = None) -> None:
        detect = detect_layer(model)
        self.detect = detect
        self.nc = detect.nc
        self.na = detect.na
        self.nl = detect.nl
        self.gains = gains or LossGains()
        self.balance = BALANCE_3 if self.nl == 3 else BALANCE_5[: self.nl]

    def image_size(self, maps: Sequence[torch.Tensor]) -> int:
        """The input's long side in pixels, read off the finest level's grid."""
        stride: torch.Tensor = self.detect.stride  # type: ignore[assignment]
        return int(max(maps[0].shape[2:4]) * float(stride[0]))

    def __call__(self, maps: Sequence[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if len(maps) != self.nl:
            raise ValueError(f"expected {self.nl} detection levels, got {len(maps)} (is the model in training mode?)")
        if targets.dim() != 2 or targets.shape[1] != TARGET_COLUMNS:
            raise ValueError(
                f"targets must be [n, {TARGET_COLUMNS}] (image, cls, cx, cy, w, h), got {list(targets.shape)}"
            )
        gains = self.gains.scaled(self.nl, self.nc, self.image_size(maps))
        device = maps[0].device
        targets = self.known_classes(targets.to(device=device, dtype=torch.float32))
        zero = torch.zeros((), device=device)
        lbox, lobj, lcls = zero, zero, zero
        for level, (raw, assigned) in enumerate(zip(maps, self.build_targets(maps, targets), strict=True)):
            pred = raw.float()
            tobj = torch.zeros(pred.shape[:4], device=device)
            if len(assigned):
                sel = pred[assigned.image, assigned.anchor, assigned.gy, assigned.gx]
                pxy = sel[:, 0:2].sigmoid() * 2 - 0.5
                pwh = ((sel[:, 2:4].sigmoid() * 2) ** 2 * assigned.anchor_wh).clamp(min=1e-9)
                pbox = box_convert(torch.cat((pxy, pwh), 1), "cxcywh", "xyxy")
                tbox = box_convert(assigned.box, "cxcywh", "xyxy")
                ciou_loss = complete_box_iou_loss(pbox, tbox)
                lbox = lbox + ciou_loss.mean()
                # Objectness target: how well the box fits (CIoU), 0 where nothing was assigned.
                tobj[assigned.image, assigned.anchor, assigned.gy, assigned.gx] = (1.0 - ciou_loss).detach().clamp(0)
                if self.nc > 1:
                    onehot = F.one_hot(assigned.cls, self.nc).to(sel.dtype)
                    lcls = lcls + F.binary_cross_entropy_with_logits(sel[:, 5:], onehot)
            lobj = lobj + F.binary_cross_entropy_with_logits(pred[..., 4], tobj) * self.balance[level]
        lbox, lobj, lcls = lbox * gains.box, lobj * gains.obj, lcls * gains.cls
        batch = maps[0].shape[0]
        parts = {"box": float(lbox.detach()), "obj": float(lobj.detach()), "cls": float(lcls.detach())}
        return (lbox + lobj + lcls) * batch, parts

    def known_classes(self, targets: torch.Tensor) -> torch.Tensor:
        """Boxes of classes the model does not have are ignored (with a warning), not a crash."""
        ok = (targets[:, 1] >= 0) & (targets[:, 1] < self.nc)
        if not bool(ok.all()):
            bad = sorted({int(c) for c in targets[~ok, 1].tolist()})
            log.warning("ignoring %d boxes of classes %s: the model has %d classes", int((~ok).sum()), bad[:5], self.nc)
            targets = targets[ok]
        return targets

    def build_targets(self, maps: Sequence[torch.Tensor], targets: torch.Tensor) -> list[LevelTargets]:
        """Assign every target to anchors (shape ratio < ``anchor_t``) and cells, level by level."""
        device = targets.device
        anchors_all: torch.Tensor = self.detect.anchors  # type: ignore[assignment]
        bias = self.gains.neighbour_bias
        offsets = torch.tensor(NEIGHBOUR_OFFSETS, device=device, dtype=torch.float32) * bias
        out = []
        for level, raw in enumerate(maps):
            ny, nx = raw.shape[2], raw.shape[3]
            anchors = anchors_all[level].to(device=device, dtype=torch.float32)  # [na, 2], grid units
            scale = torch.tensor([nx, ny], device=device, dtype=torch.float32)
            gxy_all = targets[:, 2:4] * scale
            gwh_all = targets[:, 4:6] * scale
            # Shape match: width and height within a factor anchor_t of the anchor's, [na, nt].
            ratio = gwh_all[None] / anchors[:, None]
            match = torch.max(ratio, 1 / ratio).amax(2) < self.gains.anchor_t
            anchor_idx, target_idx = match.nonzero(as_tuple=True)
            gxy, gwh = gxy_all[target_idx], gwh_all[target_idx]
            # Neighbours: the cell to the left/above when the centre sits in that half of its cell
            # (and not in the first cell), to the right/below likewise; never past the grid.
            inverse = scale - gxy
            near_low = (gxy % 1 < bias) & (gxy > 1)
            near_high = (inverse % 1 < bias) & (inverse > 1)
            use = torch.stack(
                (torch.ones_like(near_low[:, 0]), near_low[:, 0], near_low[:, 1], near_high[:, 0], near_high[:, 1])
            )  # [5, m]
            which, row = use.nonzero(as_tuple=True)
            cell_xy = gxy[row] - offsets[which]
            gx = cell_xy[:, 0].long().clamp_(0, nx - 1)
            gy = cell_xy[:, 1].long().clamp_(0, ny - 1)
            cells = torch.stack((gx, gy), 1).to(gxy.dtype)
            t = target_idx[row]
            a = anchor_idx[row]
            out.append(
                LevelTargets(
                    image=targets[t, 0].long(),
                    anchor=a,
                    gy=gy,
                    gx=gx,
                    box=torch.cat((gxy[row] - cells, gwh[row]), 1),
                    anchor_wh=anchors[a],
                    cls=targets[t, 1].long(),
                )
            )
        return out
