"""What the cloud says about its job: the phase, the retained job status (edges' progress, privacy
cost, training loss and metrics) and the summary the job ends with."""

from __future__ import annotations

import json
import logging
import math
import time

from cloud_agent.collector import Collector
from cloud_agent.job import Job
from cloud_agent.trainer import EpochResult
from common import constants as C
from common import metrics
from common.privacy import activation_epsilon, sample_epsilon
from common.protocol import (
    EdgeProgress,
    EdgeSummary,
    JobPhase,
    JobStatus,
    JobSummary,
    NodeStatus,
    PrivacyAccount,
    Topics,
    finite,
    to_json,
)
from common.transport import MqttLink

log = logging.getLogger("mistnet.cloud")


class Status:
    """``edge_state``: the last status each edge of the job published; ``missing``: why the edges that
    did not deliver by the timeout are missing (kept in the spool); ``last_result``: the last epoch's."""

    def __init__(self, job: Job, link: MqttLink, collector: Collector) -> None:
        self.job = job
        self.link = link
        self.collector = collector
        self.edge_state: dict[str, NodeStatus] = {}
        self.activations = job.released_activations()
        self.missing: dict[str, str] = json.loads(job.spool.get_meta("missing") or "{}")
        self.last_result: EpochResult | None = None
        self._last_status = 0.0

    def set_phase(self, phase: JobPhase, message: str = "") -> None:
        self.job.spool.set_meta("phase", phase.value)
        log.info("job %s: %s %s", self.job.spec.name, phase.value, message)
        self.publish(message=message, force=True)

    def publish(self, message: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_status < C.STATUS_INTERVAL_S:
            return
        self._last_status = now
        job, r = self.job, self.last_result
        status = JobStatus(
            job=job.spec.name,
            phase=job.phase,
            edges=self.edges_progress(),
            epoch=r.epoch if r else 0,
            epochs=job.spec.cloud.epochs,
            loss=_finite_or_none(sum(r.losses.values())) if r and r.losses else None,
            losses=finite(r.losses) if r else {},
            metrics=finite(job.metrics()),
            checkpoint=job.spool.get_meta("checkpoint"),
            message=message,
            time=time.time(),
        )
        metrics.observe_job(status, self.collector.rejected)
        self.link.publish(Topics.job_status(job.spec.name), to_json(status), retain=True)

    def edges_progress(self) -> dict[str, EdgeProgress]:
        out = {}
        for edge in self.job.spec.edges:
            counts = self.job.spool.counts(edge.node)
            seen = self.edge_state.get(edge.node)
            out[edge.node] = EdgeProgress(
                state="complete" if counts.complete else (seen.state.value if seen else "waiting"),
                samples=counts.samples,
                skipped=counts.skipped,
                total=counts.total,
                wire_bytes=counts.wire_bytes,
                missing_reason=self.missing.get(edge.node, ""),
                message=seen.message[:500] if seen else "",
                privacy=self.privacy_account(edge.node),
            )
        return out

    def privacy_account(self, node: str) -> PrivacyAccount:
        """What one edge's features cost in privacy: ε and bits per activation, activations per
        sample, and the per-sample bound by composition (docs/security.md)."""
        eps, bits = self.job.spec.epsilon_for(node), self.job.spec.bits
        return PrivacyAccount(
            epsilon=eps,
            bits=bits,
            activations=self.activations,
            activation_epsilon=activation_epsilon(eps, 2**bits),
            sample_epsilon=sample_epsilon(eps, self.activations, 2**bits),
        )

    def privacy_accounts(self) -> dict[str, PrivacyAccount]:
        return {edge.node: self.privacy_account(edge.node) for edge in self.job.spec.edges}

    def summary(self, duration_s: float) -> JobSummary:
        job, edges = self.job, {}
        for edge in job.spec.edges:
            counts = job.spool.counts(edge.node)
            edges[edge.node] = EdgeSummary(
                samples=counts.samples,
                skipped=counts.skipped,
                wire_bytes=counts.wire_bytes,
                missing_reason=self.missing.get(edge.node, ""),
                privacy=self.privacy_account(edge.node),
            )
        return JobSummary(
            job=job.spec.name,
            phase=job.phase,
            edges=edges,
            metrics=finite(job.metrics()),
            checkpoint=job.spool.get_meta("checkpoint"),
            duration_s=round(duration_s, 3),
            message=job.spool.get_meta("message") or "",
            selected_epoch=job.selected_epoch,
            world_size=job.ranks.world_size if job.ranks is not None else 1,
        )


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
