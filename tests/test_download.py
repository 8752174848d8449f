"""mmn.download.download (and the load_projection checkpoint fetch built on it) against a
local server bound to 127.0.0.1 (tests/coco_server.py's ``serve``: Range support and
injectable faults). No other connection is opened; no coco-mini needed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from mmn import download as download_mod
from mmn.download import DownloadError, download, retrying_session
from mmn.errors import NetworkError

try:
    from coco_server import local_only, serve
except ImportError:  # pragma: no cover
    from tests.coco_server import local_only, serve  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(60)

BODY = os.urandom(300_000)  # several 64 KiB chunks, so a cut transfer leaves a partial file


@pytest.fixture(autouse=True)
def _local_only(monkeypatch: pytest.MonkeyPatch) -> None:
    local_only(monkeypatch)


@pytest.fixture
def site(tmp_path: Path):
    root = tmp_path / "site"
    (root / "ckpt").mkdir(parents=True)
    (root / "ckpt" / "proj.ckpt").write_bytes(BODY)
    with serve(root) as httpd:
        host, port = httpd.server_address[:2]
        yield httpd, f"http://{host}:{port}/ckpt/proj.ckpt"


def _statuses(httpd, path: str = "/ckpt/proj.ckpt") -> list[int]:
    return [r.status for r in httpd.requests if r.path == path]


def test_status_retries_are_urllib3s_and_cut_bodies_resume(site, tmp_path: Path) -> None:
    """503s are retried inside the session (urllib3 Retry); a body cut off mid-way is resumed
    with a Range request from the bytes already in .part."""
    httpd, url = site
    httpd.faults["/ckpt/proj.ckpt"] = ["503", "503", "cut"]
    dest = tmp_path / "out" / "proj.ckpt"
    assert download(url, dest, retries=2, timeout=10, what="test file") == dest
    assert _statuses(httpd) == [503, 503, 200, 206]
    start = int(httpd.requests[-1].range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= len(BODY) // 2  # resumed from what arrived (urllib3 drops a partial chunk)
    assert dest.read_bytes() == BODY and not dest.with_name("proj.ckpt.part").exists()


def test_spent_status_retries_raise_naming_url_and_attempts(site, tmp_path: Path) -> None:
    httpd, url = site
    httpd.faults["/ckpt/proj.ckpt"] = ["503"] * 3
    with pytest.raises(DownloadError, match=r"test file: cannot download .*proj\.ckpt: HTTP 503 .*3 attempt\(s\)"):
        download(url, tmp_path / "proj.ckpt", retries=2, timeout=10, what="test file")
    assert _statuses(httpd) == [503, 503, 503] and not (tmp_path / "proj.ckpt").exists()


def test_sha1_is_checked_and_a_good_cached_copy_is_kept(site, tmp_path: Path) -> None:
    httpd, url = site
    good = hashlib.sha1(BODY).hexdigest()
    dest = tmp_path / "proj.ckpt"
    with pytest.raises(DownloadError, match=f"sha1 mismatch for {url}: expected {'0' * 40}, got {good}"):
        download(url, dest, retries=0, timeout=10, what="x", sha1="0" * 40)
    assert not dest.exists()
    download(url, dest, retries=0, timeout=10, what="x", sha1=good.upper())
    n = len(httpd.requests)
    download(url, dest, retries=0, timeout=10, what="x", sha1=good)
    assert len(httpd.requests) == n, "a verified cached copy was downloaded again"
    dest.write_bytes(b"stale")
    download(url, dest, retries=0, timeout=10, what="x", sha1=good)
    assert dest.read_bytes() == BODY and len(httpd.requests) == n + 1


def test_status_retries_back_off_exponentially(site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib3's backoff from BACKOFF_S: no wait before the first retry, then BACKOFF_S * 2**(n-1)."""
    import time

    httpd, url = site
    sleeps: list[float] = []
    monkeypatch.setattr(download_mod, "BACKOFF_S", 0.5)
    monkeypatch.setattr(time, "sleep", sleeps.append)
    httpd.faults["/ckpt/proj.ckpt"] = ["503"] * 3
    with retrying_session(3, user_agent="mmn-test") as session:
        download(url, tmp_path / "proj.ckpt", retries=3, timeout=10, what="x", session=session)
    assert _statuses(httpd) == [503, 503, 503, 200] and sleeps == [1.0, 2.0]
    assert (tmp_path / "proj.ckpt").read_bytes() == BODY


def test_load_projection_fetches_the_checkpoint_once_into_the_cache(site, tmp_path: Path) -> None:
    """The LiMBeR checkpoint goes through mmn.download: a cut transfer is resumed, the file lands
    at cache/<sha1(url)[:12]>/<name>, a second call reads the cache, a 404 is a NetworkError."""
    from mmn.limber import fetch_checkpoint

    httpd, url = site
    httpd.faults["/ckpt/proj.ckpt"] = ["cut"]
    path = fetch_checkpoint(url, tmp_path / "cache")
    assert path == tmp_path / "cache" / hashlib.sha1(url.encode()).hexdigest()[:12] / "proj.ckpt"
    assert path.read_bytes() == BODY and _statuses(httpd) == [200, 206]
    assert fetch_checkpoint(url, tmp_path / "cache") == path and len(httpd.requests) == 2
    missing = url.replace("proj.ckpt", "nope.ckpt")
    with pytest.raises(NetworkError, match=r"LiMBeR checkpoint: cannot download .*nope\.ckpt: HTTP 404"):
        fetch_checkpoint(missing, tmp_path / "cache")
    assert len([r for r in httpd.requests if r.path.endswith("nope.ckpt")]) == 1  # 404 is not retried
