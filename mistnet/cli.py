"""The ``mistnet`` command: one subcommand per role, each defined in ``mistnet.commands.<name>``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from common.errors import MistnetError
from common.lifecycle import Terminated, interrupt_exit_code, sigterm_as_interrupt

# Each module exposes ``register(subparsers)`` and sets ``func`` (args -> exit code) on its parser.
COMMANDS = [
    "edge", "cloud", "monitor", "broker", "demo", "job", "eval", "train", "data", "report", "bench",
    "privacy-report", "fetch",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistnet", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"mistnet.commands.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what launchers run again (``cloud --nproc-per-node``)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        with sigterm_as_interrupt():  # containers and service managers stop us with SIGTERM
            return int(args.func(args))
    except MistnetError as exc:
        print(f"mistnet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"mistnet {args.command}: {'terminated' if isinstance(exc, Terminated) else 'interrupted'}",
              file=sys.stderr)
        return interrupt_exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
