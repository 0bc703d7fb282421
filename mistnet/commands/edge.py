"""``mistnet edge``: run an edge agent for one node."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common.metrics import add_metrics_flag, serve
from mistnet.flags import add_broker_flags, broker_from_args


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "edge",
        help="run an edge agent: extract, privatize and stream features for jobs addressed to a node",
        description="Connects to the broker, announces the node, waits for jobs addressed to it and streams "
        "bit-packed, randomized features of its local data to the cloud.",
    )
    p.add_argument("--node", required=True, help="this node's name, as in the job's nodeName")
    p.add_argument("--data", type=Path, help="local dataset (default: the path the job names for this node)")
    p.add_argument(
        "--runtime",
        choices=("onnx", "torch"),
        help="what runs the head: onnx (ONNX Runtime, no torch needed) or torch (default: torch where it is "
        "installed, else onnx)",
    )
    p.add_argument("--device", default="cpu", help="device for the head: cpu, or cuda with --runtime torch")
    p.add_argument(
        "--rate-limit", type=float, metavar="BYTES_PER_S", help="cap the average upload rate (metered or shared links)"
    )
    p.add_argument("--once", action="store_true", help="exit after one job instead of waiting for more")
    add_policy_flags(p)
    add_metrics_flag(p)
    add_broker_flags(p)
    p.set_defaults(func=run)


def add_policy_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "privacy policy (set here, never by the cloud: jobs outside it are refused before any image is read; "
        "flags win over MISTNET_* env; default: no limits)"
    )
    g.add_argument(
        "--max-epsilon",
        type=float,
        metavar="E",
        help="refuse jobs with a larger ε per activation (env MISTNET_MAX_EPSILON)",
    )
    g.add_argument(
        "--min-cut-layer", type=int, metavar="N", help="refuse jobs that cut before layer N (env MISTNET_MIN_CUT_LAYER)"
    )
    g.add_argument(
        "--allow-arch", metavar="A,B", help="run only these model architectures (env MISTNET_ALLOW_ARCH)"
    )
    g.add_argument("--max-bits", type=int, metavar="K", help="refuse more bits per activation (env MISTNET_MAX_BITS)")


def run(args: argparse.Namespace) -> int:
    from common.policy import policy_from_env
    from common.protocol import check_name
    from edge_agent.agent import EdgeAgent

    policy = policy_from_env(
        {
            "max_epsilon": args.max_epsilon,
            "min_cut_layer": args.min_cut_layer,
            "allow_arch": args.allow_arch,
            "max_bits": args.max_bits,
        }
    )
    serve(args.metrics_port)
    agent = EdgeAgent(
        check_name("node", args.node),
        broker_from_args(args),
        args.data,
        args.device,
        args.once,
        args.rate_limit,
        s3_credentials=args.credentials,
        runtime=args.runtime,
        policy=policy,
    )
    return agent.serve()
