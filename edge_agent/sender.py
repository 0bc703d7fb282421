"""The edge's sending window: a chunk is done only when the cloud acknowledges it.

A broker PUBACK proves nothing (mosquitto acknowledges, then may drop), so chunks stay here until
the cloud's own acknowledgement arrives, and are resent when it does not come in time or when the
cloud rejects them. The window bounds both memory and paho's otherwise unbounded queue.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from common import constants as C
from common.protocol import Chunk, encode_chunk


@dataclass
class _InFlight:
    payload: bytes
    sent_at: float


class SendWindow:
    def __init__(
        self,
        publish: Callable[[bytes], None],
        window: int,
        retransmit_after_s: float = C.RETRANSMIT_AFTER_S,
        rate_limit: float | None = None,
    ) -> None:
        """``rate_limit`` caps the average bytes per second, for edges on metered or shared links."""
        self._publish = publish
        self.window = window
        self.retransmit_after_s = retransmit_after_s
        self.rate_limit = rate_limit
        self._started = time.monotonic()
        self._in_flight: dict[tuple[int, int], _InFlight] = {}
        self.wire_bytes = 0
        self.resent = 0

    @property
    def room(self) -> int:
        if self.rate_limit and self.wire_bytes > self.rate_limit * (time.monotonic() - self._started):
            return 0
        return self.window - len(self._in_flight)

    @property
    def pending(self) -> int:
        return len(self._in_flight)

    def send(self, chunk: Chunk) -> None:
        payload = encode_chunk(chunk)
        self._in_flight[(chunk.transfer, chunk.seq)] = _InFlight(payload, time.monotonic())
        self._transmit(payload)

    def _transmit(self, payload: bytes) -> None:
        self._publish(payload)
        self.wire_bytes += len(payload)

    def acknowledge(self, transfer: int, seq: int) -> None:
        self._in_flight.pop((transfer, seq), None)

    def forget_transfer(self, transfer: int) -> None:
        for key in [k for k in self._in_flight if k[0] == transfer]:
            del self._in_flight[key]

    def resend(self, transfer: int, seq: int) -> None:
        entry = self._in_flight.get((transfer, seq))
        if entry is not None:
            self._retransmit(entry)

    def _retransmit(self, entry: _InFlight) -> None:
        entry.sent_at = time.monotonic()
        self.resent += 1
        self._transmit(entry.payload)

    def resend_overdue(self) -> None:
        now = time.monotonic()
        for entry in self._in_flight.values():
            if now - entry.sent_at > self.retransmit_after_s:
                self._retransmit(entry)

    def resend_all(self) -> None:
        """After a reconnect nothing in flight can be trusted to have arrived."""
        for entry in self._in_flight.values():
            self._retransmit(entry)
