"""Where checkpoints and large objects go: a local path or ``s3://bucket/key`` through boto3.

S3 failures are reported, never papered over by writing somewhere else. :class:`ObjectStore` is the
S3 transmitter's side (claim-check): feature objects uploaded by edges (multipart when large),
downloaded with their size bounded before reading, and deleted by prefix after a job.

Credentials never come from the broker: explicit values (the job's Sedna Secret, on the cloud) win
over a ``--credentials`` file, which wins over the ``MISTNET_S3_*`` environment; when none is set,
boto3's own chain applies (``AWS_ACCESS_KEY_ID``…, ``~/.aws``, instance roles).
"""

from __future__ import annotations

import functools
import io
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from common import constants as C
from common.errors import ProtocolError, TransportError

ENV_ACCESS_KEY = "MISTNET_S3_ACCESS_KEY"
ENV_SECRET_KEY = "MISTNET_S3_SECRET_KEY"
ENV_ENDPOINT = "MISTNET_S3_ENDPOINT"
ENV_REGION = "MISTNET_S3_REGION"


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    region: str | None = None


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    u = urlparse(url)
    if u.scheme != "s3" or not u.netloc:
        raise TransportError(f"{url!r} is not an s3://bucket/key URL")
    return u.netloc, u.path.lstrip("/")


def s3_options(
    endpoint_url: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str | None = None,
    credentials: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> S3Options:
    """Explicit values win over the credentials file (``KEY=VALUE``), which wins over the environment."""
    from common.transport import read_env_file

    values = {k: v for k, v in (os.environ if env is None else env).items() if k.startswith("MISTNET_S3_")}
    if credentials is not None:
        values.update({k: v for k, v in read_env_file(credentials).items() if k.startswith("MISTNET_S3_")})
    return S3Options(
        endpoint_url=endpoint_url or values.get(ENV_ENDPOINT) or None,
        access_key=access_key or values.get(ENV_ACCESS_KEY) or None,
        secret_key=secret_key or values.get(ENV_SECRET_KEY) or None,
        region=region or values.get(ENV_REGION) or None,
    )


def s3_client(options: S3Options, attempts: int = 5) -> Any:
    return _client(options, attempts)


@functools.lru_cache(maxsize=8)
def _client(options: S3Options, attempts: int) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=options.endpoint_url,
        aws_access_key_id=options.access_key,
        aws_secret_access_key=options.secret_key,
        region_name=options.region or "us-east-1",
        config=Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=5, read_timeout=30),
    )


def describe_s3_error(exc: BaseException) -> str:
    """One line for a status message or a log: what went wrong, never a credential."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, PartialCredentialsError

    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return f"no S3 credentials ({exc}); set {ENV_ACCESS_KEY} and {ENV_SECRET_KEY} or AWS_* variables"
    if isinstance(exc, EndpointConnectionError):
        return f"S3 endpoint unreachable: {exc}"
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"S3 refused: {err.get('Code', '?')}: {err.get('Message', '')}".rstrip(": ")
    text = str(exc) or type(exc).__name__
    return f"S3 error: {text}"


class ObjectStore:
    """One bucket of an S3-compatible store (AWS, MinIO, Ceph RGW, moto) for feature objects."""

    def __init__(self, bucket: str, options: S3Options, attempts: int = 3) -> None:
        self.bucket = bucket
        self.options = options
        self.attempts = attempts

    @property
    def client(self) -> Any:
        return s3_client(self.options, self.attempts)

    def _errors(self) -> tuple[type[BaseException], ...]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        return (BotoCoreError, ClientError, Boto3Error)

    def put(self, key: str, data: bytes, multipart_bytes: int = C.MULTIPART_BYTES) -> None:
        """Upload; objects of ``multipart_bytes`` or more go up as a multipart upload."""
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(
            multipart_threshold=multipart_bytes, multipart_chunksize=multipart_bytes, max_concurrency=4
        )
        try:
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, key, Config=config)
        except self._errors() as exc:
            raise TransportError(f"cannot upload s3://{self.bucket}/{key}: {describe_s3_error(exc)}") from None

    def get(self, key: str, size: int | None = None, max_bytes: int = C.MAX_TRANSFER_BYTES) -> bytes:
        """The object's bytes; ProtocolError when it is missing, not ``size`` bytes (when given) or
        larger than ``max_bytes`` (checked before reading)."""
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ProtocolError(f"object s3://{self.bucket}/{key} does not exist") from None
            raise TransportError(f"cannot read s3://{self.bucket}/{key}: {describe_s3_error(exc)}") from None
        except self._errors() as exc:
            raise TransportError(f"cannot read s3://{self.bucket}/{key}: {describe_s3_error(exc)}") from None
        body = response["Body"]
        length = int(response.get("ContentLength", -1))
        limit = max_bytes if size is None else size
        try:
            if size is not None and length != size:
                raise ProtocolError(f"object s3://{self.bucket}/{key} is {length} bytes, the claim says {size}")
            if length > max_bytes:
                raise ProtocolError(f"object s3://{self.bucket}/{key} is {length} bytes, over {max_bytes}")
            data = bytes(body.read(limit + 1))
        except self._errors() as exc:
            raise TransportError(f"cannot read s3://{self.bucket}/{key}: {describe_s3_error(exc)}") from None
        finally:
            body.close()
        if size is not None and len(data) != size:
            raise ProtocolError(f"object s3://{self.bucket}/{key} is {len(data)} bytes, the claim says {size}")
        if len(data) > max_bytes:
            raise ProtocolError(f"object s3://{self.bucket}/{key} is over {max_bytes} bytes")
        return data

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; returns how many."""
        deleted = 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
                    deleted += len(keys)
        except self._errors() as exc:
            raise TransportError(f"cannot delete s3://{self.bucket}/{prefix}*: {describe_s3_error(exc)}") from None
        return deleted


def write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def put_object(url: str, data: bytes, s3: S3Options | None = None) -> None:
    if not is_s3(url):
        write_atomic(Path(url), data)
        return
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(url)
    try:
        s3_client(s3 or S3Options()).put_object(Bucket=bucket, Key=key, Body=data)
    except (BotoCoreError, ClientError) as exc:
        raise TransportError(f"cannot write {url}: {exc}") from None


def get_object(url: str, s3: S3Options | None = None) -> bytes:
    if not is_s3(url):
        try:
            return Path(url).read_bytes()
        except OSError as exc:
            raise TransportError(f"cannot read {url}: {exc.strerror}") from None
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(url)
    try:
        return bytes(s3_client(s3 or S3Options()).get_object(Bucket=bucket, Key=key)["Body"].read())
    except (BotoCoreError, ClientError) as exc:
        raise TransportError(f"cannot read {url}: {exc}") from None
