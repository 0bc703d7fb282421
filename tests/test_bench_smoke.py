"""The benchmark machinery (``mistnet bench``) and the edge fast path it measures.

The smoke run starts real processes (mosquitto, cloud, edges, baselines) on tiny inputs; the other
tests check that the optimised encode and extractor give the same bits as the plain path.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from common.errors import MistnetError
from common.models.registry import build
from common.privacy import (
    BitEncoder,
    flip_mask,
    flip_precision,
    flip_probability,
    flip_threshold,
    keep_probability,
    pack_bits,
)
from common.split import run_head
from edge_agent.torch_head import TorchExtractor as Extractor
from edge_agent.torch_head import check_device

SUMMARY_KEYS = (
    "edge_throughput_ratio",
    "wire_bytes_ratio",
    "transport_ratio",
    "train_throughput_ratio",
    "edge_peak_rss_mib",
    "edge_rss_growth",
    "cloud_rss_growth",
    "onnx_edge_peak_rss_mib",
    "onnx_edge_throughput_ratio",
    "edge_installed_mb",
)


@pytest.mark.integration
def test_smoke_run_writes_every_key_results_plots_and_page(tmp_path):
    from bench.runner import run_bench

    out, docs = tmp_path / "results", tmp_path / "benchmarks.md"
    summary = run_bench("smoke", "cpu", out, docs, log=lambda line: None)
    for key in SUMMARY_KEYS:
        assert math.isfinite(summary[key]) and summary[key] > 0, (key, summary[key])
    assert json.loads((out / "summary.json").read_text())["edge_throughput_ratio"] == summary["edge_throughput_ratio"]
    for name in ("edge", "transport", "train", "memory", "scaling"):
        assert (out / f"{name}.json").is_file()
    assert (out / "edge_throughput.png").stat().st_size > 1000
    page = docs.read_text()
    assert "| edge throughput ratio" in page and "edge_throughput.png" in page


def test_cuda_device_fails_clearly_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MistnetError, match="CUDA is not available"):
        check_device("cuda")
    from bench.runner import run_bench

    with pytest.raises(MistnetError, match="CUDA is not available"):
        run_bench("smoke", "cuda", log=lambda line: None)
    assert check_device("cpu") == "cpu"


def test_bench_command_is_registered():
    from mistnet.cli import build_parser

    args = build_parser().parse_args(["bench", "--quick", "--json", "--device", "cpu"])
    assert args.quick and args.json and args.device == "cpu"


# the fast path the benchmarks measure ------------------------------------------------------------


def test_packed_encode_equals_per_sample_packing_without_randomization():
    outputs = {3: torch.randn(3, 6, 14, 13), 1: torch.randn(3, 3, 5, 7)}  # 1092 and 105 bits: padded bytes
    layout, packed = BitEncoder(100.0, seed=0).encode(outputs)
    assert [f.layer for f in layout] == [3, 1]
    for b in range(3):
        assert packed[b] == pack_bits(outputs[3][b] > 0) + pack_bits(outputs[1][b] > 0)


@pytest.mark.parametrize("eps", [0.5, 2.0, 4.0])
def test_packed_randomization_flips_at_one_minus_p_and_never_touches_padding(eps):
    x = torch.randn(16, 5, 31, 33)  # 5115 bits a sample: the last byte has 5 padding bits
    _layout, data = BitEncoder(eps, seed=7).encode_packed({0: x})
    flips = np.unpackbits(data ^ np.packbits((x > 0).reshape(16, -1).numpy(), axis=1), axis=1)
    n = 5 * 31 * 33
    assert flips[:, n:].sum() == 0
    q = 1 - keep_probability(eps)
    sigma = math.sqrt(q * (1 - q) / flips[:, :n].size)
    assert abs(flips[:, :n].mean() - q) < 5 * sigma


def test_flip_mask_probability_is_rounded_up_and_bits_are_independent():
    threshold = flip_threshold(4.0)
    assert threshold / 2**32 >= 1 - keep_probability(4.0) > (threshold - 1) / 2**32
    # Never skipped, never below what was asked: tiny probabilities resolve 2^-64 (at least one step).
    assert flip_precision(30.0) == 64 and flip_threshold(30.0) / 2**64 >= flip_probability(30.0)
    assert flip_threshold(30.0) / 2**64 < flip_probability(30.0) * (1 + 2**-40)
    assert flip_precision(100.0) == 64 and flip_threshold(100.0) == 1
    bits = np.unpackbits(flip_mask(np.random.default_rng(0), 1 << 17, 1 << 30))  # q = 1/4
    assert abs(bits.mean() - 0.25) < 0.005
    pairs = bits[:-1:2] & bits[1::2]
    assert abs(pairs.mean() - 0.0625) < 0.004


class _Images:
    def __init__(self, n: int, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = [torch.rand(3, size, size, generator=g).numpy() for _ in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int):
        from common.datasets.base import EdgeSample

        return EdgeSample(id=index, key=f"{index}.jpg", image=self.images[index], label=b"")


@pytest.mark.parametrize("prefetch", [False, True])
def test_prepared_extractor_gives_the_plain_heads_bits(monkeypatch, prefetch):
    torch.manual_seed(0)
    model = build("yolov5n", 80).eval()
    reference = build("yolov5n", 80).eval()
    reference.load_state_dict(model.state_dict())
    data = _Images(7, 96)
    monkeypatch.setattr(Extractor, "prefetch", prefetch)
    monkeypatch.setattr(Extractor, "pixels_per_step", 3 * 96 * 96)  # micro-batches of 3
    monkeypatch.setattr(Extractor, "channels_last", True)
    extractor = Extractor(model, 4, BitEncoder(100.0), data, 5)
    batches = [extractor.extract(t) for t in (1, 0)]
    extractor.close()
    assert [b.ids for b in batches] == [[5, 6], [0, 1, 2, 3, 4]]
    with torch.no_grad():
        plain = run_head(reference, torch.from_numpy(np.stack(data.images)), 4)[3] > 0
    got = np.unpackbits(np.frombuffer(batches[1].data + batches[0].data, np.uint8))
    mismatch = (got != plain.reshape(-1).numpy()).mean()
    assert mismatch < 1e-4  # BatchNorm folding rounds differently; a bit flips only at x ≈ 0
    from common.split import layers_of

    assert all(p.device.type == "meta" for p in layers_of(model)[10].parameters())  # the tail is released
