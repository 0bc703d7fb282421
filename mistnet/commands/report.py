"""``mistnet report JOBDIR``: summarize a cloud work directory and write ``JOBDIR/report.md`` with plots.

Reads the spool's meta (phase, per-epoch history, metrics before training, checkpoint, missing edges)
and what each edge delivered, without changing the spool: it works on a finished job and on one
still running. Writes ``loss.png``, ``metrics.png`` and ``report.md`` into JOBDIR (or ``--out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "report",
        help="summarize a job's work directory and write report.md with the training curves",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("jobdir", type=Path, help="the cloud agent's work directory (mistnet cloud --workdir)")
    p.add_argument("--out", type=Path, help="write report.md and the plots here instead of JOBDIR")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cloud_agent.report import render_text, write_report

    report, path, plots = write_report(args.jobdir, args.out)
    if args.json:
        print(report.to_json())
    else:
        print(render_text(report))
        print(f"wrote {path}" + "".join(f", {p}" for p in plots))
    return 0
