"""A view of nodes and jobs, built only from the retained status topics: a live table on a terminal,
one plain line per change elsewhere (CI, ``docker logs``, a pipe), where a table cannot redraw."""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from common.errors import ProtocolError
from common.protocol import EdgeProgress, JobPhase, JobStatus, NodeStatus, Topics, from_json
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
            edges = ", ".join(f"{k}:{edge_progress(e)}" for k, e in j.edges.items())
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


class StatusLines:
    """One plain line per change worth a log line: a node's state, a job's phase or epoch, a new message.
    Per-chunk progress is left out, so a long job writes a few lines per epoch, not thousands."""

    def __init__(self) -> None:
        self.states: dict[str, tuple[object, ...]] = {}
        self.messages: dict[str, str] = {}

    def line(self, status: NodeStatus | JobStatus) -> str | None:
        if isinstance(status, NodeStatus):
            key, text = f"node {status.node}", node_line(status)
            state: tuple[object, ...] = (status.state, status.job)
        else:
            key, text, state = f"job {status.job}", job_line(status), (status.phase, status.epoch)
        news = bool(status.message) and status.message != self.messages.get(key)
        if status.message:
            self.messages[key] = status.message
        if self.states.get(key) == state and not news:
            return None
        self.states[key] = state
        return text


def edge_progress(e: EdgeProgress) -> str:
    return f"{e.samples}/{e.total if e.total is not None else '?'}"


def node_line(n: NodeStatus) -> str:
    text = f"edge {n.node}: {n.state.value}"
    if n.job:
        text += f", job {n.job}: {n.acked}/{n.total if n.total is not None else '?'} samples acknowledged"
    return f"{text} - {n.message}" if n.message else text


def job_line(j: JobStatus) -> str:
    text = f"job {j.job}: {j.phase.value}"
    if j.phase == JobPhase.COLLECTING and j.edges:
        text += ", " + ", ".join(f"{k} {edge_progress(e)}" for k, e in j.edges.items())
    if j.epoch:
        text += f", epoch {j.epoch}/{j.epochs}"
    if j.loss is not None:
        text += f", loss {j.loss:.4f}"
    if j.metrics:
        text += ", " + ", ".join(f"{k} {v:.4f}" for k, v in j.metrics.items())
    return f"{text} - {j.message}" if j.message else text


def follow(
    link: MqttLink, board: StatusBoard, console: Console, running: Callable[[], bool], tail_s: float = 0
) -> None:
    """Shows the status messages while ``running()``, then those arriving within ``tail_s``: a live table
    when ``console`` is a terminal, else one plain line per change (:class:`StatusLines`)."""
    if console.is_terminal:
        with Live(board.render(), console=console, refresh_per_second=4) as live:
            while running():
                drain(link, board, 0.25)
                live.update(board.render())
            drain(link, board, tail_s)
            live.update(board.render())
        return
    lines = StatusLines()

    def show(timeout_s: float) -> None:
        for status in drain(link, board, timeout_s):
            text = lines.line(status)
            if text is not None:
                print(time.strftime("%H:%M:%S"), text, file=console.file, flush=True)

    while running():
        show(0.25)
    show(tail_s)
