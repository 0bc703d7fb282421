"""Where checkpoints and large objects go: a local path or ``s3://bucket/key`` through boto3.

S3 failures are reported, never papered over by writing somewhere else.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from common.errors import TransportError


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


def s3_client(options: S3Options) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=options.endpoint_url,
        aws_access_key_id=options.access_key,
        aws_secret_access_key=options.secret_key,
        region_name=options.region or "us-east-1",
        config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=30),
    )


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
