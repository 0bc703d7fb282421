"""Disk footprint of an install: ``python -m bench.installed edge`` sums the installed files of the
base dependencies and an extra of pyproject.toml, with everything they require, as found in this
environment (the figure a fresh ``pip install 'mistnet[EXTRA]'`` would approach; Python itself and
pip are not counted)."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def requirements(extra: str) -> list[Requirement]:
    """The base dependencies and those of ``extra``, its ``mistnet[...]`` references expanded."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    out = [Requirement(r) for r in project["dependencies"]]
    todo, seen = [extra], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for raw in project["optional-dependencies"][name]:
            req = Requirement(raw)
            if req.name == "mistnet":
                todo += sorted(req.extras)
            else:
                out.append(req)
    return out


def dist_size(dist: metadata.Distribution) -> int:
    total = 0
    for f in dist.files or []:
        path = Path(str(dist.locate_file(f)))
        if path.is_file():
            total += path.stat().st_size
    return total


def installed(extra: str) -> dict[str, int]:
    """Bytes on disk per distribution that ``mistnet[extra]`` pulls in (its requirements' closure)."""
    sizes: dict[str, int] = {}
    todo = requirements(extra)
    while todo:
        req = todo.pop()
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key in sizes:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # not installed here (e.g. a platform-only dependency)
        sizes[key] = dist_size(dist)
        for raw in dist.requires or []:
            sub = Requirement(raw)
            if sub.marker is None or sub.marker.evaluate({"extra": ""}):
                todo.append(sub)
    return sizes


def main() -> int:
    for extra in sys.argv[1:] or ["edge"]:
        sizes = installed(extra)
        top = sorted(sizes.items(), key=lambda kv: -kv[1])[:8]
        print(f"mistnet[{extra}]: {sum(sizes.values()) / 1e6:.0f} MB in {len(sizes)} distributions; largest: "
              + ", ".join(f"{k} {v / 1e6:.0f}" for k, v in top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
