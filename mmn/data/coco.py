"""Download COCO 2017 from its official layout, verify it, and write a seeded subset.

The official site serves (``base_url`` = ``http://images.cocodataset.org``):

* ``{base_url}/annotations/annotations_trainval2017.zip`` (~253 MB), which holds
  ``annotations/instances_{val,train}2017.json``, ``annotations/captions_{val,train}2017.json``
  and the keypoint files;
* ``{base_url}/{split}/{file_name}`` for every image, ``split`` being ``val2017`` or
  ``train2017``. An image record's ``coco_url`` names its split; it is used when present
  (so merged files such as coco-mini, which mixes val and train images, work), else
  ``cfg.split``.

:func:`download_coco` fetches the archive (resumable, sha1-checked, retried: all downloads
go through :func:`mmn.download.download`), reads only the two JSON files of ``cfg.split`` straight out of the zip (nothing else is extracted), picks all
images or a seeded subset (optionally narrowed by ``restrict``, e.g. to one part of the
train/eval split of :mod:`mmn.data.split`), fetches those images one by one (resumable,
each one decoded and checked against its record), and writes::

    out_dir/images/<file_name>
    out_dir/annotations/instances.json   # info, licenses, categories + chosen images/annotations
    out_dir/annotations/captions.json    # info, licenses + chosen images/captions

Gotchas:

* Everything is built in a temporary directory beside ``out_dir`` and renamed into place
  (:func:`mmn.io.atomic_dir`), so ``out_dir`` is either the previous complete result or the
  new complete result. An existing ``out_dir`` is replaced as a whole (no stale images survive).
* Downloads are cached under ``cache_dir`` (default ``out_dir.parent/.coco_cache``), one
  sub-folder per ``base_url``; partial files end in ``.part`` and are resumed with HTTP
  ``Range`` requests. A rerun after an interruption therefore only fetches what is missing.
  Cached images are re-verified (decoded) on every run.
* The whole JSON of ``cfg.split`` is parsed in memory: fine for val2017 (25 MB); the
  train2017 instances file (448 MB) needs a few GB of RAM.
* Every failure raises :class:`CocoDownloadError` naming the file/URL (and image id) at fault.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import shutil
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
import requests
from PIL import Image, ImageFile
from tqdm.auto import tqdm

from mmn.data.coco_format import check_coco_structure
from mmn.data.layout import write_skipped
from mmn.download import DownloadError, download, file_sha1, retrying_session
from mmn.io import atomic_dir
from mmn.params import CocoParams

__all__ = [
    "CocoDownloadError",
    "archive_cache_path",
    "download_coco",
    "image_split",
    "select_image_ids",
    "site_cache_dir",
    "write_layout",
]

log = logging.getLogger(__name__)

_SPLIT_RE = re.compile(r"^(train|val|test|unlabeled)20\d\d$")


class CocoDownloadError(DownloadError):
    """A COCO download/verification failure; the message names the file, URL or image id."""


# ----------------------------------------------------------------------------- paths


def site_cache_dir(base_url: str, cache_dir: Path) -> Path:
    """Cache folder of one server: ``cache_dir/<host>-<8 hex of sha1(base_url)>``."""
    base = base_url.rstrip("/")
    host = re.sub(r"[^A-Za-z0-9.-]+", "_", urlparse(base).netloc or "local")
    return Path(cache_dir) / f"{host}-{hashlib.sha1(base.encode()).hexdigest()[:8]}"


def archive_cache_path(cfg: CocoParams, cache_dir: Path) -> Path:
    """Where the annotations archive is cached (its partial download is this + ``.part``)."""
    rel = PurePosixPath(cfg.annotations_archive.lstrip("/"))
    return site_cache_dir(cfg.base_url, cache_dir) / Path(*rel.parts)


def image_split(record: dict[str, Any], default: str) -> str:
    """The split folder of an image record: from its ``coco_url`` path when present."""
    url = record.get("coco_url")
    if isinstance(url, str) and url:
        parts = PurePosixPath(urlparse(url).path).parts
        if len(parts) >= 2 and _SPLIT_RE.match(parts[-2]):
            return parts[-2]
    return default


def select_image_ids(ids: Iterable[int], subset: int, seed: int) -> list[int]:
    """All ids (sorted) when ``subset`` is 0 or ≥ their number, else a seeded sample.

    The sample is ``numpy.random.default_rng(seed).choice`` over the *sorted* ids without
    replacement, returned sorted: it depends only on the id set, ``subset`` and ``seed``.
    """
    pool = sorted({int(i) for i in ids})
    if subset <= 0 or subset >= len(pool):
        return pool
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(pool), size=subset, replace=False)
    return sorted(pool[int(i)] for i in picked)


# ----------------------------------------------------------------------------- archive + JSON


def _get_archive(
    session: requests.Session, cfg: CocoParams, url: str, dest: Path, show_bar: bool
) -> str:
    """Make sure ``dest`` holds the verified archive (cached or downloaded); return its sha1."""
    expected = cfg.annotations_sha1.lower() if cfg.annotations_sha1 else None
    download(url, dest, retries=cfg.retries, timeout=cfg.timeout_s, what="annotations archive",
             sha1=expected, show_bar=show_bar, session=session, error=CocoDownloadError)
    return expected or file_sha1(dest)


def _read_member(zf: zipfile.ZipFile, name: str, label: str, kind: str) -> dict[str, Any]:
    try:
        info = zf.getinfo(name)
    except KeyError:
        members = [n for n in zf.namelist() if n.endswith(".json")]
        raise CocoDownloadError(
            f"{label}: no such member in the archive (its JSON members: {members})"
        ) from None
    try:
        with zf.open(info) as f:  # streamed out of the zip; nothing is extracted to disk
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise CocoDownloadError(
            f"{label}: not valid JSON (truncated or corrupt?): {err.msg} at line {err.lineno} "
            f"column {err.colno} (char {err.pos} of {info.file_size} bytes)"
        ) from None
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as err:
        raise CocoDownloadError(f"{label}: cannot read it from the archive: {err}") from None
    check_coco_structure(data, label, kind, error=CocoDownloadError, strict=True)
    return data


def _read_annotations(
    archive: Path, url: str, split: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        archive.unlink(missing_ok=True)
        raise CocoDownloadError(
            f"{url}: not a valid zip archive ({err}); deleted the cached copy {archive} "
            "so that a rerun downloads it again"
        ) from None
    with zf:
        out = []
        for kind in ("instances", "captions"):
            name = f"annotations/{kind}_{split}.json"
            out.append(_read_member(zf, name, f"{name} in {url}", kind))
    return out[0], out[1]


# ----------------------------------------------------------------------------- images


@contextlib.contextmanager
def _strict_pil() -> Iterator[None]:
    """Truncated images must fail to decode even if some library relaxed PIL globally."""
    prev = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = prev


def _image_problem(path: Path, record: dict[str, Any]) -> str | None:
    """None when ``path`` decodes fully with the record's width/height, else why not."""
    try:
        with _strict_pil(), Image.open(path) as im:
            im.load()
            size = im.size
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...
        return f"does not decode ({type(err).__name__}: {err})"
    want = (record["width"], record["height"])
    if size != want:
        return f"is {size[0]}x{size[1]}, the record says {want[0]}x{want[1]}"
    return None


