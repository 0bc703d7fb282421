"""The feature store training ranks read: one suite run against both implementations (the spool on
this disk, S3 through moto's server over HTTP), plus what only S3 has (bounded cache, the edges'
objects as the store)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import cloud_agent.feature_store as fs
from cloud_agent.collector import Collector
from cloud_agent.spool import DamagedSample, FeatureStore, Spool, SpoolFeatures
from cloud_agent.tasks.base import stack_features
from common.errors import SpecError
from common.jobspec import build_job
from common.protocol import FeatureBatch, FeatureObject, encode_batch, to_msgpack
from common.storage import ObjectStore, S3Options
from tests.harness import moto_s3
from tests.test_spool import LAYOUT, PER, SAMPLE_BYTES
from tests.test_spool import _batch as spool_batch

__all__ = ["moto_s3"]

TRANSFERS = {"edge1": 3, "edge2": 2}


def _batch(node: str, transfer: int) -> FeatureBatch:
    return spool_batch(transfer, LAYOUT, SAMPLE_BYTES, seed=len(node) * 7 + int(node[-1]))


def _expected() -> list[tuple[str, int, bytes, bytes]]:
    return [
        (node, b.ids[i], b.labels[i], b.sample_data(i))
        for node, n in sorted(TRANSFERS.items())
        for b in (_batch(node, t) for t in range(n))
        for i in range(PER)
    ]


def _job(**cloud: object) -> dict[str, object]:
    return {
        "name": "j",
        "model": {"arch": "lenet5", "num_classes": 10},
        "cut_layer": 2,
        "edges": [{"node": n, "dataset": "x", "batch_size": PER} for n in TRANSFERS],
        "cloud": cloud,
    }


@dataclass
class Store:
    data: FeatureStore
    damage: Callable[[int], None]  # damages the stored bytes of the sample at this index


def _filled_spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool.sqlite")
    for node, n in TRANSFERS.items():
        for t in range(n):
            spool.commit_transfer(node, _batch(node, t))
    return spool


def _spool_store(tmp_path: Path) -> Iterator[Store]:
    spool = _filled_spool(tmp_path)

    def damage(index: int) -> None:
        with (tmp_path / "spool.segments" / "000001.seg").open("r+b") as f:
            f.seek(index * SAMPLE_BYTES + 7)  # committed in (node, id) order: the segment holds them so
            byte = f.read(1)[0]
            f.seek(-1, 1)
            f.write(bytes([byte ^ 0x10]))

    yield Store(SpoolFeatures(spool, sorted(TRANSFERS)), damage)
    spool.close()


def _s3_store(tmp_path: Path, moto, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    """MQTT transmitter, ``cloud.feature_store`` named: rank 0 copies the spool's samples to S3."""
    access, secret = moto.keys["cloud"]
    for name, value in (("ACCESS_KEY", access), ("SECRET_KEY", secret), ("ENDPOINT", moto.url)):
        monkeypatch.setenv(f"MISTNET_S3_{name}", value)
    monkeypatch.setattr(fs, "OBJECT_BYTES", 5 * SAMPLE_BYTES)  # several objects per node
    spec = build_job(_job(feature_store=f"s3://{moto.bucket}/shared"))
    spool = _filled_spool(tmp_path)
    url = fs.share_features(spec, spool, sorted(TRANSFERS))
    assert url == f"s3://{moto.bucket}/shared/j/features-index.json"
    data = fs.open_store(spec, cache_objects=2)
    assert data is not None
    spool.close()

    def damage(index: int) -> None:
        o, _ = data.places[index]
        entry = data.index.objects[o]
        blob = bytearray(moto.client().get_object(Bucket=moto.bucket, Key=entry.key)["Body"].read())
        blob[-3] ^= 0x10
        moto.client().put_object(Bucket=moto.bucket, Key=entry.key, Body=bytes(blob))
        data.cache.clear()

    yield Store(data, damage)


