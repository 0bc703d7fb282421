"""The KubeEdge Sedna reference manifests run this system with only node names and paths mapped.

Two concessions to a test's time budget, both outside the mapping: 2 cloud epochs instead of 100,
and 8 images per edge. Everything else (cut_layer 4, epsilon 100, batch 32, lr 0.001, mistnet,
the Sedna dataset layout /data/N/COCO/coco128/images/train2017) is the reference's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from common.checkpoint import load_weights
from common.jobspec import load_job
from tests.agents import finish, start_cloud, start_edge

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COCO128 = SHARED / "data" / "coco128"
NODES = {"cloud-node": "cloud", "edge1-node": "edge1", "edge2-node": "edge2"}


def sedna_dataset(root: Path, images: list[Path]) -> Path:
    """A node's data in the reference layout: URL /data/N/COCO holding coco128/images/train2017."""
    for image in images:
        label = COCO128 / "labels" / "train2017" / f"{image.stem}.txt"
        for src, kind in ((image, "images"), (label, "labels")):
            if src.exists():
                dst = root / "coco128" / kind / "train2017" / src.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(src)
    return root


def mapped_manifest(tmp: Path) -> Path:
    docs = list(yaml.safe_load_all((REPO / "examples" / "sedna" / "yolov5_coco128_mistnet.yaml").read_text()))
    images = sorted((COCO128 / "images" / "train2017").glob("*.jpg"))
    paths = {
        "/data/1/COCO": str(sedna_dataset(tmp / "data1", images[:8])),
        "/data/2/COCO": str(sedna_dataset(tmp / "data2", images[8:16])),
        "/pretrained/yolov5.pth": str(SHARED / "weights" / "yolov5n.pt"),
        "/model/yolov5.pth": str(tmp / "model" / "yolov5.safetensors"),
    }
    text = yaml.safe_dump_all(docs)
    for old, new in {**NODES, **paths}.items():
        text = text.replace(old, new)
    docs = list(yaml.safe_load_all(text))
    job = next(d for d in docs if d and d.get("kind") == "FederatedLearningJob")
    env = job["spec"]["aggregationWorker"]["template"]["spec"]["containers"][0]["env"]
    next(e for e in env if e["name"] == "epochs")["value"] = "2"
    out = tmp / "sedna.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    return out


def test_reference_manifest_runs_with_node_names_and_paths_mapped(tmp_path: Path, mosquitto) -> None:
    manifest = mapped_manifest(tmp_path)
    spec = load_job(manifest)
    assert (spec.cut_layer, spec.privacy.epsilon, spec.cloud.batch_size, spec.cloud.epochs) == (4, 100, 32, 2)
    assert [e.node for e in spec.edges] == ["edge1", "edge2"] and spec.model.arch == "yolov5n"
    edges = [start_edge(node, mosquitto.url, tmp_path) for node in ("edge1", "edge2")]  # data path from the job
    cloud = start_cloud(manifest, mosquitto.url, tmp_path / "cloud")
    summary = json.loads(finish(cloud, 300))
    assert cloud.returncode == 0, (tmp_path / "cloud-cloud.log").read_text()[-3000:]
    for e in edges:
        assert e.wait(30) == 0
    assert summary["phase"] == "done"
    assert {n: e["samples"] for n, e in summary["edges"].items()} == {"edge1": 8, "edge2": 8}
    assert all(e["wire_bytes"] >= 8 * 51200 for e in summary["edges"].values())  # 64x80x80 bits per image at 640
    assert summary["metrics"] == {}  # no held-out set in the reference: nothing measured on training images
    saved = load_weights(tmp_path / "model" / "yolov5.safetensors")
    assert (saved.metadata["cut_layer"], saved.metadata["epsilon"], saved.arch) == (4, 100, "yolov5n")
