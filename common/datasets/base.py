"""What an edge reads from its local data: indexed samples with a wire-ready label."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class EdgeSample:
    """One input ready for the head, or the reason it could not be read (``image`` is None)."""

    id: int
    key: str
    image: np.ndarray | None  # float32 CHW, as the head reads it
    label: bytes
    error: str = ""


class EdgeDataset(Protocol):
    """Deterministic order: sample ``id`` is its index, so resume points survive restarts."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> EdgeSample: ...
