"""Wire format: topics, chunk envelopes, feature batches; malformed input is refused, not attempted."""

import hashlib

import msgpack
import pytest
from pydantic import ValidationError

from common import constants as C
from common.errors import ProtocolError
from common.protocol import (
    Ack,
    AckKind,
    Chunk,
    FeatureBatch,
    FeatureLayout,
    JobPhase,
    JobStatus,
    NodeState,
    NodeStatus,
    PrivacyParams,
    SkippedSample,
    Topics,
    check_name,
    decode_batch,
    decode_chunk,
    encode_batch,
    encode_chunk,
    finite,
    from_json,
    join_transfer,
    split_transfer,
    to_json,
    transfer_digest,
)


def test_topics_round_trip():
    cases = {
        Topics.node_status("edge1"): ("node_status", {"node": "edge1"}),
        Topics.job_assignment("edge1", "j"): ("job_assignment", {"node": "edge1", "job": "j"}),
        Topics.head_chunk("edge1", "j", 3): ("head_chunk", {"node": "edge1", "job": "j", "seq": "3"}),
        Topics.features("edge2", "j"): ("features", {"node": "edge2", "job": "j"}),
        Topics.ack("edge2", "j"): ("ack", {"node": "edge2", "job": "j"}),
        Topics.job_status("j"): ("job_status", {"job": "j"}),
        Topics.checkpoint("j"): ("checkpoint", {"job": "j"}),
    }
    for topic, expected in cases.items():
        assert Topics.parse(topic) == expected


@pytest.mark.parametrize("topic", ["other/x", "mistnet/v1/node/e/unknown", "mistnet/v1/job/j/status/extra", ""])
def test_foreign_topics_are_refused(topic):
    with pytest.raises(ProtocolError):
        Topics.parse(topic)


@pytest.mark.parametrize("name", ["", "a/b", "+", "#", "a b", "x" * 64])
def test_bad_names_are_refused(name):
    with pytest.raises(ProtocolError):
        check_name("node", name)


def make_batch(n=5, transfer=0):
    layout = [FeatureLayout(layer=3, shape=[6, 14, 14])]
    return FeatureBatch(
        transfer=transfer,
        bits=1,
        layout=layout,
        ids=list(range(n)),
        labels=[bytes([i]) for i in range(n)],
        data=bytes(range(147)) * n,
    )


