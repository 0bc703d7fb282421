"""``mistnet job validate FILE``: check a job file (native or Sedna) and show what each role runs;
``mistnet job cancel FILE``: ask the job's cloud agent to cancel it.

With ``--policy POLICY``, also check the job against an edge's privacy policy (a YAML file with any of
max_epsilon, min_cut_layer, allow_arch, max_bits: the limits of ``mistnet edge``): every edge an edge
with that policy would refuse is listed with the reason, and the exit status is 1.

Prints the effective configuration per role — the cloud (epochs, batch size, learning rate, validation
data, output, cut layer, model) and every edge (node, dataset, batch size, ε) — as tables, or as JSON
with ``--json``; warnings go to stderr. Exit 0 when the file is valid; an invalid file raises
SpecError, which ``mistnet.cli`` prints as one line before exiting non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.jobspec import JobSpec


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "job",
        help="check job files",
        description="Work with job files: native MistNetJob YAML or KubeEdge Sedna manifests.",
    )
    actions = parser.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    validate = actions.add_parser(
        "validate",
        help="validate a job file and print its effective configuration",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    validate.add_argument("file", help="job file: a MistNetJob or Sedna manifests (multi-document YAML)")
    validate.add_argument("--json", action="store_true", help="print the configuration as JSON")
    validate.add_argument("--policy", type=Path, metavar="FILE", help="check the job against an edge policy file")
    validate.set_defaults(func=run)
    add_cancel(actions)


def run(args: argparse.Namespace) -> int:
    from common.jobspec import load_job_file

    loaded = load_job_file(args.file)
    for warning in loaded.warnings:
        print(f"mistnet job: warning: {warning}", file=sys.stderr)
    config = effective_configuration(loaded.spec)
    refused = policy_check(loaded.spec, args.policy) if args.policy else None
    if args.json:
        out = {"source": loaded.source, "form": loaded.form, "warnings": loaded.warnings, **config}
        if refused is not None:
            out["policy"] = {"file": str(args.policy), "refused": refused}
        print(json.dumps(out, indent=2))
    else:
        render(config, loaded.source, loaded.form)
        if refused is not None:
            render_policy(refused, args.policy)
    return 1 if refused else 0



def effective_configuration(spec: JobSpec) -> dict[str, Any]:
    """The configuration each role will run with, defaults filled in; secrets are never included."""
    from common.mechanism import keep_probability

    cut = spec.cut_layer
    s3 = spec.transmitter.s3
    transmitter: dict[str, Any]
    if s3 is None:
        transmitter = {"kind": "mqtt"}
    else:
        transmitter = {
            "kind": "s3",
            "bucket_path": s3.bucket_path,
            "endpoint_url": s3.endpoint_url,
            "region": s3.region,
            "credentials": "from the job" if s3.access_key or s3.secret_key else "default AWS chain",
            "cleanup": s3.cleanup,
        }
    edges = []
    for edge in spec.edges:
        eps = spec.epsilon_for(edge.node)
        entry: dict[str, Any] = {
            "node": edge.node,
            "dataset": edge.dataset,
            "batch_size": edge.batch_size,
            "epsilon": eps,
            "epsilon_from": "edge" if edge.epsilon is not None else "job",
            "keep_probability": round(keep_probability(eps, 2**spec.bits), 6),
            "layers": f"0..{cut - 1}",
        }
        if edge.epochs is not None:
            entry["epochs_recorded"] = edge.epochs
        edges.append(entry)
    cloud = spec.cloud
    return {
        "job": spec.name,
        "model": spec.model.model_dump(mode="json"),
        "cut_layer": cut,
        "privacy": {**spec.privacy.model_dump(mode="json"), "bits_sent": spec.bits},
        "transmitter": transmitter,
        "cloud": {
            "node": cloud.node,
            "model": spec.model.arch,
            "cut_layer": cut,
            "layers": f"{cut}..end",
            "epochs": cloud.epochs,
            "batch_size": cloud.batch_size,
            "learning_rate": cloud.learning_rate,
            "validation": cloud.validation,
            "output": cloud.output,
            "eval_interval": cloud.eval_interval,
        },
        "collect": spec.collect.model_dump(mode="json"),
        "edges": edges,
        "seed": spec.seed,
    }

def policy_check(spec: Any, path: Path) -> dict[str, list[str]]:
    from common.policy import job_violations, load_policy

    return job_violations(spec, load_policy(path))


def render_policy(refused: dict[str, list[str]], path: Path) -> None:
    if not refused:
        print(f"policy {path}: every edge accepts this job")
        return
    for node, reasons in refused.items():
        print(f"policy {path}: {node} refuses this job: {'; '.join(reasons)}")


def _show(value: Any) -> str:
    if value is None or value == "":
        return "-"
    return str(value)


def render(config: dict[str, Any], source: str, form: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    model = config["model"]
    transmitter = config["transmitter"]
    if transmitter["kind"] == "s3":
        via = f"s3 {transmitter['bucket_path']}"
        if transmitter["endpoint_url"]:
            via += f" at {transmitter['endpoint_url']}"
        via += f" (credentials: {transmitter['credentials']})"
    else:
        via = "mqtt"
    kind = "Sedna manifests" if form == "sedna" else "native job"
    console.print(f"[bold]{config['job']}[/bold]  valid {kind}: {source}")
    console.print(
        f"model {model['arch']} ({_show(model['num_classes'] or 'classes from weights')} classes,"
        f" image {model['image_size'] or 'default'}), pretrained {_show(model['pretrained'])};"
        f" cut_layer {config['cut_layer']}; features via {via}"
    )
    privacy = config["privacy"]
    chosen = " (privacy.bits auto)" if privacy["bits"] == "auto" else ""
    console.print(f"{privacy['bits_sent']} bit(s) per activation{chosen}, thresholds {privacy['thresholds']}")

    cloud = config["cloud"]
    table = Table(title="cloud", title_justify="left", show_header=False)
    table.add_column("setting", style="bold")
    table.add_column("value")
    rows = [
        ("node", cloud["node"]),
        ("model", cloud["model"]),
        ("cut_layer", f"{cloud['cut_layer']} (trains layers {cloud['layers']})"),
        ("epochs", cloud["epochs"]),
        ("batch_size", cloud["batch_size"]),
        ("learning_rate", cloud["learning_rate"]),
        ("validation", cloud["validation"]),
        ("output", cloud["output"]),
        ("collect", "min {min_edges} edge(s), timeout {timeout_s:g} s, then {on_timeout}".format(**config["collect"])),
    ]
    for key, value in rows:
        table.add_row(key, _show(value))
    console.print(table)

    edges = Table(title="edges", title_justify="left")
    for column in ("node", "dataset", "batch_size", "epsilon", "keep p", "layers"):
        edges.add_column(column)
    for edge in config["edges"]:
        eps = f"{edge['epsilon']:g}" + (" (edge)" if edge["epsilon_from"] == "edge" else "")
        edges.add_row(
            edge["node"],
            edge["dataset"],
            str(edge["batch_size"]),
            eps,
            f"{edge['keep_probability']:.4f}",
            edge["layers"],
        )
    console.print(edges)


def add_cancel(actions: Any) -> None:
    from mistnet.flags import add_broker_flags

    cancel = actions.add_parser(
        "cancel",
        help="cancel a running job",
        description="Asks the job's cloud agent to cancel it: the cloud marks every edge's assignment cancelled "
        "(running edges stop, restarting edges do not begin) and ends in phase 'cancelled'.",
    )
    cancel.add_argument("file", help="the job file (its name identifies the job)")
    cancel.add_argument("--reason", default="", help="shown in the job's status")
    cancel.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the cloud to confirm")
    add_broker_flags(cancel)
    cancel.set_defaults(func=run_cancel)


def run_cancel(args: argparse.Namespace) -> int:
    import queue
    import time
    import uuid

    from common.errors import TransportError
    from common.jobspec import load_job
    from common.protocol import Control, ControlAction, JobPhase, JobStatus, Topics, from_json, to_json
    from common.transport import Inbound, MqttLink
    from mistnet.flags import broker_from_args

    spec = load_job(args.file)
    link = MqttLink(
        broker_from_args(args),
        client_id=f"mistnet-ops-{uuid.uuid4().hex[:8]}",
        subscriptions=[Topics.job_status(spec.name)],
        persistent=False,
    )
    link.connect()
    try:
        message = Control(job=spec.name, action=ControlAction.CANCEL, reason=args.reason)
        link.publish(Topics.control(spec.name), to_json(message), retain=True)
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline:
            try:
                item = link.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if isinstance(item, Inbound) and item.payload:
                status = from_json(JobStatus, item.payload)
                if status.phase in (JobPhase.CANCELLED, JobPhase.DONE, JobPhase.FAILED):
                    print(f"job {spec.name}: {status.phase.value} {status.message}")
                    return 0 if status.phase == JobPhase.CANCELLED else 1
    finally:
        link.close()
    raise TransportError(
        f"no cloud agent confirmed the cancellation of {spec.name} within {args.wait:.0f} s; "
        "the request stays retained and is honoured when it starts"
    )