@pytest.fixture(params=["spool", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "spool":
        yield from _spool_store(tmp_path)
    else:
        yield from _s3_store(tmp_path, request.getfixturevalue("moto_s3"), request.getfixturevalue("monkeypatch"))


def test_every_sample_once_in_node_id_order_and_batches_read_as_single_items(store: Store) -> None:
    data = store.data
    assert len(data) == len(_expected())
    assert [(s.node, s.id, s.label, s.features) for s in data.__getitems__(list(range(len(data))))] == _expected()
    indices = [17, 3, 3, 39, 0, 30]
    assert data.__getitems__(indices) == [data[i] for i in indices]
    loader = torch.utils.data.DataLoader(data, batch_size=7, shuffle=True, collate_fn=list)
    seen = sorted((s.node, s.id) for batch in loader for s in batch)
    assert seen == [(n, i) for n, i, _, _ in _expected()]
    assert stack_features(data.__getitems__([0, 1, 2]))[1].shape == (3, 6, 14, 14)


def test_damaged_bytes_fail_with_a_clear_error(store: Store) -> None:
    data = store.data
    good = data[2]
    store.damage(35)
    assert data[2] == good  # samples stored elsewhere stay readable
    with pytest.raises(DamagedSample, match=r"(sample edge2/11: .* crc32|edge2/.*: sha256 mismatch)"):
        data.__getitems__([0, 35])


def test_s3_reads_keep_a_bounded_cache_and_fetch_each_object_once_in_order(
    tmp_path: Path, moto_s3, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = next(_s3_store(tmp_path, moto_s3, monkeypatch)).data
    assert isinstance(data, fs.S3Store)
    objects = len(data.index.objects)
    assert objects == 5 + 4  # 24 samples of edge1 and 16 of edge2, in objects of at most 5
    for start in range(0, len(data), 4):
        data.__getitems__(list(range(start, min(start + 4, len(data)))))
        assert len(data.cache) <= 2
    assert data.fetched == objects
    assert all(k.startswith("shared/j/") for k in moto_s3.keys_under())


def test_with_the_s3_transmitter_the_edges_objects_are_the_store(tmp_path: Path, moto_s3) -> None:
    access, secret = moto_s3.keys["cloud"]
    s3 = {"bucket_path": f"s3://{moto_s3.bucket}/runs", "endpoint_url": moto_s3.url}
    spec = build_job({**_job(), "transmitter": {"s3": {**s3, "access_key": access, "secret_key": secret}}})
    edge = ObjectStore(moto_s3.bucket, S3Options(moto_s3.url, *moto_s3.keys["edge"]))
    cloud = ObjectStore(moto_s3.bucket, fs.store_options(spec))
    spool = Spool(tmp_path / "spool.sqlite")
    collector = Collector(
        spool, "j", dict.fromkeys(TRANSFERS, PER), lambda ack: None, lambda c: cloud.get(c.key, c.size), None
    )
    collector.object_prefix = lambda node: f"runs/j/{node}/"
    for node, n in TRANSFERS.items():
        for t in range(n):
            blob = encode_batch(_batch(node, t))
            digest = hashlib.sha256(blob).digest()
            key = f"runs/j/{node}/{t:06d}-{digest.hex()[:16]}.msgpack"
            edge.put(key, blob)
            claim = FeatureObject(job="j", node=node, transfer=t, key=key, size=len(blob), sha256=digest)
            collector.on_features(node, to_msgpack(claim))
    assert spool.committed() == {n: set(range(k)) for n, k in TRANSFERS.items()}
    before = set(moto_s3.keys_under())
    assert fs.share_features(spec, spool, sorted(TRANSFERS)) == f"s3://{moto_s3.bucket}/runs/j/features-index.json"
    assert set(moto_s3.keys_under()) == before | {"runs/j/features-index.json"}  # nothing copied
    data = fs.open_store(spec)
    assert data is not None and len(data.index.objects) == 5
    assert [(s.node, s.id, s.label, s.features) for s in data.__getitems__(list(range(len(data))))] == _expected()
    spool.close()


def test_the_feature_store_must_be_an_s3_url() -> None:
    with pytest.raises(SpecError, match=r"cloud\.feature_store.*s3://bucket\[/prefix\]"):
        build_job(_job(feature_store="/mnt/shared/features"))


def test_the_cloud_agent_puts_its_store_in_place_once_before_training(
    tmp_path: Path, moto_s3, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cloud_agent.agent import CloudAgent
    from common.transport import BrokerOptions

    access, secret = moto_s3.keys["cloud"]
    for name, value in (("ACCESS_KEY", access), ("SECRET_KEY", secret), ("ENDPOINT", moto_s3.url)):
        monkeypatch.setenv(f"MISTNET_S3_{name}", value)
    spec = build_job(_job(feature_store=f"s3://{moto_s3.bucket}/shared"))  # features over MQTT
    agent = CloudAgent(spec, BrokerOptions(), tmp_path / "cloud")
    for node, n in TRANSFERS.items():
        for t in range(n):
            agent.job.spool.commit_transfer(node, _batch(node, t))
    agent.training.share_features()
    assert agent.job.spool.get_meta("feature_store") == f"s3://{moto_s3.bucket}/shared/j/features-index.json"
    written = moto_s3.keys_under()
    agent.training.share_features()  # a restarted cloud does not write it again
    assert moto_s3.keys_under() == written and len(written) == 1 + 2  # index, one object per node
    data = fs.open_store(spec)
    assert data is not None
    assert [(s.node, s.id, s.label, s.features) for s in data.__getitems__(list(range(len(data))))] == _expected()
    agent.job.spool.close()
