"""The MistNet mechanism: binarization, randomized response statistics, exact bit packing."""

import math

import pytest
import torch

from common.errors import ProtocolError
from common.privacy import (
    BitEncoder,
    binarize,
    decode_features,
    keep_probability,
    make_generator,
    pack_bits,
    randomized_response,
    unpack_bits,
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


def test_epsilon_100_is_pure_binarization():
    x = torch.randn(4, 8, 9, 9)
    enc = BitEncoder(100.0, seed=0)
    assert torch.equal(enc.privatize(x), x > 0)


def test_binarize_is_strictly_positive():
    assert binarize(torch.tensor([-1.0, 0.0, 1e-9])).tolist() == [False, False, True]


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