def test_transfer_split_and_join_round_trip():
    blob = encode_batch(make_batch(40))
    chunks = list(split_transfer("job", "edge1", 7, blob, 1024))
    assert len(chunks) == -(-len(blob) // 1024)
    decoded = [decode_chunk(encode_chunk(c)) for c in reversed(chunks)]
    decoded.sort(key=lambda c: c.seq)
    joined = join_transfer(
        [c.payload for c in decoded], [c.sha256 for c in decoded], decoded[0].size, decoded[0].transfer_sha256
    )
    assert decode_batch(joined) == make_batch(40)


def test_wire_overhead_of_a_chunk_is_small():
    payload = bytes(C.DEFAULT_CHUNK_BYTES)
    (chunk,) = split_transfer("job", "edge1", 0, payload, C.DEFAULT_CHUNK_BYTES)
    assert len(encode_chunk(chunk)) - len(payload) < 200


def test_corrupt_chunk_is_detected():
    (chunk,) = split_transfer("job", "edge1", 0, b"hello world", 1024)
    tampered = chunk.model_copy(update={"payload": b"hello World"})
    with pytest.raises(ProtocolError, match="sha256"):
        decode_chunk(encode_chunk(tampered))


def test_whole_transfer_digest_is_checked():
    chunks = list(split_transfer("job", "e", 0, b"a" * 3000, 1024))
    with pytest.raises(ProtocolError, match="mismatch"):
        join_transfer(
            [c.payload for c in chunks[:-1]], [c.sha256 for c in chunks[:-1]], chunks[0].size, chunks[0].transfer_sha256
        )


def test_oversized_claims_are_refused_before_allocation():
    huge = {
        "v": 1,
        "job": "j",
        "node": "e",
        "transfer": 0,
        "seq": 0,
        "total": 1,
        "size": 10 * 1024**3,
        "sha256": bytes(32),
        "transfer_sha256": bytes(32),
        "payload": b"x",
    }
    with pytest.raises(ProtocolError, match="size"):
        decode_chunk(msgpack.packb(huge, use_bin_type=True))
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_chunk(b"\x00" * (C.MAX_CHUNK_BYTES + C.ENVELOPE_OVERHEAD_BYTES + 1))


def test_msgpack_bomb_is_refused():
    # A 6-byte header claiming a 4 GiB binary: msgpack must refuse without allocating it.
    bomb = b"\x81\xa7payload\xc6\xff\xff\xff\xff"
    with pytest.raises(ProtocolError):
        decode_chunk(bomb)
    nested = b"\x91" * 100_000
    with pytest.raises(ProtocolError):
        decode_chunk(nested)


def test_oversized_feature_shape_is_refused():
    raw = make_batch(1).model_dump()
    raw["layout"] = [{"layer": 3, "shape": [100000, 100000, 100000]}]
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_batch(msgpack.packb(raw, use_bin_type=True))


def test_batch_data_must_match_layout():
    raw = make_batch(2).model_dump()
    raw["data"] = raw["data"][:-1]
    with pytest.raises(ProtocolError, match="data is"):
        decode_batch(msgpack.packb(raw, use_bin_type=True))


def test_unknown_fields_and_wrong_types_are_refused():
    good = to_json(NodeStatus(node="edge1", state=NodeState.ONLINE))
    assert from_json(NodeStatus, good).node == "edge1"
    for bad in (b"{", b"[]", b'{"node": "edge1", "state": "dancing"}', good.replace(b'"node"', b'"extra":1,"node"')):
        with pytest.raises(ProtocolError):
            from_json(NodeStatus, bad)


def test_status_and_ack_are_plain_json():
    status = JobStatus(job="j", phase=JobPhase.TRAINING, epoch=2, epochs=5, metrics={"accuracy": 0.9})
    assert b'"phase":"training"' in to_json(status)
    ack = Ack(job="j", node="e", kind=AckKind.RESUME, next_transfer=3, committed=[5])
    assert from_json(Ack, to_json(ack)) == ack


def test_chunk_digest_helpers_agree():
    (chunk,) = split_transfer("job", "e", 0, b"abc", 1024)
    assert chunk.sha256 == hashlib.sha256(b"abc").digest()
    assert chunk.transfer_sha256 == transfer_digest([chunk.sha256]) == hashlib.sha256(chunk.sha256).digest()
    assert isinstance(chunk, Chunk)


def test_transfer_digest_covers_chunk_order():
    blob = bytes(i % 251 for i in range(3000))  # no two chunks alike
    chunks = list(split_transfer("job", "e", 0, blob, 1024))
    payloads, digests = [c.payload for c in chunks], [c.sha256 for c in chunks]
    assert join_transfer(payloads, digests, chunks[0].size, chunks[0].transfer_sha256) == blob
    swapped = [payloads[1], payloads[0], *payloads[2:]]
    with pytest.raises(ProtocolError, match="mismatch"):
        join_transfer(swapped, [digests[1], digests[0], *digests[2:]], chunks[0].size, chunks[0].transfer_sha256)


def test_privacy_params_thresholds_must_fit_bits_and_ascend():
    from common.protocol import LayerThresholds

    ok = PrivacyParams(epsilon=4, bits=2, thresholds=[LayerThresholds(layer=3, values=[[-1, 0, 1], [0, 0, 2]])])
    assert ok.thresholds is not None and ok.thresholds[0].values[1] == [0, 0, 2]
    with pytest.raises(ValidationError, match="2 bits need 3 thresholds"):
        PrivacyParams(epsilon=4, bits=2, thresholds=[LayerThresholds(layer=3, values=[[0.5]])])
    with pytest.raises(ValidationError, match="need thresholds"):
        PrivacyParams(epsilon=4, bits=3)
    with pytest.raises(ValidationError, match="ascending"):
        LayerThresholds(layer=3, values=[[1, 0, 2]])
    with pytest.raises(ValidationError, match="finite"):
        LayerThresholds(layer=3, values=[[float("nan")]])
    with pytest.raises(ValidationError, match="same number"):
        LayerThresholds(layer=3, values=[[0.0], [0.0, 1.0]])


def _message_classes():
    import common.protocol as protocol

    return [c for c in vars(protocol).values() if isinstance(c, type) and issubclass(c, protocol.Message)]


def test_no_message_accepts_nan_or_infinity():
    """JSON parsers take NaN and Infinity as literals; every float of every message refuses them
    (an Infinity ε would turn randomized response off)."""
    classes = _message_classes()
    assert len(classes) > 15 and all(c.model_config.get("allow_inf_nan") is False for c in classes)
    for literal in (b"Infinity", b"-Infinity", b"NaN"):
        with pytest.raises(ProtocolError, match="epsilon"):
            from_json(PrivacyParams, b'{"epsilon": ' + literal + b"}")
        with pytest.raises(ProtocolError, match="time"):
            from_json(NodeStatus, b'{"node": "e", "state": "online", "time": ' + literal + b"}")
        with pytest.raises(ProtocolError, match="metrics"):
            from_json(JobStatus, b'{"job": "j", "phase": "done", "metrics": {"accuracy": ' + literal + b"}}")
    assert from_json(PrivacyParams, b'{"epsilon": 1e300}').epsilon == 1e300  # large but finite: the policy's job


def test_finite_leaves_out_diverged_values():
    assert finite({"loss": float("nan"), "box": float("inf"), "cls": 0.5}) == {"cls": 0.5}


def test_skipped_samples_carry_a_category_not_a_path():
    skipped = SkippedSample(id=3, reason="unreadable image")
    with pytest.raises(ValidationError):
        SkippedSample(id=3, key="images/secret.jpg", reason="unreadable image")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        FeatureBatch(transfer=0, bits=1, layout=[], ids=[], keys=["a.jpg"], labels=[], data=b"")  # type: ignore[call-arg]
    assert skipped.model_dump() == {"id": 3, "reason": "unreadable image"}
