"""An edge's privacy policy: the limits, where they come from, and checking a job file against one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import SpecError
from common.jobspec import load_job
from common.policy import EdgePolicy, job_violations, load_policy, policy_from_env

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mnist-job.yaml"  # ε 4 on edge-1, 8 on edge-2


def test_the_default_policy_accepts_every_job():
    assert EdgePolicy().violations("yolov5x", 1, 1e300, 8) == []
    assert EdgePolicy().describe() == "no limits"


def test_each_limit_refuses_with_a_reason_without_paths():
    policy = EdgePolicy(max_epsilon=4, min_cut_layer=2, allow_arch=("lenet5",), max_bits=1)
    assert policy.violations("lenet5", 2, 4.0, 1) == []
    assert policy.violations("yolov5n", 1, 100.0, 2) == [
        "epsilon 100 exceeds this edge's limit 4",
        "cut_layer 1 is below this edge's minimum 2",
        "model yolov5n is not among this edge's allowed architectures (lenet5)",
        "2 bits per activation exceed this edge's limit 1",
    ]
    assert policy.violations("lenet5", 2, float("nan"), 1) == ["epsilon nan exceeds this edge's limit 4"]
    assert policy.describe() == "max_epsilon=4, min_cut_layer=2, allow_arch=lenet5, max_bits=1"


def test_flags_win_over_the_environment_and_empty_variables_are_no_limit():
    env = {"MISTNET_MAX_EPSILON": "8", "MISTNET_ALLOW_ARCH": "lenet5, yolov5n", "MISTNET_MAX_BITS": " "}
    policy = policy_from_env({"max_epsilon": 2.0, "min_cut_layer": None, "allow_arch": None, "max_bits": None}, env)
    assert policy == EdgePolicy(max_epsilon=2.0, allow_arch=("lenet5", "yolov5n"))
    for bad in ({"MISTNET_MAX_EPSILON": "inf"}, {"MISTNET_MAX_EPSILON": "-1"}, {"MISTNET_MAX_BITS": "9"}):
        with pytest.raises(SpecError, match="edge policy"):
            policy_from_env({}, bad)


def test_policy_files_are_checked(tmp_path):
    good = tmp_path / "policy.yaml"
    good.write_text("max_epsilon: 4\nallow_arch: [lenet5]\n")
    assert load_policy(good) == EdgePolicy(max_epsilon=4, allow_arch=("lenet5",))
    for text, problem in (("max_epsilon: .inf\n", "finite"), ("max_eps: 4\n", "max_eps"), ("- 4\n", "mapping")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(SpecError, match=problem):
            load_policy(bad)
    with pytest.raises(SpecError, match=r"missing\.yaml"):
        load_policy(tmp_path / "missing.yaml")


def test_a_job_is_checked_per_edge_with_its_own_epsilon():
    spec = load_job(EXAMPLE)
    assert job_violations(spec, EdgePolicy(max_epsilon=4)) == {"edge-2": ["epsilon 8 exceeds this edge's limit 4"]}
    assert job_violations(spec, EdgePolicy(max_epsilon=8, allow_arch=("lenet5",))) == {}


def _validate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mistnet.cli", "job", "validate", str(EXAMPLE), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_job_validate_with_a_policy(tmp_path):
    policy = tmp_path / "edge-policy.yaml"
    policy.write_text("max_epsilon: 4\n")
    refused = _validate("--policy", str(policy))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"policy {policy}: edge-2 refuses this job: epsilon 8 exceeds this edge's limit 4" in refused.stdout
    policy.write_text("max_epsilon: 8\n")
    accepted = _validate("--policy", str(policy), "--json")
    assert accepted.returncode == 0 and json.loads(accepted.stdout)["policy"] == {"file": str(policy), "refused": {}}
