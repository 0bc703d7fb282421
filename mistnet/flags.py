"""Command-line flags and defaults shared by the commands."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Literal

from common import constants as C
from common.transport import BrokerOptions, broker_options


def find_default(shared: Path, asset: str) -> Path:
    """``shared`` when it exists, else where ``mistnet fetch ASSET`` installs the asset (there or not)."""
    from mistnet.fetch import installed_path

    return shared if shared.exists() else installed_path(asset)


def missing_hint(asset: str, flag: str) -> str:
    """What to tell a user whose data or weights are nowhere to be found."""
    return f"run `mistnet fetch {asset}` (downloads it into the cache the commands look in) or pass {flag}"


def image_size(text: str) -> int:
    """An argparse type: a positive multiple of 32 (YOLOv5's largest stride)."""
    value = int(text)
    if value < 32 or value % 32:
        raise argparse.ArgumentTypeError(f"image size must be a positive multiple of 32, got {text}")
    return value


def bits_flag(text: str) -> int | Literal["auto"]:
    """An argparse type: ``privacy.bits`` as a job file gives it, checked by the spec itself."""
    from pydantic import ValidationError

    from common.jobspec import PrivacySpec

    try:
        return PrivacySpec.model_validate({"bits": int(text) if text.isdigit() else text}).bits
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def add_bits_flag(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--bits", type=bits_flag, default="auto", metavar="1..8|auto", help=help)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def add_broker_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("broker (flags win over --credentials, which wins over MISTNET_* env)")
    g.add_argument(
        "--broker",
        metavar="URL",
        help="mqtt://host:port or mqtts://host:port (default from MISTNET_BROKER, else mqtt://127.0.0.1:1883)",
    )
    g.add_argument("--username", help="MQTT user name (env MISTNET_USERNAME)")
    g.add_argument("--password", help="MQTT password (env MISTNET_PASSWORD; prefer --credentials)")
    g.add_argument(
        "--credentials",
        type=Path,
        metavar="FILE",
        help="KEY=VALUE file from `mistnet broker init-auth` (MISTNET_USERNAME, MISTNET_PASSWORD, ...)",
    )
    g.add_argument("--ca-file", metavar="FILE", help="CA certificate for mqtts:// (env MISTNET_CA_FILE)")
    g.add_argument("--cert-file", metavar="FILE", help="client certificate for mqtts://")
    g.add_argument("--key-file", metavar="FILE", help="client key for mqtts://")
    g.add_argument(
        "--connect-timeout",
        type=float,
        default=C.CONNECT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"keep retrying an unreachable broker this long at start (default {C.CONNECT_TIMEOUT_S:g})",
    )


def broker_from_args(args: argparse.Namespace) -> BrokerOptions:
    options = broker_options(
        args.broker, args.username, args.password, args.credentials, args.ca_file, args.cert_file, args.key_file
    )
    return dataclasses.replace(options, connect_timeout_s=args.connect_timeout)
