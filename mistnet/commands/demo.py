"""``mistnet demo``: the whole system on one machine, with live progress."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="run broker, cloud and edges locally on real data and print the summary",
        description="Starts a broker, a cloud agent and edge agents as separate processes that talk only over "
        "MQTT, runs a MistNet job with live progress and prints the summary.",
    )
    p.add_argument("--scenario", choices=["mnist"], default="mnist", help="which job to run")
    p.add_argument("--edges", type=int, default=2, help="number of edge agents (default 2)")
    p.add_argument("--epsilon", type=float, default=100.0, help="LDP budget per bit (default 100)")
    p.add_argument("--epochs", type=int, default=6, help="cloud training epochs")
    p.add_argument("--workdir", type=Path, help="keep data, logs and checkpoint here (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON summary object on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from common.errors import SpecError
    from mistnet.demo import DemoOptions, print_summary, run_demo

    if args.edges < 1:
        raise SpecError(f"--edges must be at least 1, got {args.edges}")
    if not args.epsilon > 0:
        raise SpecError(f"--epsilon must be > 0, got {args.epsilon}")
    started = time.monotonic()
    summary = run_demo(
        DemoOptions(edges=args.edges, epsilon=args.epsilon, epochs=args.epochs, workdir=args.workdir, json=args.json)
    )
    if args.json:
        sys.stdout.write(summary.model_dump_json() + "\n")
    else:
        print_summary(summary, Console(), started)
    return 0
