"""The MistNet mechanism: binarization, randomized response statistics, exact bit packing."""

import math

import numpy as np
import pytest
import torch

from common.errors import ProtocolError
from common.privacy import (
    FINE_BELOW,
    BitEncoder,
    activation_epsilon,
    calibrate_thresholds,
    decode_features,
    decode_rows,
    feature_transform,
    flip_probability,
    keep_probability,
    make_generator,
    make_rng,
    pack_bits,
    pack_levels,
    quantize,
    randomized_response,
    randomized_response_levels,
    round_up,
    sample_epsilon,
    thresholds_to_metadata,
    unpack_bits,
    unpack_levels,
    wire_bytes_per_sample,
)


def test_keep_probability_matches_reference_definition():
    for eps in (0.5, 1, 2, 4, 100):
        expected = math.exp(eps / 2) / (math.exp(eps / 2) + 1)
        assert keep_probability(eps) == pytest.approx(expected, rel=1e-12)
    assert keep_probability(4) == pytest.approx(0.8808, abs=1e-4)
    assert 1 - keep_probability(100) < 1e-20


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0, 4.0])
def test_empirical_flip_rate_matches_one_minus_p(eps):
    bits = torch.rand(1_000_000, generator=make_generator(1)) > 0.5
    out = randomized_response(bits, eps, make_generator(2))
    flip_rate = float((out != bits).float().mean())
    q = 1 - keep_probability(eps)
    sigma = math.sqrt(q * (1 - q) / bits.numel())
    assert abs(flip_rate - q) < 5 * sigma


def test_flips_are_symmetric():
    ones = torch.ones(400_000, dtype=torch.bool)
    zeros = torch.zeros(400_000, dtype=torch.bool)
    q = 1 - keep_probability(2.0)
    assert float((~randomized_response(ones, 2.0, make_generator(3))).float().mean()) == pytest.approx(q, abs=0.003)
    assert float(randomized_response(zeros, 2.0, make_generator(4)).float().mean()) == pytest.approx(q, abs=0.003)


def test_flip_probability_never_vanishes_for_a_finite_epsilon():
    for eps in (0.5, 4.0, 22.0):
        assert flip_probability(eps) == pytest.approx(1 - keep_probability(eps), rel=1e-9)
    assert 0 < flip_probability(100.0) == pytest.approx(math.exp(-50), rel=1e-9)  # 1 - p is 0.0 in float64
    for eps in np.geomspace(0.01, 5000, 200):
        for grid in (24, 32, 53, 64):
            q = flip_probability(float(eps))
            rounded = math.ldexp(round_up(q, grid), -grid)
            assert q <= rounded > 0 and rounded - q <= 2.0**-grid
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="finite number > 0"):
            BitEncoder(bad)


