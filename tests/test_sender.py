"""The edge's send window: bounded, acknowledged, retransmitted with backoff, paused while offline."""

from __future__ import annotations

import pytest

from common.protocol import split_transfer
from edge_agent import sender
from edge_agent.sender import SendWindow


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(sender.time, "monotonic", c)
    return c


def chunks(transfer=0, n=3):
    return list(split_transfer("job", "edge1", transfer, bytes(range(256)) * 12 * n, 1024))[:n]


def test_window_bounds_acknowledges_and_forgets(clock):
    sent: list[bytes] = []
    w = SendWindow(sent.append, window=2)
    a, b, c = chunks()
    w.send(a)
    w.send(b)
    assert w.room == 0 and w.pending == 2
    w.acknowledge(0, 0)
    assert w.room == 1
    w.send(c)
    w.forget_transfer(0)
    assert w.pending == 0 and len(sent) == 3 and w.resent == 0


def test_retransmission_backs_off_and_pauses_while_disconnected(clock):
    sent: list[bytes] = []
    online = [True]
    w = SendWindow(sent.append, window=4, retransmit_after_s=10, connected=lambda: online[0])
    (chunk,) = chunks(n=1)
    w.send(chunk)
    resent_at = []
    for _ in range(1500):  # 150 s in steps of 0.1 s
        clock.now += 0.1
        before = len(sent)
        w.resend_overdue()
        if len(sent) > before:
            resent_at.append(round(clock.now - 100.0))
    assert resent_at == [10, 30, 70, 130]  # after 10, 20, 40, then 60 s
    online[0] = False
    clock.now += 600
    w.resend_overdue()
    assert len(sent) == 5, "no timed resend without a broker connection (paho resends on reconnect)"
    online[0] = True
    w.expedite(grace_s=3)
    clock.now += 2
    w.resend_overdue()
    assert len(sent) == 5
    clock.now += 1.5
    w.resend_overdue()
    assert len(sent) == 6 and w.resent == 5 and w.resent_bytes == 5 * len(sent[0])


def test_rejected_chunk_goes_again_at_once(clock):
    sent: list[bytes] = []
    w = SendWindow(sent.append, window=4)
    (chunk,) = chunks(n=1)
    w.send(chunk)
    w.resend(0, 0)
    w.resend(5, 5)  # not in flight: nothing
    assert len(sent) == 2 and sent[0] == sent[1]
