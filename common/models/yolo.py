"""YOLOv5 (release v6.x/v7.0 architecture: SPPF backbone), sizes n/s/m/l/x, any class count.

Module names, layer order and parameter shapes follow upstream ``models/yolo.py`` and
``models/common.py`` exactly, so an official checkpoint's tensors load by name
(``model.{i}.cv1.conv.weight``, ``model.24.m.0.weight``, ``model.24.anchors``...). Every layer
carries ``f`` (the from-index of the upstream yaml) and ``i``: :mod:`common.split` routes by them,
which is what lets MistNet cut the network between an edge head and a cloud tail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from common.errors import SpecError
from common.split import sources

DEFAULT_IMAGE_SIZE = 640
# Pixel anchors (w, h) per detection level P3/8, P4/16, P5/32, as in the upstream yaml.
ANCHORS: tuple[tuple[int, ...], ...] = (
    (10, 13, 16, 30, 33, 23),
    (30, 61, 62, 45, 59, 119),
    (116, 90, 156, 198, 373, 326),
)
STRIDES = (8, 16, 32)
# arch -> (depth_multiple, width_multiple)
SIZES: dict[str, tuple[float, float]] = {
    "yolov5n": (0.33, 0.25),
    "yolov5s": (0.33, 0.50),
    "yolov5m": (0.67, 0.75),
    "yolov5l": (1.0, 1.0),
    "yolov5x": (1.33, 1.25),
}
# BatchNorm settings upstream's initialize_weights applies; eps matters for matching outputs.
BN_EPS = 1e-3
BN_MOMENTUM = 0.03

# (from, repeats, type, args) rows of yolov5{n,s,m,l,x}.yaml (v6); "nc" is Detect's placeholder.
LayerSpec = tuple[int | list[int], int, str, list[Any]]
LAYOUT: tuple[LayerSpec, ...] = (
    # backbone
    (-1, 1, "Conv", [64, 6, 2, 2]),  # 0-P1/2
    (-1, 1, "Conv", [128, 3, 2]),  # 1-P2/4
    (-1, 3, "C3", [128]),
    (-1, 1, "Conv", [256, 3, 2]),  # 3-P3/8
    (-1, 6, "C3", [256]),
    (-1, 1, "Conv", [512, 3, 2]),  # 5-P4/16
    (-1, 9, "C3", [512]),
    (-1, 1, "Conv", [1024, 3, 2]),  # 7-P5/32
    (-1, 3, "C3", [1024]),
    (-1, 1, "SPPF", [1024, 5]),  # 9
    # head
    (-1, 1, "Conv", [512, 1, 1]),
    (-1, 1, "Upsample", []),
    ([-1, 6], 1, "Concat", []),  # cat backbone P4
    (-1, 3, "C3", [512, False]),  # 13
    (-1, 1, "Conv", [256, 1, 1]),
    (-1, 1, "Upsample", []),
    ([-1, 4], 1, "Concat", []),  # cat backbone P3
    (-1, 3, "C3", [256, False]),  # 17 (P3/8-small)
    (-1, 1, "Conv", [256, 3, 2]),
    ([-1, 14], 1, "Concat", []),  # cat head P4
    (-1, 3, "C3", [512, False]),  # 20 (P4/16-medium)
    (-1, 1, "Conv", [512, 3, 2]),
    ([-1, 10], 1, "Concat", []),  # cat head P5
    (-1, 3, "C3", [1024, False]),  # 23 (P5/32-large)
    ([17, 20, 23], 1, "Detect", []),  # 24
)


def make_divisible(x: float, divisor: int = 8) -> int:
    """Channel counts upstream rounds up to a multiple of 8 after width scaling."""
    return math.ceil(x / divisor) * divisor


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + SiLU, 'same' padding: upstream's basic block."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 then 3x3 conv, with a residual add when the shapes allow and ``shortcut`` asks."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP bottleneck with 3 convolutions: a bottleneck branch and a 1x1 bypass, concatenated."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast form: three chained max-pools instead of 5/9/13 in parallel."""

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Concat(nn.Module):
    """Concatenates the routed inputs along channels."""

    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


