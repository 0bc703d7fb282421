"""Weight loading refuses anything unsafe or unfit, and reads back what it writes."""

from __future__ import annotations

import os
import pickle
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from common.checkpoint import load_model, load_weights, read_tensors, save_checkpoint
from common.errors import CheckpointError
from common.models.lenet import LeNet5
from common.models.yolo import build_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "weights" / "yolov5n.pt"

torch.set_num_threads(2)


class _Evil:
    """Pickles as a call to ``fn(*args)``: what a malicious checkpoint does."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


def _torch_zip(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")
    return path
def test_official_checkpoint_loads_as_float32_yolov5n() -> None:
    w = load_weights(WEIGHTS)
    assert (w.arch, w.num_classes) == ("yolov5n", 80)
    assert w.metadata["format"] == "yolov5" and len(w.metadata["names"]) == 80
    assert all(v.dtype == torch.float32 for k, v in w.state_dict.items() if "num_batches" not in k)
    assert w.state_dict["model.24.anchors"][0, 0].tolist() == [1.25, 1.625]  # 10x13 px at stride 8
    model, _ = load_model(WEIGHTS, "yolov5n", 80)
    assert sum(p.numel() for p in model.parameters()) == 1_872_157


@pytest.mark.parametrize("payload", [
    {"model": _Evil(os.system, "touch {marker}")},
    _Evil(os.system, "touch {marker}"),
    {"x": _Evil(eval, "open({marker!r}, 'w')")},
    {"x": _Evil(exec, "open({marker!r}, 'w')")},
    {"x": _Evil(subprocess.getoutput, "touch {marker}")},
    {"x": _Evil(__import__, "os")},
])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path: Path, payload: Any) -> None:
    marker = tmp_path / "pwned"

    def fill(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: fill(v) for k, v in obj.items()}
        args = tuple(a.format(marker=str(marker)) if isinstance(a, str) else a for a in obj.args)
        return _Evil(obj.fn, *args)

    path = _torch_zip(tmp_path / "evil.pt", pickle.dumps(fill(payload), protocol=2))
    with pytest.raises(CheckpointError, match="not on the allowlist"):
        load_weights(path)
    assert not marker.exists()


def test_bare_pickle_is_refused_unread(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Evil(os.system, f"touch {marker}"), protocol=2))
    with pytest.raises(CheckpointError, match="bare pickle"):
        load_weights(path)
    assert not marker.exists()
@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_checkpoint_is_refused(tmp_path: Path, keep: float) -> None:
    data = WEIGHTS.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_weights(path)


def test_corrupt_storage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(LeNet5().state_dict(), path)
    with zipfile.ZipFile(path) as src:
        entries = {n: src.read(n) for n in src.namelist()}
    key = next(n for n in entries if n.endswith("/data/0"))
    entries[key] = entries[key][:-4]  # one float short
    with zipfile.ZipFile(path, "w") as dst:
        for n, b in entries.items():
            dst.writestr(n, b)
    with pytest.raises(CheckpointError, match="storage 0"):
        load_weights(path)


def test_truncated_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(LeNet5().state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError):
        load_weights(path)


def test_garbage_and_missing_files_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"hello, not a model" * 10)
    with pytest.raises(CheckpointError, match="not a torch zip archive or a safetensors"):
        load_weights(garbage)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "nope.pt")


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.pt"
    with torch.device("meta"):
        shapes = build_model("yolov5s", 80).state_dict()
    torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}, path)
    assert load_weights(path).arch == "yolov5s"
    with pytest.raises(CheckpointError, match="holds yolov5s weights, expected yolov5n"):
        load_weights(path, arch="yolov5n")
    with pytest.raises(CheckpointError, match="has 80 classes, expected 20"):
        load_weights(path, num_classes=20)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda sd: sd.pop("model.5.bn.bias"), "1 missing \\(model.5.bn.bias\\)"),
    (lambda sd: sd.__setitem__("model.25.extra", torch.zeros(1)), "1 unexpected \\(model.25.extra\\)"),
    (lambda sd: sd.__setitem__("model.10.conv.weight", torch.zeros(128, 256, 3, 3)), "wrongly shaped"),
])
def test_state_dict_that_does_not_fit_is_refused(tmp_path: Path, edit: Any, message: str) -> None:
    sd = build_model("yolov5n", 80).state_dict()
    edit(sd)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=message):
        load_weights(path)


def test_plain_half_state_dict_round_trips_as_float32(tmp_path: Path) -> None:
    model = build_model("yolov5n", 7)
    sd = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "yolov5.pth"
    torch.save(sd, path)
    w = load_weights(path)
    assert (w.arch, w.num_classes, w.metadata["format"]) == ("yolov5n", 7, "state_dict")
    for k, v in sd.items():
        assert w.state_dict[k].dtype == (torch.float32 if v.is_floating_point() else v.dtype)
        torch.testing.assert_close(w.state_dict[k], v.to(w.state_dict[k].dtype))


def test_bare_safetensors_round_trips(tmp_path: Path) -> None:
    sd = LeNet5(10).state_dict()
    path = tmp_path / "lenet.safetensors"
    save_file(sd, str(path))
    w = load_weights(path)
    assert (w.arch, w.num_classes) == ("lenet5", 10)
    for k, v in sd.items():
        torch.testing.assert_close(w.state_dict[k], v)


def test_save_checkpoint_round_trips_metadata(tmp_path: Path) -> None:
    model = build_model("yolov5n", 80)
    meta = {"arch": "yolov5n", "num_classes": 80, "cut_layer": 4, "epsilon": 4.0, "bits": 1,
            "thresholds": torch.zeros(64), "job": "demo"}
    path = tmp_path / "out" / "mistnet.safetensors"
    save_checkpoint(path, model.state_dict(), meta)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    w = load_weights(path)
    assert w.metadata["cut_layer"] == 4 and w.metadata["epsilon"] == 4.0 and w.metadata["bits"] == 1
    assert w.metadata["thresholds"] == [0.0] * 64 and w.metadata["job"] == "demo"
    for k, v in model.state_dict().items():
        torch.testing.assert_close(w.state_dict[k], v)
    tensors, raw_meta = read_tensors(path)
    assert raw_meta["arch"] == "yolov5n" and set(tensors) == set(model.state_dict())


def test_metadata_contradicting_the_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "liar.safetensors"
    save_checkpoint(path, build_model("yolov5n", 80).state_dict(), {"arch": "yolov5s", "num_classes": 80})
    with pytest.raises(CheckpointError, match="metadata says yolov5s"):
        load_weights(path)


def test_unstorable_metadata_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="metadata"):
        save_checkpoint(tmp_path / "x.safetensors", LeNet5().state_dict(), {"fn": print})
    assert not list(tmp_path.iterdir())


def test_training_checkpoint_with_numpy_scalars_loads(tmp_path: Path) -> None:
    import numpy as np

    sd = LeNet5(10).state_dict()
    path = tmp_path / "last.pt"
    torch.save({"epoch": 3, "best_fitness": np.float64(0.5), "state_dict": sd, "opt": {"lr": 0.01}}, path)
    w = load_weights(path)
    assert w.arch == "lenet5" and set(w.state_dict) == set(sd)
