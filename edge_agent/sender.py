"""The edge's sending window: a chunk is done only when the cloud acknowledges it.

A broker PUBACK proves nothing (mosquitto acknowledges, then may drop), so chunks stay here until
the cloud's own acknowledgement arrives, and are resent when it does not come in time or when the
cloud rejects them. The window bounds both memory and paho's otherwise unbounded queue.

Retransmission backs off (10 s, 20 s, 40 s, then every 60 s for one chunk) so an edge whose cloud
is down for minutes does not flood the broker's queue for it, and it pauses while the edge has no
broker connection: paho already keeps every unacknowledged QoS 1 message and sends it again, with
DUP, when the connection is back. After a reconnect, or when a restarted cloud announces itself,
:meth:`SendWindow.expedite` brings every chunk still in flight up for resending within a few
seconds, in case the broker lost what it had queued.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from common import constants as C
from common.protocol import Chunk, FeatureObject, encode_chunk, to_msgpack

MAX_RETRANSMIT_AFTER_S = 60.0
# After a reconnect, chunks still unacknowledged this long after it are sent again.
RECONNECT_GRACE_S = 3.0


@dataclass
class _InFlight:
    payload: bytes
    sent_at: float
    attempts: int = 0


class SendWindow:
    def __init__(
        self,
        publish: Callable[[bytes], None],
        window: int,
        retransmit_after_s: float = C.RETRANSMIT_AFTER_S,
        rate_limit: float | None = None,
        connected: Callable[[], bool] | None = None,
    ) -> None:
        """``rate_limit`` caps the average bytes per second, for edges on metered or shared links;
        ``connected`` says whether the broker link is up (no timed resends while it is down)."""
        self._publish = publish
        self.window = window
        self.retransmit_after_s = retransmit_after_s
        self.rate_limit = rate_limit
        self.connected = connected or (lambda: True)
        self._started = time.monotonic()
        self._in_flight: dict[tuple[int, int], _InFlight] = {}
        self.wire_bytes = 0
        self.resent = 0
        self.resent_bytes = 0

    @property
    def room(self) -> int:
        if self.rate_limit and self.wire_bytes > self.rate_limit * (time.monotonic() - self._started):
            return 0
        return self.window - len(self._in_flight)

    @property
    def pending(self) -> int:
        return len(self._in_flight)

    def in_flight(self, transfer: int, seq: int) -> bool:
        return (transfer, seq) in self._in_flight

    def send(self, chunk: Chunk) -> None:
        self._send((chunk.transfer, chunk.seq), encode_chunk(chunk))

    def send_object(self, claim: FeatureObject) -> None:
        """An S3 claim check travels like a transfer's only chunk (acknowledged as seq 0)."""
        self._send((claim.transfer, 0), to_msgpack(claim))

    def _send(self, key: tuple[int, int], payload: bytes) -> None:
        self._in_flight[key] = _InFlight(payload, time.monotonic())
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
        entry.attempts += 1
        self.resent += 1
        self.resent_bytes += len(entry.payload)
        self._transmit(entry.payload)

    def _timeout(self, entry: _InFlight) -> float:
        return min(self.retransmit_after_s * 2 ** min(entry.attempts, 8), MAX_RETRANSMIT_AFTER_S)

    def resend_overdue(self) -> None:
        if not self.connected():
            return
        now = time.monotonic()
        for entry in self._in_flight.values():
            if now - entry.sent_at > self._timeout(entry):
                self._retransmit(entry)

    def expedite(self, grace_s: float = RECONNECT_GRACE_S) -> None:
        """Resend whatever is still unacknowledged ``grace_s`` from now (reconnect, cloud restart):
        long enough for acks of what the broker had queued to arrive, short of the full timer."""
        due = time.monotonic() - self.retransmit_after_s + grace_s
        for entry in self._in_flight.values():
            entry.attempts = 0
            entry.sent_at = due
