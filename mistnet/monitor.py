"""A live view of nodes and jobs, built only from the retained status topics."""

from __future__ import annotations

import queue
import time
import uuid

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table

from common.errors import ProtocolError
from common.protocol import JobPhase, JobStatus, NodeStatus, Topics, from_json
from common.transport import BrokerOptions, Inbound, MqttLink

FINAL_PHASES = (JobPhase.DONE, JobPhase.FAILED, JobPhase.CANCELLED)


class StatusBoard:
    """Latest status of every node and job seen, and a rich rendering of them."""

    def __init__(self, job: str | None = None) -> None:
        self.job = job
        self.nodes: dict[str, NodeStatus] = {}
        self.jobs: dict[str, JobStatus] = {}

    def update(self, item: Inbound) -> NodeStatus | JobStatus | None:
        """Record one status message; returns it, or None when it is not one we show."""
        if not item.payload:
            return None
        try:
            kind, _ = Topics.parse(item.topic)
            if kind == "node_status":
                node = from_json(NodeStatus, item.payload)
                if self.job is None or node.job in (None, self.job):
                    self.nodes[node.node] = node
                    return node
            elif kind == "job_status":
                status = from_json(JobStatus, item.payload)
                if self.job is None or status.job == self.job:
                    self.jobs[status.job] = status
                    return status
        except ProtocolError:
            return None
        return None

    def finished(self) -> bool:
        return self.job is not None and self.job in self.jobs and self.jobs[self.job].phase in FINAL_PHASES

    def render(self) -> Group:
        nodes = Table(title="edges", expand=True)
        for col in ("node", "state", "job", "progress", "acked", "skipped", "bytes", "message"):
            nodes.add_column(col)
        for n in sorted(self.nodes.values(), key=lambda s: s.node):
            total = n.total or 0
            nodes.add_row(
                n.node,
                n.state.value,
                n.job or "",
                ProgressBar(total=max(total, 1), completed=n.acked, width=20),
                f"{n.acked}/{total}",
                str(n.skipped),
                f"{n.wire_bytes:,}",
                n.message,
            )
        jobs = Table(title="jobs", expand=True)
        for col in ("job", "phase", "epoch", "loss", "metrics", "edges", "message"):
            jobs.add_column(col)
        for j in sorted(self.jobs.values(), key=lambda s: s.job):
            edges = ", ".join(f"{k}:{e.samples}/{e.total if e.total is not None else '?'}" for k, e in j.edges.items())
            metrics = ", ".join(f"{k}={v:.4f}" for k, v in j.metrics.items())
            loss = f"{j.loss:.4f}" if j.loss is not None else ""
            jobs.add_row(j.job, j.phase.value, f"{j.epoch}/{j.epochs}", loss, metrics, edges, j.message)
        return Group(nodes, jobs)


def status_link(broker: BrokerOptions) -> MqttLink:
    return MqttLink(
        broker,
        client_id=f"mistnet-monitor-{uuid.uuid4().hex[:8]}",
        subscriptions=[Topics.all_node_status(), Topics.all_job_status()],
        persistent=False,
    )


def drain(link: MqttLink, board: StatusBoard, timeout_s: float) -> list[NodeStatus | JobStatus]:
    """Status messages that arrived within ``timeout_s``, already applied to ``board``."""
    seen: list[NodeStatus | JobStatus] = []
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            item = link.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return seen
        if isinstance(item, Inbound):
            status = board.update(item)
            if status is not None:
                seen.append(status)
