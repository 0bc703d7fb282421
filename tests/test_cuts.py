"""Every cut of YOLOv5 works: the head ships every output the tail reads, bit-packed."""

import json
import math
from pathlib import Path

import pytest
import torch

from common.models.registry import build
from common.privacy import BitEncoder, decode_features, wire_bytes_per_sample
from common.split import CutError, run_head, run_tail, tail_inputs

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "yolov5n_layers.json"

# Bytes per 640 px image on the wire (features only), documented in docs/yolo-cuts.md.
BYTES_640 = {
    "yolov5n": {1: 204800, 2: 102400, 3: 102400, 4: 51200, 5: 51200, 6: 76800, 7: 76800, 8: 89600, 9: 89600,
                10: 89600},
    "yolov5s": {1: 409600, 2: 204800, 3: 204800, 4: 102400, 5: 102400, 6: 153600, 7: 153600, 8: 179200,
                9: 179200, 10: 179200},
}


@pytest.fixture(scope="module", params=["yolov5n", "yolov5s"])
def model(request):
    torch.manual_seed(0)
    return build(request.param, 80).eval()


@pytest.mark.parametrize("cut", range(1, 11))
def test_every_backbone_cut_reproduces_the_full_model(model, cut):
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        whole = model(x)[0]
        split = run_tail(model, run_head(model, x, cut), cut)[0]
    torch.testing.assert_close(whole, split)


@pytest.mark.parametrize("cut", range(1, 11))
def test_bits_of_every_cut_survive_the_wire(model, cut):
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        heads = run_head(model, x, cut)
        layout, packed = BitEncoder(100.0, seed=0).encode(heads)
        bits = decode_features(layout, packed[0])
        run_tail(model, {i: b.unsqueeze(0) for i, b in bits.items()}, cut)
    assert sorted(bits) == tail_inputs(model, cut)
    for i, y in heads.items():
        assert torch.equal(bits[i].bool(), y[0] > 0)


def test_bytes_per_image_for_each_cut_at_640(model):
    shapes = {}
    x = torch.zeros(1, 3, 640, 640)
    with torch.no_grad():
        for cut in range(1, 11):
            shapes[cut] = [list(y.shape[1:]) for y in run_head(model, x, cut).values()]
    got = {cut: wire_bytes_per_sample(s) for cut, s in shapes.items()}
    assert got == BYTES_640[model.arch]


def test_yolov5n_bytes_agree_with_upstream_layer_shapes():
    layers = json.loads(REFERENCE.read_text())["images"][0]["layers"]
    shape = {layer["i"]: layer["shape"][1:] for layer in layers}
    model = build("yolov5n", 80)
    for cut, expected in BYTES_640["yolov5n"].items():
        assert sum(math.ceil(math.prod(shape[i]) / 8) for i in tail_inputs(model, cut)) == expected


def test_cut_beyond_range_is_refused_before_any_data_moves():
    with pytest.raises(CutError, match="out of range"):
        tail_inputs(build("yolov5n", 80), 25)
