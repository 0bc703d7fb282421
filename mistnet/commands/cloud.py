"""``mistnet cloud``: run a job's cloud side from a job file, in one process or as torchrun's ranks."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import constants as C
from common.metrics import add_metrics_flag, serve
from mistnet.flags import add_broker_flags, broker_from_args, positive_int

if TYPE_CHECKING:
    from common.jobspec import JobSpec
    from common.protocol import JobSummary


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "cloud",
        help="run a job: publish it, collect the edges' features, train the tail, report",
        description="Publishes the job and the head weights, collects every edge's features into an on-disk "
        "spool, trains the tail, evaluates on held-out data and writes the checkpoint. With --nproc-per-node "
        "(or under torchrun) the tail trains on several processes with DistributedDataParallel.",
    )
    p.add_argument("--job", type=Path, required=True, help="job file (native YAML or Sedna manifest)")
    p.add_argument("--workdir", type=Path, help="state directory (spool, resume state); default ./runs/JOB")
    p.add_argument("--device", default="cpu", help="torch device for training (cpu, cuda)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON summary object on stdout")
    g = p.add_argument_group("training on several processes (torchrun's elastic launcher; docs/deploy.md)")
    g.add_argument(
        "--nproc-per-node",
        type=positive_int,
        metavar="N",
        help="training processes on this machine (one per GPU with --device cuda); rank 0 runs the job",
    )
    g.add_argument(
        "--nnodes",
        type=positive_int,
        default=1,
        metavar="M",
        help="machines taking part, each running this command with the same --rdzv-endpoint (default 1)",
    )
    g.add_argument(
        "--rdzv-endpoint",
        metavar="HOST:PORT",
        help="c10d rendezvous address, a free port on one of the machines (needed with --nnodes > 1)",
    )
    g.add_argument("--max-restarts", type=int, default=C.DEFAULT_MAX_RESTARTS, metavar="K",
                   help="restarts of every process after one fails; training resumes after the last completed "
                   f"epoch (default {C.DEFAULT_MAX_RESTARTS})")  # fmt: skip
    add_metrics_flag(p)
    add_broker_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cloud_agent import distributed
    from cloud_agent.agent import CloudAgent
    from cloud_agent.malloc import reuse_large_buffers
    from cloud_agent.worker import run_worker
    from common.jobspec import load_job
    from common.protocol import JobPhase

    reuse_large_buffers()
    spec = load_job(args.job)
    workdir = args.workdir or Path("runs") / spec.name
    if args.nproc_per_node and not distributed.under_torchrun():
        return launch(args, spec, workdir)
    ranks = None
    if distributed.under_torchrun():
        distributed.check_batch_size(spec.cloud.batch_size, int(os.environ["WORLD_SIZE"]))
        ranks = distributed.Ranks.join(args.device)
    try:
        if ranks is not None and ranks.rank > 0:
            return run_worker(spec, workdir, ranks)
        serve(args.metrics_port)
        device = ranks.device if ranks is not None else args.device
        summary = CloudAgent(spec, broker_from_args(args), workdir, device, ranks).run()
    finally:
        if ranks is not None:
            ranks.close()
    print_summary(summary, args.json)
    # Under torchrun a job that ended (failed or cancelled included) exits 0, so torchrun does not run
    # it again: only a crash is worth a restart. Its outcome is in the summary and the status topic.
    return 0 if summary.phase == JobPhase.DONE or ranks is not None else 1


def print_summary(summary: JobSummary, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(summary.model_dump_json() + "\n")
        return
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
    if summary.world_size > 1:
        print(f"  trained on {summary.world_size} processes")


def launch(args: argparse.Namespace, spec: JobSpec, workdir: Path) -> int:
    """``--nproc-per-node``: torchrun's own launcher (elastic agent, c10d rendezvous) runs this same
    command once per rank, and restarts them all when one fails. Exit status as without it: 0 once
    the job is done."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    from cloud_agent.distributed import check_batch_size
    from common.errors import MistnetError

    check_batch_size(spec.cloud.batch_size, args.nproc_per_node * args.nnodes)
    if args.max_restarts < 0:
        raise MistnetError(f"--max-restarts must be 0 or more, got {args.max_restarts}")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise MistnetError(f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT, the same on every machine")
    rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint, "--rdzv-id", spec.name]
    launcher = [f"--nnodes={args.nnodes}", f"--nproc-per-node={args.nproc_per_node}",
                f"--max-restarts={args.max_restarts}", *(rdzv if args.rdzv_endpoint else ["--standalone"])]  # fmt: skip
    try:
        torchrun(get_args_parser().parse_args([*launcher, "-m", "mistnet", *args.argv]))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        print(f"mistnet cloud: rank {rank} exited with status {failure.exitcode} after {args.max_restarts} "
              "restart(s); its log is above", file=sys.stderr)  # fmt: skip
        return 1
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return job_status(workdir)


def job_status(workdir: Path) -> int:
    """0 if the job in ``workdir`` is done (or rank 0 ran on another machine: this node's ranks only
    trained, so its work directory holds no job of its own), else 1."""
    from cloud_agent.spool import Spool
    from common.protocol import JobPhase

    if not (workdir / "spool.sqlite").exists():
        return 0
    spool = Spool(workdir / "spool.sqlite")
    try:
        phase = spool.get_meta("phase")
        return 0 if phase is None or phase == JobPhase.DONE.value else 1
    finally:
        spool.close()
