"""``mistnet bench``: throughput, wire, transport, training, memory and scaling benchmarks."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench import PARTS


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "bench",
        help="measure the system against bare baselines (ratios, interleaved, medians)",
        description="Runs the whole system on this machine (mosquitto on loopback, real edge and cloud agents, "
        "COCO128 and MNIST) next to bare baselines measured in the same run, and writes bench/results/*.json, "
        "PNG plots and docs/benchmarks.md. The full run takes tens of minutes on 2 cores; --quick takes under 3.",
    )
    p.add_argument("--quick", action="store_true", help="smaller inputs, fewer repeats (in bench/results/quick)")
    p.add_argument("--json", action="store_true", help="print one summary JSON object on stdout")
    p.add_argument("--device", default="cpu", help="device of the edge head and of training: cpu or cuda")
    p.add_argument("--out", type=Path, help="where the JSON results and plots go")
    p.add_argument("--docs", type=Path, help="where the markdown page goes (default docs/benchmarks.md for full runs)")
    p.add_argument("--profile", choices=("full", "quick", "smoke"), help=argparse.SUPPRESS)
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (logs of every process)")
    p.add_argument("--only", nargs="+", choices=PARTS, metavar="PART",
                   help=f"run these benchmarks alone ({', '.join(PARTS)}) and render the page again with the "
                   "others' results of an earlier run")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bench.runner import run_bench

    profile = args.profile or ("quick" if args.quick else "full")
    summary = run_bench(
        profile,
        args.device,
        args.out,
        args.docs,
        log=lambda line: print(line, file=sys.stderr),
        keep=args.keep,
        only=args.only or (),
    )
    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
    elif args.only:
        print(json.dumps(summary, indent=1))
    else:
        for key, met in summary["goals_met"].items():
            print(f"{key:<24} {summary[key]:>10.3f}  {'ok' if met else 'NOT MET'}")
    return 0
