"""The data and weights of the COCO128 scenario for a machine without ``../shared``: downloaded from
their official locations (or taken from a local copy), checked, and installed into a cache where the
commands find them by default.

The cache is ``$MISTNET_CACHE``, else ``$XDG_CACHE_HOME/mistnet``, else ``~/.cache/mistnet``;
``data/coco128`` holds the dataset (YOLO layout), ``weights/NAME.pt`` the checkpoints.
``MISTNET_FETCH_BASE_URL`` replaces each asset's official location by ``BASE/FILE_NAME`` (a mirror,
or the tests' local HTTP server).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from common.errors import MistnetError

CACHE_ENV = "MISTNET_CACHE"
BASE_URL_ENV = "MISTNET_FETCH_BASE_URL"
RELEASE = "https://github.com/ultralytics/yolov5/releases/download/v7.0"
CHUNK = 1 << 20
MAX_DOWNLOAD = 512 << 20  # bound for an asset of unknown size: coco128.zip is about 7 MB
MAX_UNPACKED = 256 << 20  # a zip expanding beyond this is refused (zip bomb)


class FetchError(MistnetError):
    """An asset could not be downloaded, or what arrived is not what was asked for."""


@dataclass(frozen=True)
class Asset:
    name: str
    url: str  # the official location
    target: str  # where it goes, relative to the cache
    size: int | None = None  # bytes, where known
    sha256: str | None = None  # where known
    images: int | None = None  # a zipped YOLO dataset: the number of images it must hold


# Sizes and digests of the official v7.0 release assets (yolov5n's is also that of ../shared/weights).
# Nobody publishes a digest of coco128.zip: its contents are checked instead (128 images, labels).
ASSETS = {
    "coco128": Asset("coco128", "https://ultralytics.com/assets/coco128.zip", "data/coco128", images=128),
    "yolov5n": Asset(
        "yolov5n",
        f"{RELEASE}/yolov5n.pt",
        "weights/yolov5n.pt",
        4_062_133,
        "4f180cf23ba0717ada0badd6c685026d73d48f184d00fc159c2641284b2ac0a3",
    ),
    "yolov5s": Asset(
        "yolov5s",
        f"{RELEASE}/yolov5s.pt",
        "weights/yolov5s.pt",
        14_808_437,
        "8b3b748c1e592ddd8868022e8732fde20025197328490623cc16c6f24d0782ee",
    ),
}


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mistnet"


def installed_path(name: str, root: Path | None = None) -> Path:
    """Where ``mistnet fetch NAME`` puts the asset (whether or not it is there yet)."""
    return (root or cache_dir()) / ASSETS[name].target


def source_url(asset: Asset) -> str:
    base = os.environ.get(BASE_URL_ENV)
    return f"{base.rstrip('/')}/{asset.url.rsplit('/', 1)[1]}" if base else asset.url


# download ----------------------------------------------------------------------------------------


def download(url: str, dest: Path, size: int | None) -> None:
    """``url`` streamed into ``dest``, with a progress bar on a terminal; bounded by ``size`` (or
    MAX_DOWNLOAD when unknown), so a wrong or hostile server cannot fill the disk."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    limit = size or MAX_DOWNLOAD
    try:
        with urllib.request.urlopen(url, timeout=60) as response, dest.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or size
            console = Console(stderr=True)
            columns = (TextColumn(dest.name.removeprefix(".partial-")), BarColumn(), DownloadColumn(),
                       TransferSpeedColumn())
            with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
                task = bar.add_task("download", total=total)
                written = 0
                while chunk := response.read(CHUNK):
                    written += len(chunk)
                    if written > limit:
                        raise FetchError(f"{url} sent more than the expected {limit:,} bytes")
                    out.write(chunk)
                    bar.advance(task, len(chunk))
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise FetchError(
            f"cannot download {url}: {reason}; download it on another machine and install it with --from FILE"
        ) from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(asset: Asset, path: Path) -> str:
    """The file's sha256, after checking its size and digest where they are known."""
    size = path.stat().st_size
    if asset.size is not None and size != asset.size:
        raise FetchError(f"{path} is {size:,} bytes; the official {asset.name} is {asset.size:,} bytes")
    digest = sha256_of(path)
    if asset.sha256 is not None and digest != asset.sha256:
        raise FetchError(f"{path} has sha256 {digest}; the official {asset.name} has {asset.sha256}")
    return digest


# install -----------------------------------------------------------------------------------------


def check_archive(archive: zipfile.ZipFile, name: str) -> None:
    """Refuses members that would land outside the target (absolute paths, ``..``, links) and archives
    that expand beyond MAX_UNPACKED."""
    total = 0
    for info in archive.infolist():
        member = PurePosixPath(info.filename)
        if member.is_absolute() or ".." in member.parts or stat.S_ISLNK(info.external_attr >> 16):
            raise FetchError(f"{name} holds an unsafe member {info.filename!r}; refusing to unpack it")
        total += info.file_size
    if total > MAX_UNPACKED:
        raise FetchError(f"{name} would unpack to {total:,} bytes, more than the {MAX_UNPACKED:,} allowed")


def dataset_root(folder: Path, asset: Asset) -> Path:
    """The unpacked folder holding ``images/`` and ``labels/``, checked to hold ``asset.images`` images."""
    roots = [p for p in (folder, *folder.iterdir()) if (p / "images").is_dir() and (p / "labels").is_dir()]
    if len(roots) != 1:
        raise FetchError(f"the {asset.name} archive holds no single folder with images/ and labels/")
    images = [p for p in (roots[0] / "images").rglob("*.jpg") if p.is_file()]
    if asset.images is not None and len(images) != asset.images:
        raise FetchError(f"the {asset.name} archive holds {len(images)} images, not {asset.images}")
    return roots[0]


def unpack(asset: Asset, archive_path: Path, work: Path) -> Path:
    try:
        with zipfile.ZipFile(archive_path) as archive:
            check_archive(archive, archive_path.name)
            archive.extractall(work / "unpacked")
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{archive_path} is not a zip archive ({exc})") from None
    return dataset_root(work / "unpacked", asset)


def replace(source: Path, target: Path) -> None:
    """Moves ``source`` to ``target``, replacing an earlier install only once the new one is complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(f".old-{target.name}")
    if target.exists():
        target.rename(old)
    source.rename(target)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


def fetch(name: str, root: Path | None = None, local: Path | None = None) -> tuple[Path, str]:
    """Downloads asset ``name`` (or takes ``local``), verifies it and installs it under ``root``
    (default: the cache); returns the installed path and the sha256 of what was downloaded."""
    asset = ASSETS[name]
    root = root or cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".fetch-{name}-", dir=root) as tmp:
        work = Path(tmp)
        if local is None:
            source = work / f".partial-{asset.url.rsplit('/', 1)[1]}"
            download(source_url(asset), source, asset.size)
        elif not local.is_file():
            raise FetchError(f"--from {local}: no such file")
        else:
            source = local
        digest = verify(asset, source)
        if asset.images is not None:
            built = unpack(asset, source, work)
        else:
            built = work / "file"
            shutil.copyfile(source, built)
        target = root / asset.target
        replace(built, target)
    return target, digest


def is_installed(name: str, root: Path | None = None) -> bool:
    """True when the asset is already in place and (where a digest is known) intact."""
    asset, path = ASSETS[name], installed_path(name, root)
    if asset.images is not None:
        return path.is_dir() and sum(1 for _ in (path / "images").rglob("*.jpg")) == asset.images
    try:
        return path.is_file() and verify(asset, path) is not None
    except FetchError:
        return False
