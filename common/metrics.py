"""Prometheus metrics of the edge and cloud agents, served with ``--metrics-port PORT``.

The agents already describe their progress in the status messages they publish (``NodeStatus``,
``JobStatus``); :func:`observe_node` and :func:`observe_job` turn every such message into metrics,
so a scrape shows exactly what the MQTT status topics show, and the agents need one line each.

==========================================  ======  ================================================
name                                        agent   meaning
==========================================  ======  ================================================
``mistnet_samples_extracted_total{node}``   edge    samples run through the head and privatized
``mistnet_samples_skipped_total{node}``     edge    samples the edge could not read (never sent)
``mistnet_samples_sent_total{node}``        edge    samples in transfers the cloud confirmed stored
``mistnet_wire_bytes_total{node,direction}``  both  feature-chunk bytes: ``sent`` by the edge
                                                    (resends included), ``received`` and stored by
                                                    the cloud (each chunk once)
``mistnet_chunks_resent_total{node}``       edge    chunks sent again (no ack in time, rejected,
                                                    reconnect)
``mistnet_node_state{node,state}``          edge    1 for the node's current state, else 0
``mistnet_samples_received_total{node}``    cloud   samples of each edge committed to the spool
``mistnet_messages_rejected_total{reason}`` both    messages refused (bad schema, digest, topic...)
``mistnet_phase{phase}``                    cloud   1 for the job's current phase, else 0
``mistnet_epoch`` / ``mistnet_epochs``      cloud   last completed training epoch / epochs planned
``mistnet_loss``                            cloud   training loss of the last epoch (sum of parts)
``mistnet_metric{name}``                    cloud   held-out metrics (``accuracy``, ``map50``, ...,
                                                    and ``*_before``: before training)
==========================================  ======  ================================================

Counters count since the agent started. A restarted cloud reopens its spool, so its
``samples_received`` and ``wire_bytes{direction="received"}`` start at what the spool already
holds; a restarted edge counts as sent the samples the cloud already had when it resumes.

``python -m common.metrics check`` exits 0 when the local endpoint answers (container health
checks); the port comes from ``--port`` or ``MISTNET_METRICS_PORT``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from common.errors import MistnetError
from common.protocol import JobPhase, JobStatus, NodeState, NodeStatus

log = logging.getLogger("mistnet.metrics")

PORT_ENV = "MISTNET_METRICS_PORT"
ADDR_ENV = "MISTNET_METRICS_ADDR"
DEFAULT_ADDR = "0.0.0.0"  # containers publish the port; bind 127.0.0.1 with MISTNET_METRICS_ADDR


class MetricsError(MistnetError):
    """The metrics endpoint could not be started."""


class Metrics:
    """Every metric of one registry, and the bookkeeping that turns status messages into counts."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.samples_extracted = Counter(
            "mistnet_samples_extracted", "Samples run through the head and privatized", ["node"], registry=registry
        )
        self.samples_skipped = Counter(
            "mistnet_samples_skipped", "Samples the edge could not read", ["node"], registry=registry
        )
        self.samples_sent = Counter(
            "mistnet_samples_sent", "Samples in transfers the cloud confirmed stored", ["node"], registry=registry
        )
        self.samples_received = Counter(
            "mistnet_samples_received", "Samples of each edge committed to the cloud's spool", ["node"],
            registry=registry,
        )
        self.wire_bytes = Counter(
            "mistnet_wire_bytes",
            "Feature-chunk bytes: sent by the edge (resends included) or received and stored by the cloud",
            ["node", "direction"],
            registry=registry,
        )
        self.chunks_resent = Counter(
            "mistnet_chunks_resent", "Feature chunks the edge sent again", ["node"], registry=registry
        )
        self.rejected = Counter(
            "mistnet_messages_rejected", "Messages refused by this agent", ["reason"], registry=registry
        )
        self.node_state = Gauge(
            "mistnet_node_state", "1 for the edge's current state, else 0", ["node", "state"], registry=registry
        )
        self.phase = Gauge("mistnet_phase", "1 for the job's current phase, else 0", ["phase"], registry=registry)
        self.epoch = Gauge("mistnet_epoch", "Last completed training epoch", registry=registry)
        self.epochs = Gauge("mistnet_epochs", "Training epochs of the job", registry=registry)
        self.loss = Gauge("mistnet_loss", "Training loss of the last completed epoch", registry=registry)
        self.metric = Gauge("mistnet_metric", "Held-out metrics of the model", ["name"], registry=registry)
        self._seen: dict[tuple[str, ...], int] = {}
        self._lock = threading.Lock()

    def _advance(self, counter: Counter, key: tuple[str, ...], value: int, **labels: str) -> None:
        """Add what ``value`` (a running total the agent reports) grew by since the last call."""
        with self._lock:
            last = self._seen.get(key, 0)
            self._seen[key] = value
        child = counter.labels(**labels)  # exists (at 0) from the first report on
        if value > last:
            child.inc(value - last)

    def observe_node(self, status: NodeStatus, rejected: Mapping[str, int] | None = None) -> None:
        """An edge's ``NodeStatus``: running totals of the current job become counter increments."""
        node = status.node
        for state in NodeState:
            self.node_state.labels(node=node, state=state.value).set(1 if state == status.state else 0)
        if status.job is not None:
            run = ("edge", node, status.job)
            self._advance(self.samples_extracted, (*run, "extracted"), status.extracted, node=node)
            self._advance(self.samples_skipped, (*run, "skipped"), status.skipped, node=node)
            self._advance(self.samples_sent, (*run, "sent"), status.acked, node=node)
            self._advance(self.wire_bytes, (*run, "wire"), status.wire_bytes, node=node, direction="sent")
            self._advance(self.chunks_resent, (*run, "resent"), status.resent_chunks, node=node)
        self.observe_rejected(rejected or {})

    def observe_job(self, status: JobStatus, rejected: Mapping[str, int] | None = None) -> None:
        """The cloud's ``JobStatus``: phase, epoch, loss, held-out metrics and per-edge totals."""
        for phase in JobPhase:
            self.phase.labels(phase=phase.value).set(1 if phase == status.phase else 0)
        self.epoch.set(status.epoch)
        self.epochs.set(status.epochs)
        if status.loss is not None:
            self.loss.set(status.loss)
        for name, value in status.metrics.items():
            self.metric.labels(name=name).set(value)
        for node, edge in status.edges.items():
            run = ("cloud", status.job, node)
            self._advance(self.samples_received, (*run, "samples"), edge.samples, node=node)
            self._advance(self.wire_bytes, (*run, "wire"), edge.wire_bytes, node=node, direction="received")
        self.observe_rejected(rejected or {})

    def observe_rejected(self, rejected: Mapping[str, int]) -> None:
        """An agent's running count of refused messages per reason."""
        for reason, count in list(rejected.items()):
            self._advance(self.rejected, ("rejected", reason), int(count), reason=reason)


REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)
METRICS = Metrics(REGISTRY)


def observe_node(status: NodeStatus, rejected: Mapping[str, int] | None = None) -> None:
    METRICS.observe_node(status, rejected)


def observe_job(status: JobStatus, rejected: Mapping[str, int] | None = None) -> None:
    METRICS.observe_job(status, rejected)


# Serving --------------------------------------------------------------------------------------------


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: threading.Thread
    addr: str

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.addr in ("0.0.0.0", "::", "") else self.addr
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def start_metrics_server(
    port: int, addr: str | None = None, registry: CollectorRegistry = REGISTRY
) -> MetricsServer:
    """Serve ``/metrics`` from a daemon thread; port 0 picks a free one (see ``.port``)."""
    addr = addr or os.environ.get(ADDR_ENV) or DEFAULT_ADDR
    try:
        server, thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise MetricsError(f"cannot serve metrics on {addr}:{port}: {exc.strerror}") from None
    return MetricsServer(server, thread, addr)


def parse_port(text: str) -> int:
    """A TCP port for ``--metrics-port`` (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port < 65536:
        raise argparse.ArgumentTypeError(f"{port} is not between 0 and 65535")
    return port


def port_from_env() -> int | None:
    """``MISTNET_METRICS_PORT`` as a port, or None when unset or empty (metrics off)."""
    value = os.environ.get(PORT_ENV, "").strip()
    if not value:
        return None
    try:
        return parse_port(value)
    except argparse.ArgumentTypeError as exc:
        raise MetricsError(f"{PORT_ENV}: {exc}") from None


def add_metrics_flag(parser: argparse.ArgumentParser) -> None:
    """``--metrics-port PORT``, default ``MISTNET_METRICS_PORT`` (parsed, and refused, like the flag)."""
    parser.add_argument(
        "--metrics-port",
        type=parse_port,
        default=os.environ.get(PORT_ENV, "").strip() or None,
        metavar="PORT",
        help=f"serve Prometheus metrics at http://0.0.0.0:PORT/metrics (env {PORT_ENV}; default: off)",
    )


def serve(port: int | None) -> MetricsServer | None:
    """Start the endpoint when a port is given (``--metrics-port``); None when metrics are off."""
    if port is None:
        return None
    server = start_metrics_server(port)
    log.info("metrics at %s", server.url)
    return server


# Health check -----------------------------------------------------------------------------------------


def check(port: int | None, host: str = "127.0.0.1", timeout_s: float = 4.0) -> tuple[bool, str]:
    """(ok, message): whether the endpoint answers with metrics."""
    if port is None:
        return True, f"metrics are off ({PORT_ENV} unset): nothing to check"
    url = f"http://{host}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            body = response.read()
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {exc}"
    if b"mistnet_" not in body:
        return False, f"{url} answered without mistnet metrics"
    return True, f"{url} ok"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.metrics", description="Check an agent's metrics endpoint.")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("check", help="exit 0 when http://HOST:PORT/metrics answers (container health checks)")
    p.add_argument("--port", type=parse_port, help=f"default: {PORT_ENV}")
    p.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    try:
        port = args.port if args.port is not None else port_from_env()
    except MetricsError as exc:
        print(exc, file=sys.stderr)
        return 2
    ok, message = check(port, args.host)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
