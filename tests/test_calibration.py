"""Calibrated thresholds keep a margin from activations many samples share (up to rounding), so two
runtimes that round differently (PyTorch, ONNX Runtime) still give those activations the same level."""

from __future__ import annotations

import pytest
import torch

from common.privacy import TIE_TOLERANCE, calibrate_thresholds, quantize


def public_activations() -> torch.Tensor:
    x = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    x[:, 0] = 0.75  # a dead channel: one value everywhere
    x[:, 1, :6] = -0.3  # half a channel on one value, as letterbox padding gives,
    x[:, 1, :6, :2] += 3e-7  # up to rounding: a few ulps apart at some positions
    return x


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_thresholds_give_the_quantiles_levels_but_just_above_them(bits):
    x = public_activations()
    q = torch.arange(1, 2**bits) / 2**bits
    quantiles = torch.quantile(x.transpose(0, 1).reshape(3, -1), q, dim=1).T
    t = calibrate_thresholds(x, bits)
    assert bool((t[:, 1:] >= t[:, :-1]).all())
    assert not bool(torch.isin(t, x).any())  # no threshold is a public value
    band = quantiles + TIE_TOLERANCE * quantiles.abs().clamp(min=1.0)
    moved = torch.zeros_like(x, dtype=torch.bool)  # values a little above a quantile: they join its level
    for c in range(3):
        for j in range(2**bits - 1):
            moved[:, c] |= (x[:, c] > quantiles[c, j]) & (x[:, c] <= band[c, j])
    assert torch.equal(quantize(x, t)[~moved], quantize(x, quantiles)[~moved])
    assert moved[:, 2].float().mean() < 0.01  # on values spread continuously, next to none


@pytest.mark.parametrize("bits", [1, 2])
def test_rounding_noise_cannot_move_tied_activations_across_a_threshold(bits):
    x = public_activations()
    t = calibrate_thresholds(x, bits)
    quantiles = torch.quantile(x.transpose(0, 1).reshape(3, -1), torch.arange(1, 2**bits) / 2**bits, dim=1).T
    tied = torch.zeros_like(x, dtype=torch.bool)
    tied[:, 0], tied[:, 1, :6] = True, True
    up, down = x * (1 + 1e-5) + 1e-6, x * (1 - 1e-5) - 1e-6  # what another runtime's rounding may do
    assert torch.equal(quantize(up, t)[tied], quantize(down, t)[tied])
    # on the raw quantiles, the tied values sit exactly on a threshold and the noise decides
    assert not torch.equal(quantize(up, quantiles)[tied], quantize(down, quantiles)[tied])