def _get_image(
    session: requests.Session, cfg: CocoParams, record: dict[str, Any], url: str, dest: Path
) -> bool:
    """Ensure ``dest`` is a valid copy of the image; return True when it was downloaded."""
    if dest.exists():
        if _image_problem(dest, record) is None:
            return False
        log.warning("cached %s is invalid; downloading it again", dest)
        dest.unlink()
    what = f"image id {record['id']} ({record['file_name']})"
    problem = None
    for attempt in range(2):  # a corrupt file is downloaded again once, then we give up
        download(url, dest, retries=cfg.retries, timeout=cfg.timeout_s, what=what, session=session,
                 error=CocoDownloadError)
        problem = _image_problem(dest, record)
        if problem is None:
            return True
        dest.unlink()
        log.warning("%s from %s %s (attempt %d of 2)", what, url, problem, attempt + 1)
    raise CocoDownloadError(f"{what}: the file downloaded from {url} {problem} (tried twice)")


# ----------------------------------------------------------------------------- output


def _subset_json(data: dict[str, Any], images: list[dict[str, Any]], ids: set[int]) -> dict[str, Any]:
    """Same top-level keys (info, licenses, categories, ...), chosen images and their annotations."""
    out = dict(data)
    out["images"] = images
    out["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    return out


def _write_json(obj: Any, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))


