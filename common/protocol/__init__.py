"""The wire protocol: the topic tree and every message that travels on it, one concern per module.

- :mod:`.topics`: the topic tree, and the check on node and job ids that become topic levels
- :mod:`.messages`: the schemas of assignments, head and feature chunks, object claims, acks, commands
- :mod:`.status`: what nodes and jobs report (status, checkpoints, the job summary)
- :mod:`.codec`: JSON and msgpack encoding of messages, decoded within limits and validated strictly
- :mod:`.transfer`: a feature transfer cut into verified chunks, its digest, and its reassembly

Feature chunks are msgpack envelopes carrying raw bytes; nothing on the wire is ever pickled. With
the S3 transmitter a transfer's bytes go to an object store and the features topic carries only a
:class:`FeatureObject` claim (key, size, sha256).
Status, acknowledgement and checkpoint messages are JSON so any MQTT tool can read them.

Callers import from here (``from common.protocol import Chunk``), not from the modules.
"""

from common.protocol.codec import (
    decode_batch,
    decode_chunk,
    decode_head_chunk,
    encode_batch,
    encode_chunk,
    encode_head_chunk,
    from_json,
    from_msgpack,
    parse_feature_message,
    to_json,
    to_msgpack,
)
from common.protocol.messages import (
    Ack,
    AckKind,
    Chunk,
    Control,
    ControlAction,
    FeatureBatch,
    FeatureLayout,
    FeatureObject,
    HeadChunk,
    HeadManifest,
    JobAssignment,
    JobState,
    LayerThresholds,
    Message,
    ModelRef,
    ObjectStoreRef,
    OnnxHead,
    PrivacyParams,
    SkippedSample,
    packed_size,
)
from common.protocol.status import (
    CheckpointAnnouncement,
    EdgeProgress,
    EdgeSummary,
    JobPhase,
    JobStatus,
    JobSummary,
    NodeState,
    NodeStatus,
    PrivacyAccount,
    finite,
)
from common.protocol.topics import Topics, check_name
from common.protocol.transfer import join_transfer, split_transfer, transfer_digest

__all__ = [
    "Ack",
    "AckKind",
    "CheckpointAnnouncement",
    "Chunk",
    "Control",
    "ControlAction",
    "EdgeProgress",
    "EdgeSummary",
    "FeatureBatch",
    "FeatureLayout",
    "FeatureObject",
    "HeadChunk",
    "HeadManifest",
    "JobAssignment",
    "JobPhase",
    "JobState",
    "JobStatus",
    "JobSummary",
    "LayerThresholds",
    "Message",
    "ModelRef",
    "NodeState",
    "NodeStatus",
    "ObjectStoreRef",
    "OnnxHead",
    "PrivacyAccount",
    "PrivacyParams",
    "SkippedSample",
    "Topics",
    "check_name",
    "decode_batch",
    "decode_chunk",
    "decode_head_chunk",
    "encode_batch",
    "encode_chunk",
    "encode_head_chunk",
    "finite",
    "from_json",
    "from_msgpack",
    "join_transfer",
    "packed_size",
    "parse_feature_message",
    "split_transfer",
    "to_json",
    "to_msgpack",
    "transfer_digest",
]
