"""docs/schemas/*.json are the JSON Schemas of the protocol's JSON messages, as generated."""

from __future__ import annotations

import json

import jsonschema
import pytest

from common import schemas
from common.protocol import (
    Ack,
    AckKind,
    CheckpointAnnouncement,
    Control,
    ControlAction,
    EdgeSummary,
    JobPhase,
    JobStatus,
    JobSummary,
    NodeState,
    NodeStatus,
)


def test_checked_in_schemas_are_the_generated_ones():
    assert schemas.stale() == [], "run: python -m common.schemas"
    names = {p.name for p in schemas.DEFAULT_DIR.glob("*.json")}
    expected = {"NodeStatus", "JobStatus", "CheckpointAnnouncement", "JobSummary", "Ack", "JobAssignment", "Control"}
    assert names == {f"{n}.json" for n in expected}
    assert schemas.main(["--check"]) == 0


def test_check_names_a_stale_file(tmp_path, capsys):
    schemas.write(tmp_path)
    (tmp_path / "Ack.json").write_text("{}\n")
    assert schemas.main(["--check", str(tmp_path)]) == 1
    assert "Ack.json is stale" in capsys.readouterr().err


@pytest.mark.parametrize(
    "message",
    [
        NodeStatus(node="edge1", state=NodeState.EXTRACTING, job="j", total=10, extracted=5, acked=3),
        JobStatus(job="j", phase=JobPhase.TRAINING, epoch=1, epochs=3, loss=0.5, metrics={"accuracy": 0.9}),
        CheckpointAnnouncement(job="j", epoch=3, url="s3://b/k", sha256="0" * 64, size=10, final=True),
        Ack(job="j", node="edge1", kind=AckKind.RESUME, next_transfer=3, committed=[5]),
        Control(job="j", action=ControlAction.CANCEL, reason="stop"),
        JobSummary(job="j", phase=JobPhase.DONE, edges={"edge1": EdgeSummary(samples=1, wire_bytes=9)},
                   metrics={}, checkpoint=None, duration_s=1.0),
    ],
    ids=lambda m: type(m).__name__,
)
def test_messages_validate_against_their_schema(message):
    schema = json.loads((schemas.DEFAULT_DIR / f"{type(message).__name__}.json").read_text())
    jsonschema.validate(json.loads(message.model_dump_json()), schema)
    bad = {**json.loads(message.model_dump_json()), "unexpected": 1}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