class Detect(nn.Module):
    """One 1x1 conv per level predicting (x, y, w, h, obj, classes) for each of ``na`` anchors.

    Training mode returns the raw per-level maps ``[B, na, H, W, 5+nc]`` the loss needs; eval mode
    also decodes them to pixel boxes ``[B, N, 5+nc]`` (sigmoid applied), as upstream does.
    ``anchors`` is stored in grid units (pixels / stride), like the upstream buffer.
    """

    def __init__(self, nc: int, anchors: Sequence[Sequence[int]], ch: Sequence[int],
                 strides: Sequence[int] = STRIDES) -> None:
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        stride = torch.tensor(strides, dtype=torch.float32)
        grid_anchors = torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2) / stride.view(-1, 1, 1)
        self.register_buffer("anchors", grid_anchors)
        # Not in the state_dict (upstream keeps it as a plain attribute), but follows .to(device).
        self.register_buffer("stride", stride, persistent=False)
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        raw = []
        for conv, x in zip(self.m, xs, strict=True):
            y = conv(x)
            bs, _, ny, nx = y.shape
            raw.append(y.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous())
        if self.training:
            return raw
        return torch.cat([self.decode(y, i) for i, y in enumerate(raw)], 1), raw

    def decode(self, y: torch.Tensor, i: int) -> torch.Tensor:
        """Raw level-``i`` map to ``[B, na*H*W, no]`` boxes (cx, cy, w, h in input pixels)."""
        bs, na, ny, nx, no = y.shape
        grid, anchor_grid = self.make_grid(nx, ny, i)
        xy, wh, conf = y.sigmoid().split((2, 2, self.nc + 1), 4)
        stride = self.stride[i]  # type: ignore[index]
        xy = (xy * 2 + grid) * stride
        wh = (wh * 2) ** 2 * anchor_grid
        return torch.cat((xy, wh, conf), 4).view(bs, na * ny * nx, no)

    def make_grid(self, nx: int, ny: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell offsets (shifted by -0.5, as upstream) and pixel anchor sizes for one level."""
        anchors: torch.Tensor = self.anchors  # type: ignore[assignment]
        stride: torch.Tensor = self.stride  # type: ignore[assignment]
        d, t = anchors.device, anchors.dtype
        shape = (1, self.na, ny, nx, 2)
        yv, xv = torch.meshgrid(torch.arange(ny, device=d, dtype=t), torch.arange(nx, device=d, dtype=t),
                                indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5
        anchor_grid = (anchors[i] * stride[i]).view((1, self.na, 1, 1, 2)).expand(shape)
        return grid, anchor_grid


def _route_attrs(layer: nn.Module, f: int | list[int], i: int, kind: str) -> nn.Module:
    setattr(layer, "f", f)  # noqa: B010 - nn.Module's typed __setattr__ only takes tensors/modules
    setattr(layer, "i", i)  # noqa: B010
    setattr(layer, "type", kind)  # noqa: B010
    return layer


def build_layers(depth: float, width: float, num_classes: int) -> tuple[list[nn.Module], list[int]]:
    """Upstream ``parse_model`` for the v6 layout: scaled layers and their output channels."""
    ch = [3]
    layers: list[nn.Module] = []
    for i, (f, n, kind, args) in enumerate(LAYOUT):
        n = max(round(n * depth), 1) if n > 1 else n
        c1 = ch[f] if isinstance(f, int) else 0
        layer: nn.Module
        if kind in ("Conv", "C3", "SPPF"):
            c2 = make_divisible(args[0] * width)
            if kind == "Conv":
                layer = Conv(c1, c2, *args[1:])
            elif kind == "C3":
                layer = C3(c1, c2, n, *args[1:])
            else:
                layer = SPPF(c1, c2, *args[1:])
        elif kind == "Upsample":
            layer, c2 = nn.Upsample(None, 2, "nearest"), c1
        elif kind == "Concat":
            assert isinstance(f, list)
            layer, c2 = Concat(1), sum(ch[j + 1 if j != -1 else -1] for j in f)
        else:  # Detect
            assert isinstance(f, list)
            layer, c2 = Detect(num_classes, ANCHORS, [ch[j + 1] for j in f]), 0
        layers.append(_route_attrs(layer, f, i, kind))
        ch.append(c2)
    return layers, ch[1:]


def _explicit_sources(layer: nn.Module) -> list[int]:
    f = getattr(layer, "f", -1)
    return [j for j in ([f] if isinstance(f, int) else f) if j != -1]


class YOLOv5(nn.Module):
    """The whole detector as a routed model: ``self.model[i]`` is upstream layer ``i``."""

    default_image_size = DEFAULT_IMAGE_SIZE

    def __init__(self, depth: float = 0.33, width: float = 0.25, num_classes: int = 80, arch: str = "") -> None:
        super().__init__()
        if num_classes < 1:
            raise SpecError(f"a detector needs at least one class, got num_classes={num_classes}")
        self.arch = arch
        self.nc = num_classes
        layers, _ = build_layers(depth, width, num_classes)
        self.model = nn.Sequential(*layers)
        # Outputs later layers read besides their predecessor: [4, 6, 10, 14, 17, 20, 23].
        self.save = sorted({j for m in layers for j in _explicit_sources(m)})
        self.stride = torch.tensor(STRIDES, dtype=torch.float32)
        self._initialize_biases()

    @property
    def detect(self) -> Detect:
        head = self.model[-1]
        assert isinstance(head, Detect)
        return head

    def _initialize_biases(self) -> None:
        """Upstream's prior for a fresh head: ~8 objects per 640 image, uniform classes."""
        det = self.detect
        for conv, s in zip(det.m, STRIDES, strict=True):
            assert isinstance(conv, nn.Conv2d) and conv.bias is not None
            b = conv.bias.detach().view(det.na, -1)
            b[:, 4] += math.log(8 / (640 / s) ** 2)
            b[:, 5 : 5 + det.nc] += math.log(0.6 / (det.nc - 0.99999))

    def forward(self, x: torch.Tensor) -> Any:
        """Full model; keeps only the outputs some later layer routes from (``self.save``)."""
        outputs: dict[int, Any] = {-1: x}
        y: Any = x
        keep = set(self.save)
        for i, layer in enumerate(self.model):
            f = getattr(layer, "f", -1)
            srcs = sources(layer, i)
            y = layer(outputs[srcs[0]] if isinstance(f, int) else [outputs[j] for j in srcs])
            outputs[i] = y
            if i - 1 not in keep:
                outputs.pop(i - 1, None)
        return y


def build_model(arch: str, num_classes: int = 80) -> YOLOv5:
    """A freshly initialised YOLOv5 of a named size (yolov5n/s/m/l/x)."""
    if arch not in SIZES:
        raise SpecError(f"unknown YOLOv5 arch {arch!r}; choose one of {', '.join(SIZES)}")
    depth, width = SIZES[arch]
    return YOLOv5(depth, width, num_classes, arch=arch)


def yolo_size_from_shapes(first_conv_channels: int, c3_repeats: int) -> str | None:
    """The size whose layer 0 width and layer 2 bottleneck count match, or None."""
    for arch, (depth, width) in SIZES.items():
        if make_divisible(64 * width) == first_conv_channels and max(round(3 * depth), 1) == c3_repeats:
            return arch
    return None
