"""Plain progress lines for logs and pipes: one per state, phase, epoch or new message, none per chunk."""

from common.protocol import EdgeProgress, JobPhase, JobStatus, NodeState, NodeStatus
from mistnet.monitor import StatusLines


def test_one_line_per_change_not_per_update():
    lines = StatusLines()
    collecting = JobStatus(job="j", phase=JobPhase.COLLECTING, epochs=2, message="waiting for 1 edge(s)",
                           edges={"e1": EdgeProgress(samples=0, total=None)})
    shown = [lines.line(collecting)]
    for acked in (10, 20, 30):  # periodic updates while collecting: no news
        shown.append(lines.line(collecting.model_copy(update={"message": "",
                                                              "edges": {"e1": EdgeProgress(samples=acked, total=30)}})))
        shown.append(lines.line(NodeStatus(node="e1", state=NodeState.EXTRACTING, job="j", acked=acked, total=30)))
    shown.append(lines.line(collecting.model_copy(update={"message": "proceeding without e2"})))
    for epoch in (1, 1, 2):
        shown.append(lines.line(JobStatus(job="j", phase=JobPhase.TRAINING, epoch=epoch, epochs=2, loss=1.0 / epoch)))
    shown.append(lines.line(NodeStatus(node="e1", state=NodeState.OFFLINE, job="j", acked=30, total=30)))
    printed = [s for s in shown if s is not None]
    assert printed == [
        "job j: collecting, e1 0/? - waiting for 1 edge(s)",
        "edge e1: extracting, job j: 10/30 samples acknowledged",
        "job j: collecting, e1 0/? - proceeding without e2",
        "job j: training, epoch 1/2, loss 1.0000",
        "job j: training, epoch 2/2, loss 0.5000",
        "edge e1: offline, job j: 30/30 samples acknowledged",
    ]
