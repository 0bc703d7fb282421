"""The MistNet privacy mechanism, in one place: activations → levels → randomized response → bytes.

Each activation becomes one of ``K = 2^bits`` levels: the number of its channel's thresholds it
exceeds (1 bit without thresholds: ``x > 0``, the reference system's binarization; thresholds are
calibrated by the cloud on public data, see :func:`calibrate_thresholds`). Each level is then
reported truthfully with probability ``p = e^(ε/2) / (e^(ε/2) + K - 1)`` and otherwise replaced by
one of the other ``K - 1`` levels, uniformly (K-ary randomized response, which is ε/2-LDP per
activation; for K = 2 it is the symmetric bit flip). ``ε`` is the budget per activation as the
reference implementation defines it (the MistNet paper's ε is half of it), whatever ``bits`` is:
more bits per activation buy resolution, not privacy, and at the same ε each level is kept less
often. Levels are packed ``bits`` per activation, MSB first, so a sample costs
``ceil(C·H·W·bits / 8)`` bytes on the wire.

The 1-bit hot path (:meth:`BitEncoder.encode_packed`) never materialises a float or bool mask of
random numbers: it packs the activation bits first and then flips them in the packed domain with
a mask whose bits are independent Bernoulli(1 - p) draws built from 64-bit random words
(:func:`flip_mask`). That is the same mechanism as :func:`randomized_response`, 7-9x
cheaper.

Randomized response never applies less noise than asked, for any finite ε: every path rounds the
flip (or replacement) probability *up* to the resolution of its random numbers, and never to 0.
The packed path resolves 2^-32, or 2^-64 for probabilities below 2^-16 (ε above ~22 at one bit),
so rounding adds at most 2^-16 of relative noise down to 2^-48 and a flip probability is never
below 2^-64: at ε = 100 (asked: 2·10^-22) a bit flips with probability 2^-64 ≈ 5·10^-20, which in
practice leaves the bits equal to the clean ones. The float paths (:func:`randomized_response`,
:func:`randomized_response_levels`) draw float32 uniforms (multiples of 2^-24), or float64 ones
(2^-53) below 2^-16. Rounding up only lowers ``ln(p/q)``, so the accounting of
:func:`activation_epsilon` stays a valid bound.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from common.errors import ProtocolError
from common.mechanism import FINE_BELOW as FINE_BELOW
from common.mechanism import FLIP_PRECISION_BITS as FLIP_PRECISION_BITS
from common.mechanism import (
    LevelEncoder,
    flip_probability,
    quantize_array,
    randomized_response_levels,
    uniform_cutoff,
    unpack_levels,
)
from common.mechanism import activation_epsilon as activation_epsilon
from common.mechanism import flip_mask as flip_mask
from common.mechanism import flip_precision as flip_precision
from common.mechanism import flip_threshold as flip_threshold
from common.mechanism import keep_probability as keep_probability
from common.mechanism import make_rng as make_rng
from common.mechanism import pack_levels as pack_levels
from common.mechanism import round_up as round_up
from common.mechanism import sample_epsilon as sample_epsilon
from common.protocol import FeatureLayout, packed_size

# Public values this close to a quantile (relative to its magnitude, at least 1) count as equal to it:
# the same input patch gives values a few float32 ulps apart at different positions of one run, and
# PyTorch and ONNX Runtime (fused BatchNorm or not) differ by about as much. Far above rounding (1e-6).
TIE_TOLERANCE = 2.0**-12
# Where no public value lies above a threshold: how far above the highest one (relative, at least absolute).
TIE_MARGIN = 2.0**-8

Thresholds = Mapping[int, torch.Tensor]  # head output layer -> [C, 2^bits - 1] ascending per channel


def quantize(x: torch.Tensor, thresholds: torch.Tensor | None) -> torch.Tensor:
    """Levels (uint8) of a batch ``[B, C, ...]`` on ``x``'s device, computed on the host by
    :func:`common.mechanism.quantize_array` (the one implementation both edge runtimes share)."""
    t = None if thresholds is None else thresholds.detach().cpu().numpy()
    return torch.from_numpy(quantize_array(x.detach().cpu().numpy(), t)).to(x.device)


def calibrate_thresholds(x: torch.Tensor, bits: int, max_samples: int = 1 << 20) -> torch.Tensor:
    """Per-channel thresholds ``[C, 2^bits - 1]`` at the quantiles ``j / 2^bits`` of public
    activations ``[N, C, ...]``: every level is equally likely on data like the public set, so
    each transmitted bit carries as much information as it can (``x > 0`` sends 56% ones at
    YOLOv5n's cut 4, and far more skewed levels at other layers). Each is then moved off the
    values around it (:func:`off_ties`)."""
    levels = 2**bits
    per_channel = x.transpose(0, 1).reshape(x.shape[1], -1).float()
    sample = per_channel[:, :: max(1, per_channel.shape[1] // max_samples)]
    q = torch.arange(1, levels, dtype=torch.float32) / levels
    return off_ties(sample, torch.quantile(sample, q, dim=1).T.contiguous())


def off_ties(sample: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Quantiles ``at`` (``[C, K-1]``) moved up past every sampled value of the channel (``[C, n]``)
    within ``TIE_TOLERANCE`` of them, to the middle of the gap that follows: between the largest
    value up to there and the smallest above (or, with none above, ``TIE_MARGIN`` of its magnitude
    higher).

    A quantile often lands on a value many activations share (the letterbox padding, a dead
    channel, ReLU's zeros) — shared up to float rounding, which differs between PyTorch and ONNX
    Runtime, between CPU kernels and between positions of one image. On or near a threshold, those
    activations' levels would be decided by that rounding; moved past them, they all get the lower
    level, whatever computed them. For values spread continuously the move is negligible."""
    ordered = sample.sort(dim=1).values
    near = at + TIE_TOLERANCE * at.abs().clamp(min=1.0)
    at_or_below = torch.searchsorted(ordered, near.contiguous(), right=True)  # values <= each, within tolerance
    below = ordered.gather(1, (at_or_below - 1).clamp(min=0))
    above = ordered.gather(1, at_or_below.clamp(max=ordered.shape[1] - 1))
    above = torch.where(at_or_below >= ordered.shape[1], below + TIE_MARGIN * below.abs().clamp(min=1.0), above)
    return ((below + above) / 2).contiguous()


def randomized_response(bits: torch.Tensor, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """Flip each bit independently with probability 1 - p (rounded up to the uniforms' grid)."""
    fine, cutoff = uniform_cutoff(flip_probability(epsilon))
    dtype = torch.float64 if fine else torch.float32
    flips = torch.rand(bits.shape, generator=generator, device=bits.device, dtype=dtype) < cutoff
    return bits ^ flips


def pack_bits(bits: torch.Tensor) -> bytes:
    return np.packbits(bits.detach().to("cpu", torch.uint8).numpy().ravel()).tobytes()


def unpack_bits(data: bytes, shape: list[int]) -> torch.Tensor:
    """The exact inverse of :func:`pack_bits`, as float 0/1 in ``shape``."""
    count = math.prod(shape)
    if len(data) != -(-count // 8):
        raise ProtocolError(f"{len(data)} bytes cannot hold {count} bits of shape {shape}")
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count)
    return torch.from_numpy(flat.reshape(shape)).float()


def make_generator(seed: int | None = None) -> torch.Generator:
    """Unseeded by default: the randomization must not be predictable by the receiver."""
    g = torch.Generator()
    g.manual_seed(secrets.randbits(63) if seed is None else seed)
    return g


class BitEncoder(LevelEncoder):
    """The encoder of :class:`common.mechanism.LevelEncoder` for torch tensors (thresholds too)."""

    def __init__(
        self, epsilon: float, seed: int | None = None, bits: int = 1, thresholds: Thresholds | None = None
    ) -> None:
        for layer, t in (thresholds or {}).items():
            if t.dim() != 2 or t.shape[1] != 2**bits - 1:
                raise ValueError(f"layer {layer}: {bits} bits need [C, {2**bits - 1}] thresholds, got {list(t.shape)}")
        arrays = {layer: t.detach().cpu().numpy() for layer, t in (thresholds or {}).items()}
        super().__init__(epsilon, seed, bits, arrays)
        self.thresholds = dict(thresholds or {})
        self.generator = make_generator(seed)

    def levels(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        """Unrandomized levels of one head output (checks the thresholds fit its channels)."""
        return torch.from_numpy(self.array_levels(layer, y.detach().cpu().numpy())).to(y.device)

    def quantized(self, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """Levels of a batch without randomization, as float ``level / (K - 1)``: the deployed path."""
        return self.levels(layer, x).float() / (2**self.bits - 1)

    def privatize(self, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """Randomized levels of a batch, as float ``level / (K - 1)``: what the cloud's tail reads."""
        levels = self.array_levels(layer, x.detach().cpu().numpy()).reshape(len(x), -1)
        noisy = randomized_response_levels(levels, 2**self.bits, self.epsilon, self.rng)
        return torch.from_numpy(noisy).view(x.shape).float() / (2**self.bits - 1)

    def encode_packed(self, outputs: Mapping[int, torch.Tensor]) -> tuple[list[FeatureLayout], np.ndarray]:
        """:meth:`~common.mechanism.LevelEncoder.encode_arrays` of torch head outputs."""
        return self.encode_arrays({i: y.detach().cpu().numpy() for i, y in outputs.items()})

    def encode(self, outputs: dict[int, torch.Tensor]) -> tuple[list[FeatureLayout], list[bytes]]:
        """The batch's layout and, per sample, its head outputs packed back to back."""
        layout, data = self.encode_packed(outputs)
        return layout, [row.tobytes() for row in data]


def decode_features(layout: list[FeatureLayout], data: bytes, bits: int = 1) -> dict[int, torch.Tensor]:
    """Cloud side: one sample's packed bytes back to float ``level / (K - 1)`` tensors keyed by layer."""
    return {i: y[0] for i, y in decode_rows(layout, np.frombuffer(data, np.uint8)[None], bits).items()}


def decode_rows(layout: list[FeatureLayout], rows: np.ndarray, bits: int = 1) -> dict[int, torch.Tensor]:
    """A batch's packed features (uint8 ``[B, sample_bytes]``, one sample per row) to float
    ``[B, *shape]`` per layer holding ``level / (2^bits - 1)`` (0/1 for bits), vectorised."""
    if not 1 <= bits <= 8:
        raise ProtocolError(f"{bits} bits per activation: must be 1..8")
    sizes = packed_size(layout, bits)
    if rows.ndim != 2 or rows.shape[1] != sum(sizes):
        raise ProtocolError(f"sample has {rows.shape[-1]} bytes of features, layout needs {sum(sizes)}")
    out = {}
    offset = 0
    for f, size in zip(layout, sizes, strict=True):
        count = math.prod(f.shape)
        part = rows[:, offset : offset + size]
        if bits == 1:
            values = torch.from_numpy(np.unpackbits(part, axis=1, count=count)).float()
        else:
            values = torch.from_numpy(unpack_levels(part, count, bits)).float() / (2**bits - 1)
        out[f.layer] = values.view(len(rows), *f.shape)
        offset += size
    return out


def thresholds_from_metadata(metadata: Mapping[str, Any]) -> dict[int, torch.Tensor]:
    """A checkpoint's (or job's) thresholds, ``{"layer": [[t, ...] per channel]}``, as tensors."""
    raw = metadata.get("thresholds") or {}
    return {int(layer): torch.tensor(rows, dtype=torch.float32) for layer, rows in raw.items()}


def thresholds_to_metadata(thresholds: Thresholds) -> dict[str, list[list[float]]]:
    return {str(layer): t.tolist() for layer, t in thresholds.items()}


def feature_transform(
    metadata: Mapping[str, Any], randomize: bool = False
) -> Callable[[dict[int, torch.Tensor]], dict[int, torch.Tensor]]:
    """The deployed path for a MistNet checkpoint: head outputs become the levels its tail was
    trained on (its ``bits`` and ``thresholds``), as the cloud decodes them.

    Randomized response is off by default at inference: it protects data leaving an edge, and a
    model evaluated where the image already is gains no privacy from it.
    """
    bits = int(metadata.get("bits", 1))
    encoder = BitEncoder(
        float(metadata.get("epsilon", 100.0)), bits=bits, thresholds=thresholds_from_metadata(metadata)
    )

    def transform(outputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        if randomize:
            return {i: encoder.privatize(y, i).to(y.device) for i, y in outputs.items()}
        return {i: encoder.quantized(y, i) for i, y in outputs.items()}

    return transform


def wire_bytes_per_sample(shapes: list[list[int]], bits: int = 1) -> int:
    """ceil(activations · bits / 8) per head output, summed: the payload floor of one sample."""
    return sum(-(-math.prod(s) * bits // 8) for s in shapes)
