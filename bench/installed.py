"""Disk footprint of an install: ``python -m bench.installed edge`` sums the installed files of the
base dependencies and an extra of pyproject.toml, with everything they require, as found in this
environment (the figure a fresh ``pip install 'mistnet[EXTRA]'`` would approach; Python itself and
pip are not counted). A requirement counts if it is installed here and not only for some extra of its
parent (other environment markers are not evaluated: what they exclude is normally not installed)."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def name_of(requirement: str) -> str:
    """A requirement's distribution name, normalized (``Foo_Bar[x]>=1; ...`` -> ``foo-bar``)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else ""


def requirements(extra: str) -> list[str]:
    """The base dependencies and those of ``extra``, its ``mistnet[...]`` references expanded."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    out = list(project["dependencies"])
    todo, seen = [extra], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for raw in project["optional-dependencies"][name]:
            if name_of(raw) == "mistnet":
                todo += re.findall(r"[\w-]+", raw.partition("[")[2].partition("]")[0])
            else:
                out.append(raw)
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
        key = name_of(todo.pop())
        if not key or key in sizes:
            continue
        try:
            dist = metadata.distribution(key)
        except metadata.PackageNotFoundError:
            continue  # not installed here (e.g. a platform-only dependency)
        sizes[key] = dist_size(dist)
        todo += [r for r in dist.requires or [] if "extra ==" not in r.partition(";")[2]]
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
