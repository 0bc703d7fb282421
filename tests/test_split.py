"""Cutting a routed model: the head's outputs feed the tail exactly as the full model would."""

import pytest
import torch

from common.models.lenet import LeNet5
from common.split import CutError, head_state_dict, run_head, run_tail, tail_inputs


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
