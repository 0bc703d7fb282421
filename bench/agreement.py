"""Do the two edge runtimes release the same levels? ``python -m bench.agreement``

For each model and cut, the torch edge's head (:class:`~edge_agent.torch_head.TorchExtractor`:
BatchNorm folded, channels-last) and the onnx edge's (:class:`~edge_agent.onnx_head.OnnxExtractor`
on the cloud's export) run on the same letterboxed images, and their levels *before*
randomization are compared, with ``x > 0`` (no thresholds) and with 1-bit thresholds calibrated
as the cloud calibrates them (:func:`cloud_agent.adaptation.calibrate` on public images), and, to
show why they are moved off ties, with the raw per-channel medians calibration used to return. The
disagreement is the fraction of activations whose level differs.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from bench.util import BENCH_SHARED
from cloud_agent.adaptation import augmented_inputs, calibrate, calibration_outputs, public_images
from cloud_agent.export import export_head
from common.datasets.base import EdgeDataset
from common.datasets.mnist import MnistShard, prepare_mnist
from common.datasets.yolo import YoloEdgeDataset
from common.heads import head_chunks
from common.mechanism import LevelEncoder
from common.models.registry import build
from common.protocol import OnnxHead
from edge_agent.onnx_head import OnnxExtractor
from edge_agent.torch_head import TorchExtractor

GOAL = 1e-3  # issue 13: under 0.1 % of released levels differ


def images(dataset: Any, count: int) -> np.ndarray:
    loaded = [dataset.load(i).image for i in range(min(count, len(dataset)))]
    return np.stack([x for x in loaded if x is not None])


def levels(encoder: LevelEncoder, outputs: dict[int, np.ndarray]) -> np.ndarray:
    return np.concatenate([encoder.array_levels(i, y).reshape(len(y), -1) for i, y in outputs.items()], axis=1)


def raw_medians(outputs: dict[int, torch.Tensor]) -> dict[int, np.ndarray]:
    """1-bit thresholds as calibrated before they were moved off ties: the per-channel medians."""
    return {i: torch.quantile(y.transpose(0, 1).reshape(y.shape[1], -1).float()[:, :: max(1, y[:, 0].numel() >> 20)],
                              0.5, dim=1)[:, None].numpy() for i, y in outputs.items() if y.dim() == 4}


def compare(model: nn.Module, cut: int, x: np.ndarray, public: torch.Tensor, step: int) -> dict[str, Any]:
    """Disagreement of the two runtimes' levels on ``x`` at one cut, without and with thresholds."""
    shape = list(x.shape[1:])
    blob, layout = export_head(model, cut, shape)
    outputs = calibration_outputs(model, cut, iter(public.split(8)), "cpu")
    thresholds = {i: t.numpy() for i, t in calibrate(outputs, 1).items()}
    encoders = {
        "x>0": LevelEncoder(100.0),
        "calibrated": LevelEncoder(100.0, thresholds=thresholds),
        "raw quantiles": LevelEncoder(100.0, thresholds=raw_medians(outputs)),
    }
    no_data = cast(EdgeDataset, [])  # the heads run on ``x`` directly
    head = OnnxHead(manifest=head_chunks("agreement", blob, 1 << 20)[0], input_shape=shape, outputs=layout)
    onnx = OnnxExtractor(head, blob, encoders["x>0"], no_data, 1)
    torch_head = TorchExtractor(copy.deepcopy(model), cut, encoders["x>0"], no_data, 1)
    differ = dict.fromkeys(encoders, 0)
    total, seconds = 0, {"torch": 0.0, "onnx": 0.0}
    for start in range(0, len(x), step):
        batch = x[start : start + step]
        t0 = time.perf_counter()
        a = {i: y.cpu().numpy() for i, y in torch_head.head(torch.from_numpy(batch)).items()}
        t1 = time.perf_counter()
        b = onnx.run(batch)
        seconds["torch"] += t1 - t0
        seconds["onnx"] += time.perf_counter() - t1
        for name, encoder in encoders.items():
            differ[name] += int((levels(encoder, a) != levels(encoder, b)).sum())
        total += sum(y[0].size for y in a.values()) * len(batch)
    return {"cut": cut, "outputs": [f.layer for f in layout], "activations": total,
            **{f"disagreement {k}": v / total for k, v in differ.items()},
            **{f"{k}_s": round(v, 2) for k, v in seconds.items()}}


def yolo_rows(arch: str, weights: Path | None, cuts: list[int], count: int, public: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    if weights is not None:
        from cloud_agent.model_io import load_pretrained

        model = load_pretrained(str(weights), arch, 80)
    else:
        model = build(arch, 80)  # random init: exercises the shapes only
    model.eval()
    x = images(YoloEdgeDataset(BENCH_SHARED / "data" / "coco128", 640), count)
    pub = torch.cat(list(augmented_inputs(public_images(BENCH_SHARED / "data" / "public-images")[:public], 640)))
    return [{"arch": arch, "weights": str(weights or "random init"), "images": len(x), **compare(model, cut, x, pub, 2)}
            for cut in cuts]


def lenet_rows(workdir: Path, cuts: list[int]) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    split = prepare_mnist(workdir, 1)
    model = build("lenet5", 10).eval()  # random init; LeNet's public digits calibrate it as the demo does
    x = images(MnistShard(split.edges[0]), 1000)
    pub = torch.from_numpy(images(MnistShard(split.public), 1000))
    return [{"arch": "lenet5", "weights": "random init", "images": len(x), **compare(model, cut, x, pub, 256)}
            for cut in cuts]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=32, help="COCO128 images per YOLO cut")
    parser.add_argument("--public", type=int, default=16, help="public images to calibrate on (x4 augmented)")
    parser.add_argument("--cuts", default="1-10")
    parser.add_argument("--out", type=Path, default=Path("bench/results/agreement.json"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mistnet-agreement"))
    args = parser.parse_args()
    lo, _, hi = args.cuts.partition("-")
    cuts = list(range(int(lo), int(hi or lo) + 1))
    torch.set_num_threads(2)
    rows = lenet_rows(args.workdir, [1, 2, 3, 4, 5])
    rows += yolo_rows("yolov5n", BENCH_SHARED / "weights" / "yolov5n.pt", cuts, args.images, args.public)
    rows += yolo_rows("yolov5s", None, cuts, args.images // 2, args.public)
    for row in rows:
        print(json.dumps(row), flush=True)
    worst = max(r[k] for r in rows for k in ("disagreement x>0", "disagreement calibrated"))
    args.out.write_text(json.dumps({"goal": GOAL, "worst": worst, "rows": rows}, indent=1))
    print(f"worst disagreement {worst:.2e} (goal < {GOAL:.0e})")
    return 0 if worst < GOAL else 1


if __name__ == "__main__":
    raise SystemExit(main())