def _check_loads_in_pycocotools(path: Path) -> None:
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            COCO(str(path))
    except Exception as err:
        raise CocoDownloadError(f"{path}: pycocotools cannot load the written file: {err}") from err


def write_layout(
    out_dir: Path,
    sources: list[tuple[dict[str, Any], Path]],
    instances: dict[str, Any],
    captions: dict[str, Any],
    skipped: list[dict[str, Any]],
) -> None:
    """Write images, both JSON files (checked in pycocotools) and skipped.csv; ``out_dir`` is
    replaced atomically (:func:`mmn.io.atomic_dir`)."""
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        (tmp / "annotations").mkdir()
        for rec, src in sources:
            shutil.copyfile(src, tmp / "images" / rec["file_name"])
        _write_json(instances, tmp / "annotations" / "instances.json")
        _write_json(captions, tmp / "annotations" / "captions.json")
        _check_loads_in_pycocotools(tmp / "annotations" / "instances.json")
        _check_loads_in_pycocotools(tmp / "annotations" / "captions.json")
        write_skipped(skipped, tmp)


def _choose_ids(
    cfg: CocoParams,
    by_id: dict[int, dict[str, Any]],
    seed: int,
    restrict: Callable[[list[int]], list[int]] | None,
    archive_url: str,
) -> tuple[list[int], int]:
    """The image ids to fetch (seeded subset, then ``restrict``) and how many the subset chose."""
    chosen_ids = select_image_ids(by_id, cfg.subset, seed)
    if cfg.subset and cfg.subset > len(by_id):
        log.warning("subset %d > %d images in %s: taking all of them", cfg.subset, len(by_id), cfg.split)
    n_pool = len(chosen_ids)
    if restrict is not None:
        kept = sorted({int(i) for i in restrict(list(chosen_ids))})
        foreign = sorted(set(kept) - set(chosen_ids))
        if foreign:
            raise ValueError(f"restrict returned ids that were not chosen: {foreign[:10]}")
        chosen_ids = kept
    names = [by_id[i]["file_name"] for i in chosen_ids]
    if len(set(names)) != len(names):
        raise CocoDownloadError(f"annotations/instances_{cfg.split}.json in {archive_url}: "
                                "several chosen images share a file_name")
    return chosen_ids, n_pool


def _fetch_images(
    session: requests.Session,
    cfg: CocoParams,
    records: list[dict[str, Any]],
    site: Path,
    on_bad_image: Literal["fail", "skip"],
    progress: bool,
) -> tuple[list[tuple[dict[str, Any], Path]], list[dict[str, Any]], int]:
    """Fetch (or find cached) every image of ``records``: ``(record, cached file)`` pairs, the
    skipped rows (``on_bad_image: skip``) and how many were downloaded this run."""
    base = cfg.base_url.rstrip("/")
    sources: list[tuple[dict[str, Any], Path]] = []
    skipped: list[dict[str, Any]] = []
    n_fetched = 0
    with tqdm(total=len(records), desc="COCO images", unit="img", disable=not progress) as bar:
        for rec in records:
            split = image_split(rec, cfg.split)
            dest = site / split / rec["file_name"]
            try:
                n_fetched += _get_image(session, cfg, rec, f"{base}/{split}/{rec['file_name']}", dest)
            except CocoDownloadError as err:
                if on_bad_image == "fail":
                    raise
                log.warning("skipping %s", err)
                skipped.append({"image_id": rec["id"], "file_name": rec["file_name"], "reason": str(err)})
            else:
                sources.append((rec, dest))
            bar.update(1)
    if skipped and not sources:
        raise CocoDownloadError(f"none of the {len(records)} chosen images could be fetched; first problem: "
                                f"{skipped[0]['reason']}")
    return sources, skipped, n_fetched


