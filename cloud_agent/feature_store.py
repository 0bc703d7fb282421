"""Where training ranks read the collected samples: the spool on rank 0's disk, or an S3 bucket any
node can reach.

:class:`FeatureStore` is a ``Dataset[StoredSample]`` over a job's samples in (node, id) order, the
order, so a trainer takes either of its two implementations:

- :class:`~cloud_agent.spool.SpoolFeatures`: the cloud's own spool (one machine).
- :class:`S3Store`: objects in S3 listed by an index object (``{prefix}/{job}/features-index.json``).
  Each object is a msgpack ``FeatureBatch`` (the wire format of a transfer) with its sha256 in the
  index; objects are fetched whole (a transfer is a few MB), verified, decoded and kept in a small
  LRU, so memory stays bounded whatever the data. A batch groups its samples by object: each object
  is fetched once per batch.

What the index lists is written by rank 0 after collection (:func:`publish_store`): with the S3
transmitter the edges' own objects (already verified against their claims when they were committed);
with ``cloud.feature_store`` set, objects rank 0 writes there from its spool.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from itertools import groupby

from pydantic import BaseModel, Field

from cloud_agent.spool import DamagedSample, FeatureStore, Spool, SpoolFeatures, StoredSample
from common import constants as C
from common.errors import ProtocolError
from common.jobspec import JobSpec
from common.protocol import FeatureBatch, FeatureLayout, ObjectStoreRef, decode_batch, encode_batch
from common.storage import ObjectStore, S3Options, s3_options, split_s3

log = logging.getLogger("mistnet.cloud.store")

INDEX_NAME = "features-index.json"
# Objects rank 0 writes to a named feature store hold about this many feature bytes each.
OBJECT_BYTES = 4 * 1024 * 1024
# Decoded objects an S3 reader keeps (each about a transfer: a few MB).
CACHE_OBJECTS = 4


class StoreObject(BaseModel):
    """One object of a feature store: a msgpack FeatureBatch holding these samples of one node."""

    node: str
    key: str
    size: int = Field(ge=1, le=C.MAX_TRANSFER_BYTES)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    ids: list[int] = Field(min_length=1)


class StoreIndex(BaseModel):
    """What a feature store holds: every committed sample of the job, once."""

    job: str
    objects: list[StoreObject]


class S3Store(FeatureStore):
    """Samples read from S3 objects, verified against the index's sha256, a few objects cached."""

    def __init__(self, store: ObjectStore, index_key: str, cache_objects: int = CACHE_OBJECTS) -> None:
        self.store = store
        self.cache_objects = cache_objects
        self.index = read_index(store, index_key)
        placed = sorted(
            (obj.node, sid, o, k) for o, obj in enumerate(self.index.objects) for k, sid in enumerate(obj.ids)
        )
        self.places = [(o, k) for _, _, o, k in placed]
        self.cache: OrderedDict[int, FeatureBatch] = OrderedDict()
        self.fetched = 0  # objects downloaded (a measure of how well the cache serves the access order)

    def __len__(self) -> int:
        return len(self.places)

    def __getitems__(self, indices: list[int]) -> list[StoredSample]:
        places = [self.places[i] for i in indices]
        found: dict[tuple[int, int], StoredSample] = {}
        for o, group in groupby(sorted(set(places)), key=lambda p: p[0]):
            batch = self._object(o)
            node = self.index.objects[o].node
            for _, k in group:
                found[(o, k)] = StoredSample(
                    node, batch.ids[k], batch.labels[k], batch.bits, batch.layout, batch.sample_data(k)
                )
        return [found[p] for p in places]

    def _object(self, o: int) -> FeatureBatch:
        batch = self.cache.get(o)
        if batch is not None:
            self.cache.move_to_end(o)
            return batch
        entry = self.index.objects[o]
        blob = self.store.get(entry.key, entry.size)
        self.fetched += 1
        if hashlib.sha256(blob).hexdigest() != entry.sha256:
            raise DamagedSample(f"feature object s3://{self.store.bucket}/{entry.key}: sha256 mismatch with the index")
        batch = decode_batch(blob)
        if batch.ids != entry.ids:
            raise DamagedSample(f"feature object s3://{self.store.bucket}/{entry.key} holds other samples than listed")
        self.cache[o] = batch
        while len(self.cache) > self.cache_objects:
            self.cache.popitem(last=False)
        return batch


def read_index(store: ObjectStore, key: str) -> StoreIndex:
    from pydantic import ValidationError

    blob = store.get(key, max_bytes=C.MAX_TRANSFER_BYTES)
    try:
        return StoreIndex.model_validate_json(blob)
    except ValidationError as exc:
        raise ProtocolError(
            f"s3://{store.bucket}/{key} is not a feature store index ({exc.errors()[0]['msg']})"
        ) from None


