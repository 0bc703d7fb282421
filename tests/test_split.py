"""Cutting a routed model: the head's outputs feed the tail exactly as the full model would."""

import pytest
import torch

from common.models.lenet import LeNet5
from common.models.registry import build
from common.split import CutError, head_activations, head_state_dict, run_head, run_tail, tail_inputs


@pytest.mark.parametrize("cut", range(1, 8))
def test_head_then_tail_equals_full_model(cut):
    torch.manual_seed(0)
    model = LeNet5().eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        full = model(x)
        split = run_tail(model, run_head(model, x, cut), cut)
    assert torch.allclose(full, split, atol=1e-6)
    assert tail_inputs(model, cut) == [cut - 1]


@pytest.mark.parametrize("cut", [0, 8, -1, 100])
def test_out_of_range_cut_is_refused(cut):
    with pytest.raises(CutError, match="out of range"):
        tail_inputs(LeNet5(), cut)


def test_head_state_dict_holds_only_head_layers():
    state = head_state_dict(LeNet5(), 2)
    assert state and all(k.startswith("model.0.") for k in state)


def test_head_activations_counts_what_the_tail_reads_without_touching_the_model():
    lenet = build("lenet5", 10).train()
    before = {k: v.clone() for k, v in lenet.state_dict().items()}
    assert head_activations(lenet, 2, (1, 28, 28)) == 6 * 14 * 14
    assert lenet.training and all(torch.equal(before[k], v) for k, v in lenet.state_dict().items())
    with torch.device("meta"):
        skeleton = build("yolov5n", 80)
    assert head_activations(skeleton, 4, (3, 192, 192)) == 64 * 24 * 24  # layer 3's output only
    assert head_activations(skeleton, 10, (3, 192, 192)) == sum(  # cut 10: the tail reads layers 4, 6 and 9
        c * (192 // s) ** 2 for c, s in ((64, 8), (128, 16), (256, 32))
    )
