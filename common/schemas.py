"""JSON Schemas of the JSON messages, generated from the pydantic models of :mod:`common.protocol`.

``docs/schemas/NAME.json`` lets tools that do not run this code (Node-RED, Grafana, other
languages) validate what they read from the broker or from ``mistnet cloud --json``. The models are
the reference; regenerate the files after changing one, and a test checks that they agree::

    python -m common.schemas            # rewrite docs/schemas/*.json
    python -m common.schemas --check    # exit 1 and name the stale files
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from common.protocol import (
    Ack,
    CheckpointAnnouncement,
    Control,
    JobAssignment,
    JobStatus,
    JobSummary,
    NodeStatus,
    Topics,
)

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "docs" / "schemas"

# Each model with where it travels (shown in the schema's $comment).
MODELS: dict[type[BaseModel], str] = {
    NodeStatus: f"retained on {Topics.node_status('{node}')} (and the last will)",
    JobAssignment: f"retained on {Topics.job_assignment('{node}', '{job}')}; an empty payload withdraws it",
    Ack: f"on {Topics.ack('{node}', '{job}')}",
    JobStatus: f"retained on {Topics.job_status('{job}')}",
    CheckpointAnnouncement: f"retained on {Topics.checkpoint('{job}')}",
    Control: f"retained on {Topics.control('{job}')} (mistnet job cancel)",
    JobSummary: "one object on stdout of `mistnet cloud --json` and `mistnet demo --json`",
}


def schema_for(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON Schema (validation mode: what a receiver accepts)."""
    schema = model.model_json_schema(mode="validation")
    return {
        "$schema": SCHEMA_DIALECT,
        "$comment": f"Generated from common.protocol.{model.__name__} by `python -m common.schemas`; "
        f"{MODELS[model]}.",
        **schema,
    }


def render(model: type[BaseModel]) -> str:
    return json.dumps(schema_for(model), indent=2, ensure_ascii=False) + "\n"


def generate() -> dict[str, str]:
    """``{file name: content}`` for every model."""
    return {f"{model.__name__}.json": render(model) for model in MODELS}


def write(directory: Path = DEFAULT_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in generate().items():
        path = directory / name
        path.write_text(text)
        paths.append(path)
    return paths


def stale(directory: Path = DEFAULT_DIR) -> list[str]:
    """Names of the files in ``directory`` that are missing or differ from the generated ones."""
    out = []
    for name, text in generate().items():
        path = directory / name
        if not path.is_file() or path.read_text() != text:
            out.append(name)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.schemas", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", nargs="?", type=Path, default=DEFAULT_DIR, help="default: docs/schemas")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is stale")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale(args.directory)
        for name in bad:
            print(f"{args.directory / name} is stale: run python -m common.schemas", file=sys.stderr)
        return 1 if bad else 0
    for path in write(args.directory):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
