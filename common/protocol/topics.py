"""The topic tree: every topic the protocol uses, built and parsed in one place.

Topic tree (``{root}`` is ``mistnet/v1``; a node id always sits on its own level so broker ACL
patterns can substitute ``%u``):

===============================================  =========  ======  =====================================
topic                                            direction  format  meaning
===============================================  =========  ======  =====================================
``{root}/node/{node}/status``                    edge→all   JSON    retained birth / progress / last will
``{root}/node/{node}/jobs/{job}``                cloud→edge JSON    retained job assignment (empty = withdrawn)
``{root}/node/{node}/head/{job}/{seq}``          cloud→edge msgpack retained head-weight chunks
``{root}/node/{node}/head/{job}/onnx/{seq}``     cloud→edge msgpack retained chunks of the head as ONNX
``{root}/node/{node}/features/{job}``            edge→cloud msgpack feature chunks, or object claims (S3)
``{root}/node/{node}/ack/{job}``                 cloud→edge JSON    acknowledgements and resume points
``{root}/job/{job}/status``                      cloud→all  JSON    retained job status
``{root}/job/{job}/checkpoint``                  cloud→all  JSON    retained checkpoint announcement
``{root}/job/{job}/control``                     ops→cloud  JSON    operator commands (cancel)
===============================================  =========  ======  =====================================
"""

from __future__ import annotations

import re

from common import constants as C
from common.errors import ProtocolError
from common.jobspec.spec import NAME_PATTERN

_NAME = re.compile(NAME_PATTERN)


def check_name(kind: str, value: str) -> str:
    """Node and job ids become topic levels: no wildcards, slashes or empties."""
    if not _NAME.match(value):
        raise ProtocolError(f"{kind} {value!r} is not a valid name (letters, digits, '_', '.', '-'; max 63)")
    return value


class Topics:
    """Builds and parses every topic of the tree; nothing else formats topic strings."""

    root = C.TOPIC_ROOT

    @classmethod
    def node_status(cls, node: str) -> str:
        return f"{cls.root}/node/{node}/status"

    @classmethod
    def all_node_status(cls) -> str:
        return f"{cls.root}/node/+/status"

    @classmethod
    def job_assignment(cls, node: str, job: str) -> str:
        return f"{cls.root}/node/{node}/jobs/{job}"

    @classmethod
    def node_jobs(cls, node: str) -> str:
        return f"{cls.root}/node/{node}/jobs/+"

    @classmethod
    def head_chunk(cls, node: str, job: str, seq: int) -> str:
        return f"{cls.root}/node/{node}/head/{job}/{seq}"

    @classmethod
    def node_heads(cls, node: str) -> str:
        return f"{cls.root}/node/{node}/head/#"

    @classmethod
    def onnx_chunk(cls, node: str, job: str, seq: int) -> str:
        return f"{cls.root}/node/{node}/head/{job}/onnx/{seq}"

    @classmethod
    def node_head_form(cls, node: str, runtime: str) -> str:
        """The head chunks an edge of this runtime reads: weights (torch) or the ONNX graph (onnx)."""
        return f"{cls.root}/node/{node}/head/+/onnx/+" if runtime == "onnx" else f"{cls.root}/node/{node}/head/+/+"

    @classmethod
    def features(cls, node: str, job: str) -> str:
        return f"{cls.root}/node/{node}/features/{job}"

    @classmethod
    def all_features(cls, job: str) -> str:
        return f"{cls.root}/node/+/features/{job}"

    @classmethod
    def ack(cls, node: str, job: str) -> str:
        return f"{cls.root}/node/{node}/ack/{job}"

    @classmethod
    def node_acks(cls, node: str) -> str:
        return f"{cls.root}/node/{node}/ack/+"

    @classmethod
    def job_status(cls, job: str) -> str:
        return f"{cls.root}/job/{job}/status"

    @classmethod
    def all_job_status(cls) -> str:
        return f"{cls.root}/job/+/status"

    @classmethod
    def checkpoint(cls, job: str) -> str:
        return f"{cls.root}/job/{job}/checkpoint"

    @classmethod
    def control(cls, job: str) -> str:
        return f"{cls.root}/job/{job}/control"

    @classmethod
    def parse(cls, topic: str) -> tuple[str, dict[str, str]]:
        """(kind, ids) of a topic of the tree; ProtocolError for anything else."""
        parts = topic.split("/")
        root = cls.root.split("/")
        if parts[: len(root)] != root:
            raise ProtocolError(f"topic {topic!r} is outside {cls.root}")
        rest = parts[len(root) :]
        match rest:
            case ["node", node, "status"]:
                return "node_status", {"node": node}
            case ["node", node, "jobs", job]:
                return "job_assignment", {"node": node, "job": job}
            case ["node", node, "head", job, seq]:
                return "head_chunk", {"node": node, "job": job, "seq": seq}
            case ["node", node, "head", job, "onnx", seq]:
                return "onnx_chunk", {"node": node, "job": job, "seq": seq}
            case ["node", node, "features", job]:
                return "features", {"node": node, "job": job}
            case ["node", node, "ack", job]:
                return "ack", {"node": node, "job": job}
            case ["job", job, "status"]:
                return "job_status", {"job": job}
            case ["job", job, "checkpoint"]:
                return "checkpoint", {"job": job}
            case ["job", job, "control"]:
                return "control", {"job": job}
        raise ProtocolError(f"topic {topic!r} is not part of the protocol")
