"""``mistnet data shift``: a corrupted copy of a YOLO-layout dataset (COCO-C), for measuring how
well MistNet learns conditions the pretrained model has not seen (fog, low contrast, noise, ...)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common.constants import CORRUPTIONS, SEVERITIES


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("data", help="dataset tools (shift: a COCO-C corrupted copy)")
    tools = p.add_subparsers(dest="tool", required=True, metavar="TOOL")
    shift = tools.add_parser(
        "shift",
        help="write a corrupted copy of a YOLO-layout dataset (labels copied unchanged)",
        description=f"Writes DST with the layout of SRC: every image under one COCO-C corruption "
        f"(deterministic per file name), labels and names.yaml copied unchanged. "
        f"Corruptions: {', '.join(CORRUPTIONS)}.",
    )
    shift.add_argument("src", type=Path, help="YOLO-layout dataset (images/ and labels/)")
    shift.add_argument("dst", type=Path, help="new folder for the copy (must not exist or be empty)")
    shift.add_argument("--corruption", required=True, choices=CORRUPTIONS, metavar="NAME", help="COCO-C corruption")
    shift.add_argument("--severity", required=True, type=int, choices=SEVERITIES, metavar="1..5", help="1..5")
    shift.set_defaults(func=run_shift)


def run_shift(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from common.datasets.shift import Shift, shift_dataset

    chosen = Shift(args.corruption, args.severity)
    columns = (TextColumn(f"shift {chosen}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("shift", total=None)
        written = shift_dataset(args.src, args.dst, chosen, lambda done, total: bar.update(task, completed=done,
                                                                                           total=total))
    print(f"{len(written)} images under {chosen} written to {args.dst}")
    return 0
