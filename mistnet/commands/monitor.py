"""``mistnet monitor``: watch nodes and jobs from the status topics."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from mistnet.flags import add_broker_flags, broker_from_args


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "monitor",
        help="live view of nodes and jobs from the MQTT status topics",
        description="Subscribes to the retained node and job status topics and shows progress bars, phases "
        "and metrics (on a terminal; elsewhere one plain line per state, phase or epoch change). With --json, "
        "prints one status object per line instead.",
    )
    p.add_argument("--job", help="only this job (and exit when it finishes)")
    p.add_argument("--json", action="store_true", help="stream one status object per line")
    p.add_argument("--timeout", type=float, default=0, help="stop after this many seconds (0: never)")
    add_broker_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from mistnet.monitor import StatusBoard, drain, follow, status_link

    board = StatusBoard(args.job)
    link = status_link(broker_from_args(args))
    link.connect()
    end = time.monotonic() + args.timeout if args.timeout else float("inf")

    def running() -> bool:
        return not board.finished() and time.monotonic() < end

    try:
        if args.json:
            while running():
                for status in drain(link, board, 0.5):
                    sys.stdout.write(status.model_dump_json() + "\n")
                    sys.stdout.flush()
        else:
            follow(link, board, Console(stderr=False), running)
    finally:
        link.close()
    return 0
