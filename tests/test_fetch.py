"""`mistnet fetch`: verified installs from a local copy (--from) and downloads from a local HTTP server
standing in for the official locations (MISTNET_FETCH_BASE_URL); nothing is fetched from outside."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mistnet.cli import main
from mistnet.fetch import ASSETS
from mistnet.flags import find_default

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "weights" / "yolov5n.pt"
COCO128 = SHARED / "data" / "coco128"


def zip_dataset(out: Path, images: int | None = None, extra: dict[str, bytes] | None = None) -> Path:
    """COCO128 zipped as the official coco128.zip lays it out (``coco128/images/train2017/...``)."""
    files = sorted((COCO128 / "images").rglob("*.jpg"))[:images]
    with zipfile.ZipFile(out, "w") as archive:
        for image in files:
            label = COCO128 / "labels" / image.parent.name / f"{image.stem}.txt"
            archive.write(image, f"coco128/images/{image.parent.name}/{image.name}")
            if label.exists():
                archive.write(label, f"coco128/labels/{image.parent.name}/{label.name}")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return out


@pytest.fixture(scope="module")
def coco128_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return zip_dataset(tmp_path_factory.mktemp("zip") / "coco128.zip")


class Mirror:
    def __init__(self, root: Path, url: str, requests: list[str]) -> None:
        self.root, self.url, self.requests = root, url, requests


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Mirror]:
    """An HTTP server on loopback serving tmp_path/mirror, set as MISTNET_FETCH_BASE_URL."""
    root = tmp_path / "mirror"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/releases"
    monkeypatch.setenv("MISTNET_FETCH_BASE_URL", url)
    (root / "releases").mkdir()
    try:
        yield Mirror(root / "releases", url, requests)
    finally:
        server.shutdown()
        server.server_close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_from_a_local_copy_verifies_and_installs(tmp_path, capsys):
    assert main(["fetch", "yolov5n", "--from", str(WEIGHTS), "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr()
    installed = tmp_path / "weights" / "yolov5n.pt"
    assert out.out.strip() == str(installed) and sha256(installed) == ASSETS["yolov5n"].sha256
    assert "size and sha256 checked" in out.err and f"--model {installed}" in out.err
    assert main(["fetch", "yolov5n", "--dir", str(tmp_path)]) == 0  # intact: no download
    assert "already installed" in capsys.readouterr().err


def test_a_wrong_local_copy_is_refused(tmp_path, capsys):
    assert main(["fetch", "yolov5s", "--from", str(WEIGHTS), "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "4,062,133 bytes; the official yolov5s is 14,808,437 bytes" in err and err.count("\n") == 2
    tampered = tmp_path / "yolov5n.pt"
    data = bytearray(WEIGHTS.read_bytes())
    data[1000] ^= 1
    tampered.write_bytes(bytes(data))
    assert main(["fetch", "yolov5n", "--from", str(tampered), "--dir", str(tmp_path)]) == 2
    assert f"has sha256 {hashlib.sha256(data).hexdigest()}" in capsys.readouterr().err
    assert not (tmp_path / "weights").exists() and [p.name for p in tmp_path.iterdir()] == ["yolov5n.pt"]


def test_download_installs_where_the_demo_looks(tmp_path, monkeypatch, mirror, coco128_zip, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MISTNET_CACHE", str(cache))
    shutil.copy(WEIGHTS, mirror.root / "yolov5n.pt")
    shutil.copy(coco128_zip, mirror.root / "coco128.zip")
    assert main(["fetch", "yolov5n"]) == 0
    assert main(["fetch", "coco128"]) == 0
    assert mirror.requests == ["/releases/yolov5n.pt", "/releases/coco128.zip"]
    out = capsys.readouterr()
    data = cache / "data" / "coco128"
    assert out.out.split() == [str(cache / "weights" / "yolov5n.pt"), str(data)]
    assert f"sha256 {sha256(coco128_zip)}" in out.err and "128 images checked" in out.err
    assert sha256(cache / "weights" / "yolov5n.pt") == ASSETS["yolov5n"].sha256
    images = sorted(p.relative_to(data) for p in (data / "images").rglob("*.jpg"))
    assert images == sorted(p.relative_to(COCO128) for p in (COCO128 / "images").rglob("*.jpg"))
    label = next((COCO128 / "labels" / "train2017").iterdir())
    assert (data / "labels" / "train2017" / label.name).read_bytes() == label.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == ["data", "weights"]  # no partial downloads left behind
    # without ../shared, the scenario's defaults are the fetched copies
    assert find_default(tmp_path / "no-shared", "coco128") == data
    assert find_default(tmp_path / "no-shared.pt", "yolov5n") == cache / "weights" / "yolov5n.pt"
    assert find_default(COCO128, "coco128") == COCO128


def test_a_bad_download_installs_nothing(tmp_path, monkeypatch, mirror, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MISTNET_CACHE", str(cache))
    (mirror.root / "yolov5s.pt").write_bytes(b"<html>not found</html>")
    assert main(["fetch", "yolov5s"]) == 2
    assert "is 22 bytes; the official yolov5s is 14,808,437 bytes" in capsys.readouterr().err
    assert main(["fetch", "yolov5n"]) == 2  # not on the mirror: 404
    err = capsys.readouterr().err
    assert f"cannot download {mirror.url}/yolov5n.pt" in err and "--from FILE" in err and "Traceback" not in err
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize(
    ("images", "extra", "message"),
    [
        (3, None, "holds 3 images, not 128"),
        (None, {"../escape.txt": b"x"}, "unsafe member '../escape.txt'"),
        (None, {"/etc/evil": b"x"}, "unsafe member '/etc/evil'"),
    ],
)
def test_a_bad_archive_is_refused(tmp_path, capsys, images, extra, message):
    archive = zip_dataset(tmp_path / "coco128.zip", images, extra)
    assert main(["fetch", "coco128", "--from", str(archive), "--dir", str(tmp_path / "cache")]) == 2
    assert message in capsys.readouterr().err
    assert list((tmp_path / "cache").iterdir()) == []
    assert not (tmp_path / "escape.txt").exists()


def test_demo_names_the_fetch_command_when_data_is_missing(tmp_path, capsys):
    args = ["demo", "--scenario", "coco128", "--workdir", str(tmp_path / "w")]
    assert main([*args, "--data", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert f"COCO128 not found at {tmp_path / 'none'}: run `mistnet fetch coco128`" in err and "Traceback" not in err
    assert main([*args, "--model", str(tmp_path / "none.pt")]) == 2
    assert "weights not found" in (err := capsys.readouterr().err) and "`mistnet fetch yolov5n`" in err