def _subset_both(
    instances: dict[str, Any], captions: dict[str, Any], ids: set[int]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """instances and captions narrowed to ``ids``; records keep the order of the source file."""
    chosen_images = [im for im in instances["images"] if im["id"] in ids]
    cap_by_id = {im["id"]: im for im in captions["images"]}
    cap_images = [cap_by_id.get(im["id"], im) for im in chosen_images]
    return _subset_json(instances, chosen_images, ids), _subset_json(captions, cap_images, ids)


# ----------------------------------------------------------------------------- entry point


def download_coco(
    cfg: CocoParams,
    out_dir: Path,
    seed: int,
    cache_dir: Path | None = None,
    progress: bool = True,
    on_bad_image: Literal["fail", "skip"] = "fail",
    restrict: Callable[[list[int]], list[int]] | None = None,
) -> dict[str, Any]:
    """Fetch, verify and write COCO images + instances + captions (all, or a seeded subset).

    Args:
        cfg: ``data.coco`` of params.yaml (base URL, split, archive path and sha1, subset
            size, timeout, retries).
        out_dir: result folder (``images/``, ``annotations/instances.json``,
            ``annotations/captions.json``); replaced atomically.
        seed: seed of the subset choice (see :func:`select_image_ids`).
        cache_dir: download cache; default ``out_dir.parent / ".coco_cache"``.
        progress: show tqdm bars (archive bytes, image count).
        on_bad_image: ``fail``: an image that cannot be downloaded (after the retries)
            or decoded raises; ``skip``: it is left out of the layout (images and
            annotations) and recorded in ``skipped.csv`` with the reason.
        restrict: maps the chosen ids (after the subset) to the ids actually fetched,
            e.g. one part of :func:`mmn.data.split.split_ids`; it must return a subset of
            its input. None = all chosen ids.

    Returns:
        ``n_images``, ``n_instances``, ``n_captions``, ``archive_sha1`` (actual sha1 of the
        archive), plus ``split``, ``seed``, ``subset``, ``base_url``, ``n_available``
        (images in the split's JSON), ``n_pool`` (chosen before ``restrict``),
        ``n_fetched``/``n_cached`` (images downloaded this run / found valid in the cache).

    Raises:
        CocoDownloadError: any download, checksum, JSON or image problem; the message names
            the URL/file (and image id). ``out_dir`` is left as it was.
    """
    out_dir = Path(out_dir).absolute()
    cache_root = Path(cache_dir) if cache_dir is not None else out_dir.parent / ".coco_cache"
    archive_url = f"{cfg.base_url.rstrip('/')}/{cfg.annotations_archive.lstrip('/')}"
    archive = archive_cache_path(cfg, cache_root)

    with retrying_session(cfg.retries, user_agent="mmn-coco-download/0.1") as session:
        digest = _get_archive(session, cfg, archive_url, archive, show_bar=progress)
        instances, captions = _read_annotations(archive, archive_url, cfg.split)
        by_id = {im["id"]: im for im in instances["images"]}
        chosen_ids, n_pool = _choose_ids(cfg, by_id, seed, restrict, archive_url)
        sources, skipped, n_fetched = _fetch_images(
            session, cfg, [by_id[i] for i in chosen_ids], site_cache_dir(cfg.base_url, cache_root),
            on_bad_image, progress,
        )
    chosen_set = set(chosen_ids) - {r["image_id"] for r in skipped}
    chosen_ids = [i for i in chosen_ids if i in chosen_set]
    out_instances, out_captions = _subset_both(instances, captions, chosen_set)
    write_layout(out_dir, sources, out_instances, out_captions, skipped)

    summary = {
        "n_images": len(chosen_ids),
        "n_instances": len(out_instances["annotations"]),
        "n_captions": len(out_captions["annotations"]),
        "archive_sha1": digest,
        "split": cfg.split,
        "seed": seed,
        "subset": cfg.subset,
        "base_url": cfg.base_url,
        "n_available": len(by_id),
        "n_pool": n_pool,
        "n_fetched": n_fetched,
        "n_cached": len(chosen_ids) - n_fetched,
        "n_skipped": len(skipped),
    }
    log.info("COCO %s: %s", out_dir, summary)
    return summary
