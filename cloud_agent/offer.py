"""Before training: the job offered to its edges (thresholds adapted to the public images, head
weights, assignments), the edges' answers, and their features collected into the spool."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from cloud_agent.adaptation import adapt
from cloud_agent.collector import Collector
from cloud_agent.export import export_head
from cloud_agent.job import Job, Pump
from cloud_agent.status import Status
from common import constants as C
from common.errors import MistnetError
from common.heads import head_chunks
from common.jobspec import OnTimeout
from common.models.registry import input_channels
from common.protocol import (
    JobAssignment,
    JobPhase,
    JobState,
    ModelRef,
    NodeState,
    NodeStatus,
    OnnxHead,
    PrivacyParams,
    Topics,
    to_json,
    to_msgpack,
)
from common.split import head_state_dict
from common.transport import MqttLink
from common.weights import pack_state

log = logging.getLogger("mistnet.cloud")


class JobFailed(MistnetError):
    """The job cannot finish (e.g. too few edges delivered before the timeout)."""


class Offer:
    """The job as its edges see it: retained assignments, head weights (and the head as ONNX)."""

    def __init__(self, job: Job, link: MqttLink, status: Status, pump: Pump) -> None:
        self.job, self.link, self.status, self.pump = job, link, status, pump
        self.onnx: tuple[bytes, OnnxHead] | None = None  # the head for edges without torch, once offered

    def adapt(self) -> None:
        """Thresholds and cut decoder from the public images, computed once per job (a restarted
        cloud reloads them: edges may already be encoding with these thresholds)."""
        job, spec = self.job, self.job.spec
        if spec.cloud.public is None or job.load_adaptation():
            return
        self.status.set_phase(JobPhase.ADAPTING, f"adapting to {spec.bits}-bit features on {spec.cloud.public}")
        adaptation = adapt(
            job.model,
            job.cut,
            Path(spec.cloud.public),
            job.image_size,
            sorted({spec.epsilon_for(e.node) for e in spec.edges}),
            spec.bits,
            spec.calibrated,
            spec.cloud.adapt,
            job.device,
            spec.seed,
            self.adapt_progress,
        )
        adaptation.save(job.adaptation_path)
        job.use_adaptation(adaptation)

    def adapt_progress(self, message: str) -> None:
        log.info("job %s: %s", self.job.spec.name, message)
        self.pump(0)  # operator commands (cancel) are honoured while adapting
        self.status.publish(message=message, force=True)

    def assignment(self, node: str, head: bytes) -> JobAssignment:
        job, s = self.job, self.job.spec
        manifest, _ = head_chunks(s.name, head, C.DEFAULT_CHUNK_BYTES)
        return JobAssignment(
            job=s.name,
            node=node,
            model=ModelRef(
                arch=s.model.arch,
                num_classes=job.num_classes,
                cut_layer=job.cut,
                image_size=job.image_size,
                head_statistics=s.model.head_statistics,
            ),
            privacy=PrivacyParams(
                epsilon=s.epsilon_for(node), bits=s.bits, thresholds=job.adaptation.wire_thresholds()
            ),
            dataset=s.edge(node).dataset,
            batch_size=s.edge(node).batch_size,
            head=manifest,
            onnx=self.onnx[1] if self.onnx else None,
            seed=s.seed,
            store=job.store_ref,
        )

    def publish(self) -> None:
        """Head weights and assignments, retained so edges that connect later still get them."""
        spool, name = self.job.spool, self.job.spec.name
        if spool.get_meta("collect_started") is None:
            spool.set_meta("collect_started", str(time.time()))
        head = pack_state(head_state_dict(self.job.model, self.job.cut))
        _, chunks = head_chunks(name, head, C.DEFAULT_CHUNK_BYTES)
        self.onnx = self.export_onnx_head()
        _, graph_chunks = head_chunks(name, self.onnx[0], C.DEFAULT_CHUNK_BYTES) if self.onnx else (0, [])
        for edge in self.job.spec.edges:
            for chunk in chunks:
                self.link.publish(Topics.head_chunk(edge.node, name, chunk.seq), to_msgpack(chunk), retain=True)
            for chunk in graph_chunks:
                self.link.publish(Topics.onnx_chunk(edge.node, name, chunk.seq), to_msgpack(chunk), retain=True)
            self.link.publish(
                Topics.job_assignment(edge.node, name), to_json(self.assignment(edge.node, head)), retain=True
            )
        self.status.set_phase(JobPhase.COLLECTING, f"waiting for {len(self.job.spec.edges)} edge(s)")

    def export_onnx_head(self) -> tuple[bytes, OnnxHead] | None:
        """The head as ONNX for edges that run it without torch; None (and a warning) if it cannot be
        exported: edges with the torch runtime still run the job, onnx ones fail saying why."""
        job = self.job
        shape = [input_channels(job.spec.model.arch), job.image_size, job.image_size]
        try:
            blob, outputs = export_head(job.model, job.cut, shape)
        except MistnetError as exc:
            log.warning("job %s: %s; edges with the onnx runtime cannot run it", job.spec.name, exc)
            return None
        manifest, _ = head_chunks(job.spec.name, blob, C.DEFAULT_CHUNK_BYTES)
        return blob, OnnxHead(manifest=manifest, input_shape=shape, outputs=outputs)

    def cancel(self) -> None:
        """Retained cancelled assignments: a running edge stops, a restarting one does not begin."""
        name = self.job.spec.name
        head = pack_state(head_state_dict(self.job.model, self.job.cut))
        for edge in self.job.spec.edges:
            cancelled = self.assignment(edge.node, head).model_copy(update={"state": JobState.CANCELLED})
            self.link.publish(Topics.job_assignment(edge.node, name), to_json(cancelled), retain=True)
        self.link.publish(Topics.control(name), b"", retain=True)

    def withdraw(self) -> None:
        """Clear the retained assignment and head so edges do not pick the job up again."""
        for edge in self.job.spec.edges:
            self.link.publish(Topics.job_assignment(edge.node, self.job.spec.name), b"", retain=True)


class Collection:
    """Every edge's features into the spool, until all are complete, the timeout, or every edge still
    pending has refused or failed. ``refused``: edges whose policy refused this job, and why."""

    def __init__(self, job: Job, collector: Collector, status: Status, pump: Pump) -> None:
        self.job, self.collector, self.status, self.pump = job, collector, status, pump
        self.refused: dict[str, str] = {}

    def run(self) -> None:
        job = self.job
        deadline = float(job.spool.get_meta("collect_started") or time.time()) + job.spec.collect.timeout_s
        try:
            while True:
                self.pump(0.5)
                self.status.publish(message=self.collector.store_error)
                pending = [e.node for e in job.spec.edges if not job.spool.counts(e.node).complete]
                if not pending:
                    break
                failed = {n: why for n in pending if (why := self.failure(n))}
                if time.time() > deadline or len(failed) == len(pending):
                    self.collector.close()  # what was verified counts
                    self.give_up_on(pending, failed)
                    break
        finally:
            self.collector.close()
        log.info("job %s collected: %s", job.spec.name, self.collector.summary())
        self.status.set_phase(
            JobPhase.TRAINING, f"{job.training_samples()} samples from {len(job.delivered())} edge(s)"
        )

    def on_node_status(self, status: NodeStatus) -> None:
        name = self.job.spec.name
        if status.node not in {e.node for e in self.job.spec.edges}:
            return
        if status.job not in (None, name) and status.state != NodeState.OFFLINE:
            return
        self.status.edge_state[status.node] = status
        if status.job == name and status.state == NodeState.REFUSED:
            self.refused[status.node] = status.message or "by the edge's policy"
        elif status.job == name and status.state in (NodeState.READY, NodeState.EXTRACTING):
            self.refused.pop(status.node, None)
        self.collector.on_hello(status)

    def give_up_on(self, pending: list[str], failed: dict[str, str]) -> None:
        spec, missing = self.job.spec, self.status.missing
        for node in pending:
            missing[node] = failed.get(node) or self.missing_reason(node)
        self.job.spool.set_meta("missing", json.dumps(missing))
        complete = len(spec.edges) - len(pending)
        detail = "; ".join(f"{n}: {r}" for n, r in missing.items())
        if spec.collect.on_timeout == OnTimeout.FAIL or complete < spec.collect.min_edges:
            raise JobFailed(
                f"{complete} of {len(spec.edges)} edges delivered (need "
                f"{spec.collect.min_edges}, on_timeout={spec.collect.on_timeout.value}): {detail}"
            )
        log.warning("proceeding without %s", detail)

    def failure(self, node: str) -> str:
        """Why an edge will not deliver whatever the wait: its policy refused the job, or it failed."""
        if node in self.refused:
            return f"refused: {self.refused[node]}"
        seen = self.status.edge_state.get(node)
        return seen.message if seen is not None and seen.state == NodeState.ERROR else ""

    def missing_reason(self, node: str) -> str:
        """Why an edge did not deliver by the timeout, with the last thing it said about itself."""
        counts = self.job.spool.counts(node)
        timeout = f"{self.job.spec.collect.timeout_s:.0f} s"
        if counts.samples + counts.skipped == 0:
            reason = f"no data within {timeout}"
        else:
            reason = f"incomplete: {counts.samples + counts.skipped} of {counts.total} samples within {timeout}"
        seen = self.status.edge_state.get(node)
        if seen is None:
            return reason + "; never seen on the broker"
        ago = max(0.0, time.time() - seen.time) if seen.time else None
        when = f" {ago:.0f} s ago" if ago is not None else ""
        said = f" ({seen.message})" if seen.message else ""
        if seen.state == NodeState.OFFLINE:
            return reason + f"; went offline{when}{said}"
        return reason + f"; last status {seen.state.value}{when}{said}"
