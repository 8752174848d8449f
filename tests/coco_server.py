"""A local stand-in for ``images.cocodataset.org``, built from coco-mini (tests only).

:func:`build_site` lays out, in a folder, what the official server holds::

    annotations/annotations_trainval2017.zip   # annotations/{instances,captions}_{val,train}2017.json
    val2017/<file_name>                         # symlinks to coco-mini images (by coco_url)
    train2017/<file_name>

Both splits are served: images under ``val2017/`` (79) and ``train2017/`` (21), and one
archive with ``instances_{val,train}2017.json`` and ``captions_{val,train}2017.json``. By
default the val JSONs are coco-mini's ``instances.json``/``captions.json`` byte for byte
(they also list coco-mini's 21 train2017 images, whose ``coco_url`` points at
``train2017/``: all 100 images through ``split: val2017``); with ``merged_val=False`` they
hold only the 79 val2017 images, as on the official server, so that a ``coco-train``
projection (train JSONs: the 21 train images) is disjoint from the evaluated images. The
zip is deterministic (fixed timestamps), so its sha1 is stable.

:func:`serve` serves a folder with :class:`http.server.ThreadingHTTPServer` on
``127.0.0.1`` (free port, background thread), with single-range ``Range`` support (206/416),
a log of every request (path, Range header, status) and injectable faults per URL path:
``"503"`` (error response), ``"404"``, ``"cut"`` (send the headers, then half the body,
then close the connection). :func:`local_only` makes a test talk to it directly (no proxy)
and not sleep between retries.

:func:`coco_server` does both and yields a :class:`CocoServer`; :func:`require_coco_mini`
skips the calling test when coco-mini is absent.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import threading
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pytest

COCO_MINI_ENV = "MMN_COCO_MINI"
ARCHIVE = "annotations/annotations_trainval2017.zip"
_REPO = Path(__file__).resolve().parents[1]
_ZIP_TIME = (2017, 9, 1, 0, 0, 0)


def _candidates() -> list[Path]:
    env = os.environ.get(COCO_MINI_ENV)
    out = [Path(env)] if env else []
    out += [_REPO / "shared" / "data" / "coco-mini", _REPO.parent / "shared" / "data" / "coco-mini",
            Path("/work/shared/data/coco-mini")]  # where the development machines keep it
    return out


def coco_mini_dir() -> Path | None:
    """coco-mini's folder ($MMN_COCO_MINI, <repo>/shared/..., <repo>/../shared/...), or None."""
    for c in _candidates():
        if (c / "annotations" / "instances.json").is_file() and (c / "images").is_dir():
            return c
    return None


def require_coco_mini() -> Path:
    """coco-mini's folder, or skip the test with the places looked at."""
    d = coco_mini_dir()
    if d is None:
        pytest.skip(
            "coco-mini test data not found (looked in "
            + ", ".join(str(c) for c in _candidates())
            + f"; set ${COCO_MINI_ENV} to its folder)"
        )
    return d


FLICKR8K_ENV = "MMN_FLICKR8K"


def require_flickr8k() -> Path:
    """The Flickr8k training sample's folder (captions.csv + images/: $MMN_FLICKR8K, <repo>/shared/...,
    <repo>/../shared/...), or skip the test with the places looked at."""
    env = os.environ.get(FLICKR8K_ENV)
    places = ([Path(env)] if env else []) + [_REPO / "shared" / "data" / "flickr8k-5k",
                                             _REPO.parent / "shared" / "data" / "flickr8k-5k",
                                             Path("/work/shared/data/flickr8k-5k")]
    for c in places:
        if (c / "captions.csv").is_file() and (c / "images").is_dir():
            return c
    pytest.skip("flickr8k-5k test data not found (looked in " + ", ".join(map(str, places))
                + f"; set ${FLICKR8K_ENV} to its folder)")


