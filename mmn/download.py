"""The one HTTP downloader: resumable, retried, optionally sha1-checked.

:func:`download` writes ``dest`` through ``dest.part`` and renames it into place only when
complete, so a killed run never leaves a final-named partial file; a rerun resumes the
``.part`` with an HTTP ``Range`` request (the COCO annotations archive is ~250 MB).

Two retry layers, both bounded by ``retries``:

* connection errors and retryable statuses (:data:`RETRY_STATUS`) are retried with
  exponential backoff by urllib3 (:class:`urllib3.util.Retry` on the session's
  :class:`requests.adapters.HTTPAdapter`, see :func:`retrying_session`);
* a body cut off mid-transfer is not something urllib3 retries: the loop in
  :func:`download` resumes it from the bytes already in ``.part`` (or restarts when the
  server cannot resume), sleeping :data:`BACKOFF_S` doubled per attempt.

Every failure raises ``error`` (default :class:`DownloadError`, a
:class:`~mmn.errors.NetworkError`) naming ``what`` and the URL.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import requests
from requests.adapters import HTTPAdapter
from tqdm.auto import tqdm
from urllib3.util import Retry

from mmn.errors import NetworkError

__all__ = ["DownloadError", "download", "file_digest", "file_sha1", "file_sha256", "retrying_session"]

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
#: network read size; small, because urllib3 drops a partly read chunk when the connection breaks
STREAM_CHUNK_BYTES = 1 << 16
#: first delay between retries, doubled after each failed attempt, capped at BACKOFF_MAX_S
BACKOFF_S = 1.0
BACKOFF_MAX_S = 30.0
#: statuses urllib3 retries (timeouts, rate limits, server errors)
RETRY_STATUS = (408, 425, 429, 500, 502, 503, 504)
_CONTENT_RANGE_RE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")
_CONTENT_RANGE_UNSAT_RE = re.compile(r"^bytes\s+\*/(\d+)$")
_BODY_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)


class DownloadError(NetworkError):
    """A download that failed after its retries (or a sha1 mismatch); names the URL."""


class _Retryable(Exception):
    """A transfer cut short (or a resume the server refused): resume/restart from ``.part``."""


class _Fatal(Exception):
    """A failure that retrying will not fix (HTTP 404, or urllib3's retries are spent)."""


def retrying_session(retries: int, user_agent: str | None = None) -> requests.Session:
    """A session whose HTTP(S) adapter retries connection errors and :data:`RETRY_STATUS`
    ``retries`` times with exponential backoff (urllib3 ``Retry``; honours ``Retry-After``)."""
    retry = Retry(
        total=retries,
        backoff_factor=BACKOFF_S,
        backoff_max=BACKOFF_MAX_S,
        status_forcelist=RETRY_STATUS,
        allowed_methods=["GET"],
        raise_on_status=False,  # the last response comes back; _fetch_once names its status
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if user_agent:
        session.headers["User-Agent"] = user_agent
    return session


def file_sha1(path: Path) -> str:
    """Hex sha1 of a file, read in :data:`CHUNK_BYTES` blocks."""
    return file_digest(path, "sha1")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in :data:`CHUNK_BYTES` blocks."""
    return file_digest(path, "sha256")


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def _parse_content_range(value: str | None) -> tuple[int, int | None] | None:
    """``bytes a-b/total`` → (a, total or None)."""
    if not value:
        return None
    m = _CONTENT_RANGE_RE.match(value.strip())
    if not m:
        return None
    return int(m[1]), (None if m[3] == "*" else int(m[3]))


def _attempts(r: requests.Response) -> int:
    """How many requests urllib3 made for this response (1 + its retries)."""
    retries = getattr(r.raw, "retries", None)
    return 1 + len(retries.history) if retries is not None else 1


def _open_mode(r: requests.Response, part: Path, start: int) -> tuple[str, int, int | None] | None:
    """(file mode, first byte, expected total size) for response ``r`` to a request from byte
    ``start``; None when ``part`` was already complete. Raises _Retryable/_Fatal otherwise."""
    if r.status_code == 416 and start:
        m = _CONTENT_RANGE_UNSAT_RE.match(r.headers.get("Content-Range", "").strip())
        if m and int(m[1]) == start:
            return None  # the partial file is already complete
        part.unlink()
        raise _Retryable(f"server refused to resume at byte {start} (HTTP 416); restarting")
    if r.status_code in RETRY_STATUS:
        raise _Fatal(f"HTTP {r.status_code} {r.reason} after {_attempts(r)} attempt(s)")
    if r.status_code == 206 and start:
        cr = _parse_content_range(r.headers.get("Content-Range"))
        if cr is None or cr[0] != start:
            part.unlink()
            raise _Retryable(
                f"server answered Range bytes={start}- with "
                f"Content-Range {r.headers.get('Content-Range')!r}; restarting"
            )
        return "ab", start, cr[1]
    if r.status_code == 200:  # no resume support: start over
        cl = r.headers.get("Content-Length")
        return "wb", 0, (int(cl) if cl and cl.isdigit() else None)
    raise _Fatal(f"HTTP {r.status_code} {r.reason}")


def _fetch_once(session: requests.Session, url: str, part: Path, timeout: float, show_bar: bool) -> None:
    """One attempt at completing ``part`` from ``url``; resumes with Range when it exists."""
    start = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        r = session.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.RequestException as err:  # urllib3 already retried connection errors
        raise _Fatal(f"{type(err).__name__}: {err}") from err
    with r:
        opened = _open_mode(r, part, start)
        if opened is None:
            return
        mode, start, expected = opened
        bar = tqdm(total=expected, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=PurePosixPath(urlparse(url).path).name, leave=False, disable=not show_bar)
        try:
            with open(part, mode) as f, bar:
                for chunk in r.iter_content(STREAM_CHUNK_BYTES):
                    f.write(chunk)
                    bar.update(len(chunk))
        except _BODY_ERRORS as err:
            raise _Retryable(f"{type(err).__name__}: {err}") from err
    size = part.stat().st_size
    if expected is not None and size != expected:
        raise _Retryable(f"incomplete transfer: have {size} of {expected} bytes")


def _fetch(
    session: requests.Session, url: str, dest: Path, *, retries: int, timeout: float, what: str,
    show_bar: bool, error: Callable[[str], Exception],
) -> None:
    """Complete ``dest.part`` from ``url`` (resuming cut transfers ``retries`` times), then rename it."""
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    last: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(BACKOFF_S * 2 ** (attempt - 1), BACKOFF_MAX_S))
        try:
            _fetch_once(session, url, part, timeout, show_bar)
        except _Retryable as err:
            last = err
            log.warning("%s: attempt %d/%d of %s failed: %s", what, attempt + 1, retries + 1, url, err)
            continue
        except _Fatal as err:
            raise error(f"{what}: cannot download {url}: {err}") from None
        os.replace(part, dest)
        return
    raise error(f"{what}: download of {url} failed after {retries + 1} attempt(s): {last}")


def download(
    url: str,
    dest: Path,
    *,
    retries: int,
    timeout: float,
    what: str,
    sha1: str | None = None,
    show_bar: bool = False,
    session: requests.Session | None = None,
    error: Callable[[str], Exception] = DownloadError,
) -> Path:
    """Download ``url`` to ``dest`` unless a good copy is there; return ``dest``.

    A ``dest`` that exists is kept when ``sha1`` is None or matches, else fetched again.
    ``session``: reuse one (build it with :func:`retrying_session`, or it has no urllib3
    retries); None = a fresh :func:`retrying_session`. ``sha1``: checked after the download;
    a mismatch deletes the file and raises ``error``. ``timeout``: seconds per connect/read.
    """
    dest = Path(dest)
    expected = sha1.lower() if sha1 else None
    if dest.exists():
        digest = file_sha1(dest) if expected else None
        if digest == expected:
            log.info("using cached %s%s", dest, f" (sha1 {digest})" if digest else "")
            return dest
        log.warning("cached %s has sha1 %s, expected %s: downloading it again", dest, digest, expected)
        dest.unlink()
    kw = dict(retries=retries, timeout=timeout, what=what, show_bar=show_bar, error=error)
    if session is None:
        with retrying_session(retries) as own:
            _fetch(own, url, dest, **kw)
    else:
        _fetch(session, url, dest, **kw)
    if expected is not None:
        digest = file_sha1(dest)
        if digest != expected:
            dest.unlink()
            raise error(f"sha1 mismatch for {url}: expected {expected}, got {digest}; "
                        f"the downloaded file was deleted (it was {dest})")
    return dest
