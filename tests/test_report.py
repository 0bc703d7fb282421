"""``mistnet report``: curves and report.md from a work directory, without changing its spool."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cloud_agent.report import JobReport, ReportError, plot_workdir, write_plots, write_report
from cloud_agent.spool import Spool
from cloud_agent.trainer import EpochResult, History
from mistnet.cli import main as mistnet_main

PNG = b"\x89PNG\r\n\x1a\n"


def detector_workdir(root: Path) -> Path:
    """A spool as a YOLO job leaves it: three epochs, loss parts, mAP every other epoch, one edge missing."""
    workdir = root / "yolo-v5"
    spool = Spool(workdir / "spool.sqlite")
    history = History([
        EpochResult(1, {"box": 0.09, "obj": 0.05, "cls": 0.03}, {"map50": 0.31, "map50_95": 0.17}, 40.0, 12.5),
        EpochResult(2, {"box": 0.08, "obj": 0.045, "cls": 0.02}, {}, 39.0, 12.8),
        EpochResult(3, {"box": 0.07, "obj": 0.04, "cls": 0.015}, {"map50": 0.35, "map50_95": 0.2}, 38.5, 13.0),
    ])  # fmt: skip
    spool.set_meta("phase", "done")
    spool.set_meta("started", "1790000000")
    spool.set_meta("history", history.to_json())
    spool.set_meta("metrics_before", json.dumps({"map50": 0.2, "map50_95": 0.1}))
    spool.set_meta("checkpoint", "/model/yolov5.pth")
    spool.set_meta("missing", json.dumps({"edge2-node": "no data within 600 s; never seen on the broker"}))
    spool.db.execute("INSERT INTO transfers VALUES ('edge1-node', 0, 32, 1, 250000)")
    spool.db.execute("INSERT INTO transfers VALUES ('edge1-node', 1, 31, 0, 240000)")
    spool.db.execute("INSERT INTO nodes VALUES ('edge1-node', 64)")
    spool.close()
    return workdir


def test_report_reads_the_spool_and_writes_markdown_and_plots(tmp_path, capsys):
    workdir = detector_workdir(tmp_path)
    spool = workdir / "spool.sqlite"
    before = hashlib.sha256(spool.read_bytes()).hexdigest()
    assert mistnet_main(["report", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "job yolo-v5: done" in out
    assert "3 epoch(s), loss 0.1700 -> 0.1250" in out
    assert "map50       0.2000 before -> 0.3500" in out
    assert "edge edge1-node: 63 of 64 samples, 1 skipped, 490000 B, 7777.8 B/sample" in out
    assert "edge edge2-node: 0 samples" in out and "MISSING: no data within 600 s" in out
    assert hashlib.sha256(spool.read_bytes()).hexdigest() == before  # read-only

    md = (workdir / "report.md").read_text()
    assert "| edge2-node | 0 | 0 | - | 0 | - | no data within 600 s; never seen on the broker |" in md
    assert "| map50 | 0.2000 | 0.3500 | +0.1500 |" in md
    assert "| epoch | loss | map50 | map50_95 | seconds | samples/s |" in md
    assert "| 2 | 0.1450 | - | - | 39.0 | 13 |" in md
    assert "![loss](loss.png)" in md and "![metrics](metrics.png)" in md
    for name in ("loss.png", "metrics.png"):
        assert (workdir / name).read_bytes()[:8] == PNG

    assert mistnet_main(["report", str(workdir), "--json", "--out", str(tmp_path / "elsewhere")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["job"] == "yolo-v5" and data["metrics_after"] == {"map50": 0.35, "map50_95": 0.2}
    assert data["edges"][0]["bytes_per_sample"] == pytest.approx(490000 / 63)
    assert (tmp_path / "elsewhere" / "report.md").is_file()


def test_report_of_a_job_still_collecting_and_of_a_wrong_directory(tmp_path):
    workdir = tmp_path / "early"
    spool = Spool(workdir / "spool.sqlite")  # the cloud still holds it open (WAL)
    spool.set_meta("phase", "collecting")
    report, path, plots = write_report(workdir)
    spool.close()
    assert report.phase == "collecting" and report.epochs == [] and plots == []
    assert "No completed epoch yet." in path.read_text()
    assert "No held-out data" in path.read_text()
    with pytest.raises(ReportError, match="not a cloud work directory"):
        JobReport.load(tmp_path / "nothing")


def test_plots_never_fail_a_finished_job(tmp_path, caplog):
    class Broken:
        def get_meta(self, key: str) -> str:
            return "not json"

    assert plot_workdir(tmp_path, Broken(), "job") == []
    assert "could not draw the training curves" in caplog.text
    assert write_plots(tmp_path / "none", History(), {}) == []