def load_mini_json(kind: str, mini: Path | None = None) -> dict[str, Any]:
    """coco-mini's ``instances`` or ``captions`` JSON as a dict."""
    mini = mini or require_coco_mini()
    return json.loads((mini / "annotations" / f"{kind}.json").read_bytes())


def split_of(record: dict[str, Any]) -> str:
    """``val2017``/``train2017`` from a record's coco_url."""
    return PurePosixPath(urlparse(record["coco_url"]).path).parts[-2]


def _only_split(data: dict[str, Any], split: str) -> dict[str, Any]:
    ims = [im for im in data["images"] if split_of(im) == split]
    ids = {im["id"] for im in ims}
    return {**data, "images": ims, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@dataclass
class CocoSite:
    root: Path
    archive: Path
    sha1: str
    images: list[dict[str, Any]]  # coco-mini's image records


def build_site(
    root: Path,
    mini: Path | None = None,
    *,
    instances_bytes: bytes | None = None,
    captions_bytes: bytes | None = None,
    corrupt_images: Iterable[str] = (),
    merged_val: bool = True,
) -> CocoSite:
    """Write the official layout under ``root`` from coco-mini.

    ``instances_bytes``/``captions_bytes`` replace the val2017 JSON members (e.g. truncated
    or with a key removed); ``corrupt_images`` are file names served truncated to half;
    ``merged_val=False``: the val2017 JSONs list only val2017 images (as the real server).
    """
    mini = mini or require_coco_mini()
    root = Path(root)
    raw = {k: (mini / "annotations" / f"{k}.json").read_bytes() for k in ("instances", "captions")}
    data = {k: json.loads(v) for k, v in raw.items()}
    if not merged_val:
        raw = {k: json.dumps(_only_split(data[k], "val2017")).encode() for k in raw}
    if instances_bytes is not None:
        raw["instances"] = instances_bytes
    if captions_bytes is not None:
        raw["captions"] = captions_bytes
    members = {f"annotations/{k}_val2017.json": raw[k] for k in ("instances", "captions")}
    for k in ("instances", "captions"):
        train = _only_split(data[k], "train2017")
        members[f"annotations/{k}_train2017.json"] = json.dumps(train).encode()
    archive = root / ARCHIVE
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, payload in members.items():
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, payload)
    corrupt = set(corrupt_images)
    for rec in data["instances"]["images"]:
        src = mini / "images" / rec["file_name"]
        dst = root / split_of(rec) / rec["file_name"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rec["file_name"] in corrupt:
            body = src.read_bytes()
            dst.write_bytes(body[: len(body) // 2])
        else:
            dst.symlink_to(src.resolve())
    missing = corrupt - {r["file_name"] for r in data["instances"]["images"]}
    assert not missing, f"not coco-mini images: {sorted(missing)}"
    return CocoSite(root=root, archive=archive, sha1=_sha1(archive), images=data["instances"]["images"])


# ----------------------------------------------------------------------------- server


def local_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy for 127.0.0.1 and no backoff sleeps in :mod:`mmn.download` (call from a fixture)."""
    from mmn import download

    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(download, "BACKOFF_S", 0.0)


@dataclass
class Request:
    path: str
    range: str | None
    status: int


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[Request] = []
        self.faults: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def take_fault(self, path: str) -> str | None:
        with self._lock:
            queue = self.faults.get(path)
            return queue.pop(0) if queue else None


class RangeRequestHandler(SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler + one ``Range: bytes=a-b`` range + fault injection."""

    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers; Content-Length always sent

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        try:
            status = int(code)
        except (TypeError, ValueError):
            status = -1
        self.server.requests.append(Request(urlparse(self.path).path, self.headers.get("Range"), status))

    def send_head(self):  # type: ignore[override]
        self._remaining: int | None = None
        self._cut = False
        fault = self.server.take_fault(urlparse(self.path).path)
        if fault in ("503", "404"):
            self.send_error(int(fault), "fault injected by the test")
            return None
        self._cut = fault == "cut"
        rng = self.headers.get("Range")
        path = self.translate_path(self.path)
        m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng or "")
        if not m or not (m[1] or m[2]) or os.path.isdir(path):
            return super().send_head()  # no (usable) Range: the whole file, 200
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by do_GET
        except OSError:
            self.send_error(404, "File not found")
            return None
        size = os.fstat(f.fileno()).st_size
        if m[1]:
            start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
        else:
            start, end = max(0, size - int(m[2])), size - 1
        if start >= size or start > end:
            f.close()
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._remaining = end - start + 1
        return f

    def copyfile(self, source, outputfile) -> None:  # type: ignore[override]
        remaining = self._remaining
        if remaining is None:
            remaining = os.fstat(source.fileno()).st_size - source.tell()
        if self._cut:
            remaining //= 2
            self.close_connection = True
        while remaining > 0:
            buf = source.read(min(64 * 1024, remaining))
            if not buf:
                break
            outputfile.write(buf)
            remaining -= len(buf)
        if self._cut:
            outputfile.flush()
            with contextlib.suppress(OSError):
                self.connection.shutdown(2)  # socket.SHUT_RDWR: the client sees a short body


@contextlib.contextmanager
def serve(root: Path, port: int = 0) -> Iterator[_Server]:
    """Serve ``root`` on 127.0.0.1:``port`` (0 = a free one) in a daemon thread until the block exits."""
    handler = functools.partial(RangeRequestHandler, directory=str(root))
    httpd = _Server(("127.0.0.1", port), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@dataclass
class CocoServer:
    base_url: str
    root: Path
    sha1: str
    site: CocoSite
    httpd: _Server = field(repr=False)

    @property
    def requests(self) -> list[Request]:
        return self.httpd.requests

    @property
    def faults(self) -> dict[str, list[str]]:
        """URL path (e.g. ``/val2017/000000000139.jpg``) → faults, consumed one per request."""
        return self.httpd.faults

    def requests_for(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]


@contextlib.contextmanager
def coco_server(tmp_dir: Path, port: int = 0, **build_kwargs: Any) -> Iterator[CocoServer]:
    """Build the official layout in ``tmp_dir`` from coco-mini and serve it (see build_site) on
    127.0.0.1:``port`` (0 = a free one)."""
    site = build_site(Path(tmp_dir), **build_kwargs)
    with serve(site.root, port) as httpd:
        host, port = httpd.server_address[:2]
        yield CocoServer(f"http://{host}:{port}", site.root, site.sha1, site, httpd)


@pytest.fixture
def coco_server_factory(tmp_path: Path) -> Iterator[Any]:
    """Fixture: ``make(**build_kwargs) -> CocoServer``; all servers stop at teardown."""
    with contextlib.ExitStack() as stack:
        count = iter(range(1_000_000))

        def make(**build_kwargs: Any) -> CocoServer:
            return stack.enter_context(coco_server(tmp_path / f"site{next(count)}", **build_kwargs))

        yield make


def _main() -> None:
    """``python tests/coco_server.py DIR [--val-only] [--port N]``: build the mirror in DIR and
    serve it until Ctrl-C (for running the pipeline by hand against coco-mini)."""
    import argparse
    import time

    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("root", type=Path, help="folder to build the mirror in (created)")
    ap.add_argument("--val-only", action="store_true",
                    help="val2017 JSONs hold only the 79 val images (as the official server)")
    ap.add_argument("--port", type=int, default=0, help="0 = a free port")
    args = ap.parse_args()
    mini = coco_mini_dir()
    if mini is None:
        raise SystemExit(f"coco-mini not found (set ${COCO_MINI_ENV})")
    site = build_site(args.root, mini, merged_val=not args.val_only)
    with serve(site.root, args.port) as httpd:
        host, port = httpd.server_address[:2]
        print(f"-S data.coco.base_url='http://{host}:{port}' -S data.coco.annotations_sha1='{site.sha1}'",
              flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    _main()
