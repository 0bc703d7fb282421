"""The cloud of ``bench.procs cloud``: the real cloud agent, instrumented to time each edge and count what
it received (imported only there: the transport processes start without the cloud's dependencies)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from cloud_agent.agent import CloudAgent
from common.protocol import NodeState, NodeStatus, Topics


def mqtt_packet_bytes(topic: str, payload_len: int) -> int:
    """Size of an MQTT v5 QoS 1 PUBLISH without properties: fixed header, topic, packet id,
    property length, payload."""
    remaining = 2 + len(topic.encode()) + 2 + 1 + payload_len
    varint = 1 if remaining < 128 else 2 if remaining < 16384 else 3 if remaining < 2097152 else 4
    return 1 + varint + remaining


class BenchCloud(CloudAgent):
    """The real cloud agent, instrumented: per-edge start/end times and received bytes.

    With ``hold``, ``ready`` hellos are answered only once every edge has said ready, so all
    edges start streaming at the same moment (as the baseline's processes do).
    """

    def __init__(self, *args: Any, hold: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hold = hold
        self.held: dict[str, NodeStatus] = {}
        self.t_start: dict[str, float] = {}
        self.t_end: dict[str, float] = {}
        self.messages: Counter[str] = Counter()
        self.payload_bytes: Counter[str] = Counter()
        self.packet_bytes: Counter[str] = Counter()
        collect = self.collector.on_features

        def on_features(node: str, payload: bytes) -> None:
            self.messages[node] += 1
            self.payload_bytes[node] += len(payload)
            self.packet_bytes[node] += mqtt_packet_bytes(Topics.features(node, self.spec.name), len(payload))
            collect(node, payload)

        self.collector.on_features = on_features  # type: ignore[method-assign]
        self.answer = self.collection.on_node_status
        self.collection.on_node_status = self.on_node_status  # type: ignore[method-assign]

    def pump(self, timeout_s: float) -> None:
        super().pump(timeout_s)  # commits the batch and publishes its acknowledgements
        for node in [e.node for e in self.spec.edges if e.node not in self.t_end]:
            if self.job.spool.counts(node).complete:
                self.t_end[node] = time.time()

    def on_node_status(self, status: NodeStatus) -> None:
        nodes = {e.node for e in self.spec.edges}
        ours = status.node in nodes and status.job == self.spec.name and status.state == NodeState.READY
        if ours and status.node not in self.t_start:
            self.held[status.node] = status
            self.status.edge_state[status.node] = status
            if self.hold and len(self.held) < len(nodes):
                return
            for held in list(self.held.values()):
                self.t_start.setdefault(held.node, time.time())
                self.answer(held)
            self.held.clear()
            return
        self.answer(status)

    def wait_online(self, timeout_s: float) -> None:
        """Until every edge has announced itself (its retained status), so the clock starts
        with the job, not with the edges' interpreter start-up."""
        deadline = time.monotonic() + timeout_s
        nodes = {e.node for e in self.spec.edges}
        while not nodes <= set(self.status.edge_state):
            if time.monotonic() > deadline:
                missing = sorted(nodes - set(self.status.edge_state))
                raise SystemExit(f"edges {missing} did not come online within {timeout_s:.0f} s")
            self.pump(0.2)
