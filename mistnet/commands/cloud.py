"""``mistnet cloud``: run a job's cloud side from a job file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common.metrics import add_metrics_flag, serve
from mistnet.flags import add_broker_flags, broker_from_args


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "cloud",
        help="run a job: publish it, collect the edges' features, train the tail, report",
        description="Publishes the job and the head weights, collects every edge's features into an on-disk "
        "spool, trains the tail, evaluates on held-out data and writes the checkpoint.",
    )
    p.add_argument("--job", type=Path, required=True, help="job file (native YAML or Sedna manifest)")
    p.add_argument("--workdir", type=Path, help="state directory (spool, resume state); default ./runs/JOB")
    p.add_argument("--device", default="cpu", help="torch device for training (cpu, cuda)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON summary object on stdout")
    add_metrics_flag(p)
    add_broker_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cloud_agent.agent import CloudAgent
    from cloud_agent.malloc import reuse_large_buffers
    from common.jobfile import load_job
    from common.protocol import JobPhase

    reuse_large_buffers()
    serve(args.metrics_port)
    spec = load_job(args.job)
    workdir = args.workdir or Path("runs") / spec.name
    summary = CloudAgent(spec, broker_from_args(args), workdir, args.device).run()
    if args.json:
        sys.stdout.write(summary.model_dump_json() + "\n")
    else:
        print(f"job {summary.job}: {summary.phase.value} in {summary.duration_s:.1f} s")
        if summary.message:
            print(f"  {summary.message}")
        for node, edge in summary.edges.items():
            print(f"  {node}: {edge.samples} samples, {edge.wire_bytes} bytes {edge.missing_reason}")
            if edge.privacy is not None:
                p = edge.privacy
                print(
                    f"    privacy: ε {p.epsilon:g} per activation ({p.activation_epsilon:g}-LDP each, "
                    f"{p.bits} bit(s)), {p.activations} activations per sample: "
                    f"{p.sample_epsilon:g}-LDP per sample by composition"
                )
        print(f"  metrics: {summary.metrics}")
        print(f"  checkpoint: {summary.checkpoint}")
    return 0 if summary.phase == JobPhase.DONE else 1