@pytest.mark.parametrize("eps", [24.0, 26.0])
def test_tiny_flip_probabilities_are_applied_not_skipped(eps):
    """Below 2^-16 the packed path resolves 2^-64 and the float path float64: rare flips still happen
    at their rate (and nothing rounds them to 0: see test_flip_probability_never_vanishes...)."""
    q = flip_probability(eps)
    assert q < FINE_BELOW
    n_packed, n_float = 1 << 24, 1 << 22
    packed = BitEncoder(eps, seed=5).randomize_packed(np.zeros((1, n_packed // 8), np.uint8), n_packed)
    flips = {"packed": (int(np.unpackbits(packed).sum()), n_packed)}
    zeros = torch.zeros(n_float, dtype=torch.bool)
    flips["float"] = (int(randomized_response(zeros, eps, make_generator(6)).sum()), n_float)
    levels = randomized_response_levels(np.zeros(n_float, np.uint8), 4, eps + 2 * math.log(3), make_rng(7))
    flips["levels"] = (int((levels != 0).sum()), n_float)  # K = 4 at the same replacement probability
    for path, (count, n) in flips.items():
        assert abs(count - n * q) < 5 * math.sqrt(n * q) + 1, (path, count, n * q)


@pytest.mark.parametrize("levels", [2, 4, 16])
@pytest.mark.parametrize("eps", [0.5, 2.0, 8.0])
def test_accounting_follows_the_mechanism(levels, eps):
    """ln(p/q) from the keep probability the mechanism uses, and r times it per sample (Theorem 4.1)."""
    p = keep_probability(eps, levels)
    q = (1 - p) / (levels - 1)
    assert activation_epsilon(eps, levels) == pytest.approx(math.log(p / q), rel=1e-9)
    assert sample_epsilon(eps, 1176, levels) == pytest.approx(1176 * math.log(p / q), rel=1e-9)
    with pytest.raises(ValueError):
        activation_epsilon(math.inf, levels)


def test_epsilon_100_is_pure_binarization():
    x = torch.randn(4, 8, 9, 9)
    enc = BitEncoder(100.0, seed=0)
    assert torch.equal(enc.privatize(x), (x > 0).float())


def test_one_bit_is_strictly_positive():
    assert quantize(torch.tensor([[-1.0, 0.0, 1e-9]]), None).tolist() == [[0, 0, 1]]


@pytest.mark.parametrize("shape", [[1], [7], [8], [9], [3, 5, 5], [64, 80, 80]])
def test_pack_unpack_is_exact(shape):
    bits = torch.rand(shape, generator=make_generator(5)) > 0.3
    data = pack_bits(bits)
    assert len(data) == math.ceil(math.prod(shape) / 8)
    assert torch.equal(unpack_bits(data, shape).bool(), bits)


def test_unpack_rejects_wrong_length():
    with pytest.raises(ProtocolError):
        unpack_bits(b"\x00" * 3, [3, 5, 5])


def test_encode_decode_round_trip_over_several_head_outputs():
    outputs = {3: torch.randn(2, 6, 14, 14), 1: torch.randn(2, 3, 5, 7)}
    layout, packed = BitEncoder(100.0, seed=0).encode(outputs)
    assert [f.layer for f in layout] == [3, 1]
    assert len(packed[0]) == wire_bytes_per_sample([[6, 14, 14], [3, 5, 7]]) == 147 + 14
    for b in range(2):
        decoded = decode_features(layout, packed[b])
        for layer, y in outputs.items():
            assert torch.equal(decoded[layer].bool(), y[b] > 0)


def test_randomization_is_unpredictable_by_default():
    x = torch.randn(10_000)
    assert not torch.equal(BitEncoder(1.0).privatize(x), BitEncoder(1.0).privatize(x))


# k-bit levels, thresholds and K-ary randomized response ----------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("count", [1, 7, 8, 13, 64 * 5 * 5])
def test_levels_pack_and_unpack_exactly(bits, count):
    rng = np.random.default_rng(bits * 1000 + count)
    levels = rng.integers(0, 2**bits, size=(3, count), dtype=np.uint8)
    packed = pack_levels(levels, bits)
    assert packed.shape == (3, math.ceil(count * bits / 8))
    assert np.array_equal(unpack_levels(packed, count, bits), levels)


def test_one_bit_levels_pack_as_the_bit_path():
    bits = (torch.rand(4, 3, 5, 7, generator=make_generator(9)) > 0.5).reshape(4, -1).numpy()
    assert np.array_equal(pack_levels(bits.astype(np.uint8), 1), np.packbits(bits, axis=1))


def test_thresholds_give_equally_likely_levels_and_decode_exactly():
    x = torch.randn(16, 4, 12, 12) * torch.tensor([1.0, 3.0, 0.2, 5.0]).view(1, 4, 1, 1) + 2.0
    t = calibrate_thresholds(x, bits=2)
    assert t.shape == (4, 3) and bool((t[:, 1:] >= t[:, :-1]).all())
    levels = quantize(x, t)
    for c in range(4):
        freq = torch.bincount(levels[:, c].flatten().long(), minlength=4).float() / levels[:, c].numel()
        assert torch.allclose(freq, torch.full((4,), 0.25), atol=0.01), (c, freq)
    layout, packed = BitEncoder(100.0, seed=0, bits=2, thresholds={3: t}).encode_packed({3: x})
    assert packed.shape[1] == 4 * 12 * 12 * 2 // 8
    decoded = decode_rows(layout, packed, bits=2)[3]
    assert torch.equal(decoded, levels.float() / 3)


@pytest.mark.parametrize(("levels", "eps"), [(2, 2.0), (4, 4.0), (4, 1.0), (16, 8.0)])
def test_k_ary_randomized_response_statistics(levels, eps):
    n = 400_000
    truth = np.random.default_rng(1).integers(0, levels, n, dtype=np.uint8)
    out = randomized_response_levels(truth.copy(), levels, eps, make_rng(2))
    p = keep_probability(eps, levels)
    assert p == pytest.approx(math.exp(eps / 2) / (math.exp(eps / 2) + levels - 1))
    kept = float((out == truth).mean())
    assert abs(kept - p) < 5 * math.sqrt(p * (1 - p) / n)
    # A replaced level is uniform over the other K - 1: each offset 1..K-1 is equally likely.
    offsets = ((out.astype(int) - truth.astype(int)) % levels)[out != truth]
    freq = np.bincount(offsets, minlength=levels)[1:] / len(offsets)
    assert np.allclose(freq, 1 / (levels - 1), atol=5 * math.sqrt(1 / len(offsets)))


def test_encoder_refuses_thresholds_that_do_not_fit():
    with pytest.raises(ValueError, match="need thresholds"):
        BitEncoder(4.0, bits=2)
    with pytest.raises(ValueError, match=r"\[C, 3\]"):
        BitEncoder(4.0, bits=2, thresholds={3: torch.zeros(4, 1)})
    with pytest.raises(ValueError, match="4 thresholds"):
        BitEncoder(4.0, thresholds={3: torch.zeros(4, 1)}).encode_packed({3: torch.randn(1, 5, 2, 2)})


def test_feature_transform_replays_checkpoint_thresholds_and_bits():
    x = torch.randn(2, 4, 6, 6)
    t = calibrate_thresholds(x, bits=3)
    meta = {"bits": 3, "epsilon": 4.0, "thresholds": thresholds_to_metadata({3: t})}
    assert torch.equal(feature_transform(meta)({3: x})[3], quantize(x, t).float() / 7)
    noisy = feature_transform(meta, randomize=True)({3: x})[3]
    assert noisy.shape == x.shape and not torch.equal(noisy, quantize(x, t).float() / 7)
