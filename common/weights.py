"""Head weights as bytes: safetensors, so the edge never unpickles anything the cloud sends."""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from common.errors import ProtocolError
from common.split import head_state_dict


def pack_state(state: dict[str, torch.Tensor]) -> bytes:
    return bytes(st_save({k: v.detach().contiguous().cpu() for k, v in state.items()}))


def unpack_state(blob: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(blob)
    except (SafetensorError, ValueError) as exc:
        raise ProtocolError(f"head weights are not valid safetensors: {exc}") from None


def load_head(model: nn.Module, state: dict[str, torch.Tensor], cut: int) -> None:
    """Load exactly the head's tensors; anything missing, extra or misshapen is refused."""
    expected = head_state_dict(model, cut)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ProtocolError(f"head weights do not fit cut {cut}: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ProtocolError(f"head tensor {k} has shape {list(v.shape)}, expected {list(expected[k].shape)}")
    model.load_state_dict(state, strict=False)