def index_key(job_prefix: str) -> str:
    return f"{job_prefix}{INDEX_NAME}"


def publish_store(spool: Spool, nodes: list[str], store: ObjectStore, job: str, job_prefix: str, copy: bool) -> int:
    """Write the index of a job's committed samples (``job_prefix`` ends with ``/``); ``copy``: first
    write the samples themselves as objects (a named feature store), else list the edges' objects (S3
    transmitter). Idempotent: a restarted rank 0 writes the same objects again. Returns objects listed."""
    objects = _copy_samples(spool, nodes, store, job_prefix) if copy else _edge_objects(spool, nodes)
    index = StoreIndex(job=job, objects=objects)
    store.put(index_key(job_prefix), index.model_dump_json().encode())
    log.info("feature store s3://%s/%s: %d object(s) listed", store.bucket, index_key(job_prefix), len(objects))
    return len(objects)


def _edge_objects(spool: Spool, nodes: list[str]) -> list[StoreObject]:
    wanted = set(nodes)
    return [
        StoreObject(node=obj.node, key=obj.key, size=obj.size, sha256=obj.sha256.hex(), ids=ids)
        for obj, ids in spool.objects()
        if obj.node in wanted and ids
    ]


def _copy_samples(spool: Spool, nodes: list[str], store: ObjectStore, job_prefix: str) -> list[StoreObject]:
    """The spool's samples as objects of about ``OBJECT_BYTES``, each of one node, bits and layout."""
    data = SpoolFeatures(spool, nodes)
    objects: list[StoreObject] = []
    group: list[StoredSample] = []
    size = 0
    for start in range(0, len(data), 256):
        for sample in data.__getitems__(list(range(start, min(start + 256, len(data))))):
            if group and (size >= OBJECT_BYTES or _kind(sample) != _kind(group[0])):
                objects.append(_put_group(store, job_prefix, group, len(objects)))
                group, size = [], 0
            group.append(sample)
            size += len(sample.features)
    if group:
        objects.append(_put_group(store, job_prefix, group, len(objects)))
    return objects


def _kind(sample: StoredSample) -> tuple[str, int, list[FeatureLayout]]:
    return sample.node, sample.bits, sample.layout


def _put_group(store: ObjectStore, job_prefix: str, group: list[StoredSample], number: int) -> StoreObject:
    first = group[0]
    batch = FeatureBatch(
        transfer=number,
        bits=first.bits,
        layout=first.layout,
        ids=[s.id for s in group],
        labels=[s.label for s in group],
        data=b"".join(s.features for s in group),
    )
    blob = encode_batch(batch)
    key = f"{job_prefix}features/{first.node}/{number:06d}.msgpack"
    store.put(key, blob)
    return StoreObject(node=first.node, key=key, size=len(blob), sha256=hashlib.sha256(blob).hexdigest(), ids=batch.ids)


def store_location(spec: JobSpec) -> tuple[str, str, bool] | None:
    """(bucket, job prefix, copy) of the job's feature store: ``cloud.feature_store`` (rank 0 copies
    the samples there), else the S3 transmitter's bucket (the edges' objects); None: the spool only."""
    if spec.cloud.feature_store is not None:
        url, copy = spec.cloud.feature_store, True
    elif spec.transmitter.s3 is not None:
        url, copy = spec.transmitter.s3.bucket_path, False
    else:
        return None
    bucket, prefix = split_s3(url)
    return bucket, ObjectStoreRef(bucket=bucket, prefix=prefix.strip("/")).job_prefix(spec.name), copy


def store_options(spec: JobSpec) -> S3Options:
    """The S3 transmitter's endpoint and keys when the job has one, over the MISTNET_S3_* environment."""
    s3 = spec.transmitter.s3
    if s3 is None:
        return s3_options()
    return s3_options(
        endpoint_url=s3.endpoint_url, access_key=s3.access_key, secret_key=s3.secret_key, region=s3.region
    )


def share_features(spec: JobSpec, spool: Spool, nodes: list[str]) -> str | None:
    """Rank 0, after collection: put the job's feature store in place; returns its index URL (None:
    the job has none)."""
    where = store_location(spec)
    if where is None:
        return None
    bucket, job_prefix, copy = where
    publish_store(spool, nodes, ObjectStore(bucket, store_options(spec)), spec.name, job_prefix, copy)
    return f"s3://{bucket}/{index_key(job_prefix)}"


def open_store(spec: JobSpec, cache_objects: int = CACHE_OBJECTS) -> S3Store | None:
    """Any rank on any node: the job's samples from its feature store (None: the job has none)."""
    where = store_location(spec)
    if where is None:
        return None
    bucket, job_prefix, _ = where
    return S3Store(ObjectStore(bucket, store_options(spec)), index_key(job_prefix), cache_objects)
