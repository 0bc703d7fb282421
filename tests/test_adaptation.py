"""Adapting the cloud to bits: thresholds and cut decoder, their checkpoint, and what they buy."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from bench.utility import Measurement, Setup
from cloud_agent.adaptation import Adaptation
from common.checkpoint import load_model, save_checkpoint
from common.datasets.yolo import YoloDataset, discover_images
from common.errors import CheckpointError
from common.evaluation import split_predict_fn
from common.models.cutdecoder import CutDecoder, attach
from common.privacy import calibrate_thresholds, feature_transform
from common.split import run_head
from scenarios.folders import link_yolo_folder, split_images

SHARED = Path(__file__).resolve().parents[2] / "shared"
WEIGHTS = SHARED / "weights" / "yolov5n.pt"
COCO128 = SHARED / "data" / "coco128"
CUT = 4


@pytest.fixture(scope="module")
def pretrained() -> torch.nn.Module:
    model, _ = load_model(WEIGHTS)
    return model.eval()


def _adaptation(model: torch.nn.Module) -> Adaptation:
    x = torch.rand(2, 3, 64, 64)
    head = run_head(model, x, CUT)[3]
    decoder = CutDecoder({3: head.shape[1]}, 16)
    torch.nn.init.normal_(decoder.decoder(3).out.weight, std=0.5)
    return Adaptation(1, {3: calibrate_thresholds(head, 1)}, decoder.eval())


def test_adaptation_is_stored_and_reloaded_exactly(tmp_path: Path, pretrained: torch.nn.Module) -> None:
    a = _adaptation(pretrained)
    a.save(tmp_path / "adaptation.safetensors")
    b = Adaptation.load(tmp_path / "adaptation.safetensors")
    assert b.bits == 1 and torch.equal(b.thresholds[3], a.thresholds[3])
    assert b.decoder is not None and a.decoder is not None
    for (k, v), (k2, v2) in zip(a.decoder.state_dict().items(), b.decoder.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    assert b.encoding() == a.encoding()


def test_checkpoint_metadata_drives_eval_through_thresholds_and_decoder(
    tmp_path: Path, pretrained: torch.nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    """A MistNet checkpoint with a cut decoder is evaluated head -> levels -> decoder -> tail by itself."""
    from mistnet.commands.eval import predict_fn_for, run

    data = link_yolo_folder(sorted(discover_images(COCO128))[:4], tmp_path / "data")
    adaptation = _adaptation(pretrained)
    assert adaptation.decoder is not None
    model = attach(load_model(WEIGHTS)[0], adaptation.decoder)
    meta = {"arch": "yolov5n", "num_classes": 80, "image_size": 160, "cut_layer": CUT, "epsilon": 4.0}
    meta.update(adaptation.encoding())
    path = tmp_path / "mistnet.safetensors"
    save_checkpoint(path, model.state_dict(), meta)
    args = Namespace(model=path, data=data, imgsz=None, batch_size=4, square=True, device="cpu", json=True)
    assert run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 4 and out["imgsz"] == 160
    loaded, weights = load_model(path)
    x = torch.rand(2, 3, 160, 160)
    with torch.inference_mode():
        replayed = predict_fn_for(loaded, weights.metadata, YoloDataset(data, 160))(x)[0]
        deployed = split_predict_fn(model, CUT, feature_transform(meta))(x)[0]
        without_decoder = split_predict_fn(pretrained, CUT, feature_transform(meta))(x)[0]
    assert torch.allclose(replayed, deployed, atol=1e-5)
    assert not torch.allclose(replayed, without_decoder, atol=1e-2)
    # Decoder tensors without the metadata that rebuilds the decoder are refused, not half-loaded.
    del meta["decoder"]
    save_checkpoint(tmp_path / "bad.safetensors", model.state_dict(), meta)
    with pytest.raises(CheckpointError, match="cut-decoder"):
        load_model(tmp_path / "bad.safetensors")


@pytest.mark.slow
def test_adapted_model_beats_the_reference_fine_tune_on_held_out_images(tmp_path: Path) -> None:
    split = split_images(discover_images(COCO128), 2, 8, 16, public=16)
    folders = {f"edge{k}": link_yolo_folder(imgs, tmp_path / f"edge{k}") for k, imgs in enumerate(split.edges, 1)}
    folders["held-out"] = link_yolo_folder(split.held_out, tmp_path / "held-out")
    folders["public"] = link_yolo_folder(split.public, tmp_path / "public", labels=False)
    folders["in-sample"] = link_yolo_folder(split.edges[0] + split.edges[1], tmp_path / "in-sample")
    setup = Setup(WEIGHTS, 192, epochs=3, decoder_epochs=6, folders=folders, workdir=tmp_path)
    rows = {r.method: r for r in Measurement(setup, ["reference", "adapted"]).run([4.0])}
    reference, adapted = rows["reference"].held_out, rows["adapted"].held_out
    assert adapted[1] > 2 * reference[1] and adapted[0] > 2 * reference[0], (adapted, reference)
