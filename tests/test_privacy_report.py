"""``mistnet privacy-report`` on real images: the attack runs on the levels a job would send."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import SpecError
from mistnet.commands.privacy_report import attacked_bits


def test_the_attack_reads_as_many_bits_as_a_job_at_each_epsilon_sends(tmp_path: Path) -> None:
    args = ["--imgsz", "64", "--public", "4", "--held-out", "2", "--epochs", "1", "--epsilons", "100,4"]
    result = subprocess.run([sys.executable, "-m", "mistnet.cli", "privacy-report", *args, "--out", str(tmp_path),
                             "--json"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    attacks = json.loads(result.stdout)["attacks"]
    assert [(a["setting"], a["bits"]) for a in attacks] == [("real", 1), ("eps=100,bits=4", 4), ("eps=4", 1)]
    assert all(-1 <= a["ssim"] <= 1 for a in attacks)
    assert (tmp_path / "reconstructions.png").stat().st_size > 0
    assert json.loads((tmp_path / "privacy-report.json").read_text())["attacks"] == attacks


def test_bits_come_from_a_checkpoints_thresholds_and_zero_thresholds_give_one() -> None:
    assert attacked_bits(2, {"bits": 4, "thresholds": {"3": [[0.0]]}}, "calibrated")(100) == 4
    assert attacked_bits("auto", {}, "zero")(100) == 1
    assert attacked_bits(2, {}, "calibrated")(1) == 2
    with pytest.raises(SpecError, match="zero thresholds give 1 bit"):
        attacked_bits(4, {}, "zero")
