"""``mistnet fetch``: download (or install from a local copy) the COCO128 data and YOLOv5 weights."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mistnet.fetch import ASSETS, cache_dir, fetch, installed_path, is_installed, source_url

USES = {"coco128": "--data", "yolov5n": "--model", "yolov5s": "--model"}


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "fetch",
        help="download COCO128 or official YOLOv5 weights into the cache the scenarios look in",
        description="Downloads an asset from its official location (COCO128 from ultralytics.com, the "
        "weights from the YOLOv5 v7.0 release), checks its size and sha256 where known (COCO128: its "
        "128 images and labels), installs it into the cache ($MISTNET_CACHE, else ~/.cache/mistnet) and "
        "prints its path. `mistnet demo --scenario coco128` finds it there when ../shared has no copy.",
    )
    p.add_argument("asset", choices=sorted(ASSETS), help="what to fetch")
    p.add_argument("--dir", type=Path, help="install under DIR instead of the cache")
    p.add_argument(
        "--from", dest="local", type=Path, metavar="FILE", help="verify and install this local copy (no download)"
    )
    p.add_argument("--force", action="store_true", help="fetch again even when an intact copy is installed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    asset = ASSETS[args.asset]
    if args.local is None and not args.force and is_installed(asset.name, args.dir):
        print(f"{asset.name} is already installed", file=sys.stderr)
    else:
        origin = args.local or source_url(asset)
        print(f"fetching {asset.name} from {origin}", file=sys.stderr, flush=True)
        _, digest = fetch(asset.name, args.dir, args.local)
        check = "size and sha256 checked" if asset.sha256 else f"{asset.images} images checked"
        print(f"installed {asset.name} ({check}; sha256 {digest})", file=sys.stderr)
    path = installed_path(asset.name, args.dir)
    if args.dir is None or args.dir.resolve() == cache_dir().resolve():
        print(f"the commands find it there by default; or pass {USES[asset.name]} {path}", file=sys.stderr)
    else:
        print(f"pass {USES[asset.name]} {path} (or set MISTNET_CACHE={args.dir})", file=sys.stderr)
    print(path)
    return 0
