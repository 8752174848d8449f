"""Training images from any image-caption set, written as a COCO-format layout.

Stage ``download_train`` under ``projection.train.data: captions`` reads
``projection.train.captions`` (:class:`mmn.params.CaptionSourceParams`) in one of three formats
(``format: auto`` picks it from ``path``'s ending):

* ``csv``: ``image,caption`` rows, one per caption (Flickr8k's ``captions.txt``); ``images`` is
  the image folder, a ``.zip``/``.tar``/``.tar.gz`` archive, or a base URL (``{images}/{image}``);
* ``coco``: a COCO captions JSON (``images[].file_name``, ``annotations[].caption``); ``images``
  as for csv;
* ``webdataset``: tar shards as img2dataset writes them: ``<key>.jpg`` (or png/jpeg/webp) +
  ``<key>.txt``, optionally ``<key>.json`` with ``width``/``height``. ``path`` is one shard, a
  folder of ``*.tar`` shards, or a brace range ``shard-{00000..00009}.tar``.

Every location is a local path or an http(s) URL. URLs are fetched through
:func:`mmn.download.download` (resumable ``.part`` files, retries) into the stage's cache, so a
rerun after an interruption fetches only what is missing. ``sha256`` checks the captions file
(csv, coco) or each shard (webdataset: a list, in shard order).

Gotchas:

* The layout's image ids are 1..N in the order of the sorted image names: they are **not** COCO
  ids and mean nothing across datasets, so the train/eval disjointness gate compares the
  images' content hashes (``sha256`` of the file, stored in each image record), not ids.
* An image is decoded in full; one that fails (or is smaller than :data:`MIN_SIDE`, or differs
  from the width/height its webdataset ``.json`` states) fails the stage under
  ``data.on_bad_image: fail``, or is left out with the reason in ``skipped.csv`` under ``skip``.
  An image without a caption, or a caption without its image, is a bad image too.
* There are no instance annotations: ``instances.json`` has the images and empty
  ``annotations``/``categories`` (training reads only captions).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urlparse

from PIL import Image
from tqdm.auto import tqdm

from mmn.data.coco import _strict_pil, select_image_ids, write_layout
from mmn.data.coco_format import read_coco_json
from mmn.download import DownloadError, download, file_sha256, retrying_session
from mmn.errors import DataError

__all__ = ["CaptionSourceError", "build_captions_layout", "expand_braces", "resolve_format"]

Format = Literal["csv", "coco", "webdataset"]
#: images smaller than this on either side are bad images (a thumbnail or a placeholder)
MIN_SIDE = 16
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
_ARCHIVE_EXTS = (".zip", ".tar", ".tar.gz", ".tgz")
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


class CaptionSourceError(DataError):
    """A problem with the image-caption source; the message names the key, file, row or image."""


def is_url(s: str) -> bool:
    return urlparse(s).scheme in ("http", "https")


def resolve_format(path: str, fmt: str) -> Format:
    """``fmt``, or under ``auto`` the format ``path`` ends with (``.csv``/``.txt``, ``.json``, shards)."""
    if fmt != "auto":
        return fmt  # type: ignore[return-value]
    p = path.lower().rstrip("/")
    if p.endswith((".csv", ".txt")):
        return "csv"
    if p.endswith(".json"):
        return "coco"
    if p.endswith(".tar") or _BRACE.search(p) or not PurePosixPath(p).suffix:
        return "webdataset"
    raise CaptionSourceError(f"projection.train.captions.format: auto cannot tell the format of {path!r}; "
                             "set csv, coco or webdataset")


def expand_braces(pattern: str) -> list[str]:
    """``a-{00..02}.tar`` -> ``a-00.tar, a-01.tar, a-02.tar`` (webdataset's shard notation, zero padding kept)."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    if int(hi) < int(lo):
        raise CaptionSourceError(f"projection.train.captions.path: empty brace range {m.group(0)} in {pattern!r}")
    width = len(lo) if lo.startswith("0") else 0
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [x for i in range(int(lo), int(hi) + 1) for x in expand_braces(f"{head}{i:0{width}d}{tail}")]


# ----------------------------------------------------------------------------- fetching


@dataclass
class _Fetcher:
    """Local paths as they are; URLs downloaded (resumable) into ``cache/<sha1 of the URL's folder>/``."""

    cache: Path
    retries: int
    timeout_s: float
    session: Any = None

    def get(self, location: str, what: str) -> Path:
        if not is_url(location):
            p = Path(location)
            if not p.exists():
                raise CaptionSourceError(f"{what}: {p} does not exist")
            return p
        parsed = urlparse(location)
        folder = hashlib.sha1(location.rsplit("/", 1)[0].encode()).hexdigest()[:16]
        dest = self.cache / folder / PurePosixPath(parsed.path).name
        if not dest.exists():
            if self.session is None:
                self.session = retrying_session(self.retries, user_agent="mmn-captions-download/0.1")
            download(location, dest, retries=self.retries, timeout=self.timeout_s, what=what,
                     session=self.session, error=CaptionSourceError)
        return dest


def _check_sha256(path: Path, want: str | None, what: str) -> str:
    got = file_sha256(path)
    if want is not None and got != want.lower():
        raise CaptionSourceError(f"{what}: {path} has sha256 {got}, projection.train.captions.sha256 says {want}")
    return got


# ----------------------------------------------------------------------------- captions


def read_captions_csv(path: Path) -> dict[str, list[str]]:
    """``image -> captions`` from an ``image,caption`` CSV (a CSV reader: captions hold commas)."""
    out: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        if "image" not in cols or "caption" not in cols:
            raise CaptionSourceError(f"{path}: header {cols} lacks 'image' and 'caption' columns")
        for row_no, row in enumerate(reader, start=2):
            name, cap = (row.get("image") or "").strip(), (row.get("caption") or "").strip()
            if not name or not cap:
                raise CaptionSourceError(f"{path}: row {row_no} has an empty {'image' if not name else 'caption'}")
            out.setdefault(name, []).append(cap)
    if not out:
        raise CaptionSourceError(f"{path}: no caption rows")
    return out


def read_captions_coco(path: Path) -> dict[str, list[str]]:
    """``file_name -> captions`` from a COCO captions JSON (checked strictly)."""
    data = read_coco_json(path, "captions", CaptionSourceError, strict=True)
    names = {im["id"]: im["file_name"] for im in data["images"]}
    out: dict[str, list[str]] = {names[i]: [] for i in sorted(names)}
    for k, ann in enumerate(data["annotations"]):
        if ann["image_id"] not in names or not isinstance(ann.get("caption"), str) or not ann["caption"].strip():
            raise CaptionSourceError(f"{path}: annotations[{k}] has no caption or an unknown image_id "
                                     f"{ann.get('image_id')!r}")
        out[names[ann["image_id"]]].append(ann["caption"].strip())
    return out


# ----------------------------------------------------------------------------- images


class _ImageSource:
    """Bytes of an image by name from a folder, a zip or tar archive, or a base URL."""

    def __init__(self, location: str, fetcher: _Fetcher):
        self.location, self.fetcher = location, fetcher
        self.archive: zipfile.ZipFile | tarfile.TarFile | None = None
        self.members: dict[str, Any] = {}
        if location.lower().endswith(_ARCHIVE_EXTS):
            path = fetcher.get(location, "projection.train.captions.images (archive)")
            try:
                if location.lower().endswith(".zip"):
                    self.archive = zipfile.ZipFile(path)
                    entries = [(PurePosixPath(i.filename).name, i) for i in self.archive.infolist() if not i.is_dir()]
                else:
                    self.archive = tarfile.open(path)
                    entries = [(PurePosixPath(m.name).name, m) for m in self.archive.getmembers() if m.isfile()]
            except (zipfile.BadZipFile, tarfile.TarError, OSError) as err:
                raise CaptionSourceError(f"projection.train.captions.images: {path} is not a readable archive: "
                                         f"{err}") from None
            for name, entry in entries:
                if name in self.members:
                    raise CaptionSourceError(f"projection.train.captions.images: {path} holds two files named {name}")
                self.members[name] = entry
        elif not is_url(location) and not Path(location).is_dir():
            raise CaptionSourceError(f"projection.train.captions.images: {location} is neither a folder, an "
                                     f"archive ({', '.join(_ARCHIVE_EXTS)}) nor an http(s) URL")

    def read(self, name: str) -> bytes:
        """The image's bytes; :class:`CaptionSourceError` (or a DownloadError) says why not."""
        if isinstance(self.archive, zipfile.ZipFile):
            if name not in self.members:
                raise CaptionSourceError(f"not in the archive {self.location}")
            return self.archive.read(self.members[name])
        if isinstance(self.archive, tarfile.TarFile):
            if name not in self.members:
                raise CaptionSourceError(f"not in the archive {self.location}")
            return self.archive.extractfile(self.members[name]).read()
        if is_url(self.location):
            return self.fetcher.get(f"{self.location.rstrip('/')}/{name}", f"image {name}").read_bytes()
        p = Path(self.location) / name
        if not p.is_file():
            raise CaptionSourceError(f"no file {p}")
        return p.read_bytes()


def image_problem(data: bytes, want_size: tuple[int, int] | None = None) -> tuple[str | None, tuple[int, int]]:
    """``(None, (w, h))`` when ``data`` decodes in full to an image of at least :data:`MIN_SIDE`
    pixels a side (and of ``want_size`` when given), else ``(why not, size or (0, 0))``."""
    try:
        with _strict_pil(), Image.open(io.BytesIO(data)) as im:
            im.load()
            size = im.size
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...
        return f"does not decode ({type(err).__name__}: {err})", (0, 0)
    if min(size) < MIN_SIDE:
        return f"is {size[0]}x{size[1]}, smaller than {MIN_SIDE} px a side", size
    if want_size is not None and tuple(want_size) != size:
        return f"is {size[0]}x{size[1]}, its .json says {want_size[0]}x{want_size[1]}", size
    return None, size


# ----------------------------------------------------------------------------- webdataset


def _shard_locations(path: str) -> list[str]:
    if not is_url(path) and Path(path).is_dir():
        shards = sorted(str(p) for p in Path(path).glob("*.tar"))
        if not shards:
            raise CaptionSourceError(f"projection.train.captions.path: {path} holds no *.tar shard")
        return shards
    return expand_braces(path)


def _webdataset_samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` per sample of one shard (key: the member name up to its first dot)."""
    try:
        with tarfile.open(shard) as tf:
            samples: dict[str, dict[str, bytes]] = {}
            for m in tf.getmembers():
                if not m.isfile():
                    continue
                base = PurePosixPath(m.name).name
                key, _, ext = base.partition(".")
                samples.setdefault(key, {})["." + ext.lower()] = tf.extractfile(m).read()
    except (tarfile.TarError, OSError) as err:
        raise CaptionSourceError(f"{shard}: not a readable tar shard: {err}") from None
    yield from samples.items()


def _read_webdataset(cfg, fetcher: _Fetcher, unpack: Path) -> tuple[dict[str, list[str]], dict[str, Path | str],
                                                                    dict[str, tuple[int, int]], list[str]]:
    """Captions, image files unpacked into ``unpack`` (or why the sample is bad), stated sizes, shard
    sha256s. One shard at a time is in memory."""
    captions: dict[str, list[str]] = {}
    images: dict[str, Path | str] = {}
    unpack.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, tuple[int, int]] = {}
    shards = _shard_locations(cfg.path)
    want = cfg.sha256 if isinstance(cfg.sha256, list) else None
    if cfg.sha256 is not None and (want is None or len(want) != len(shards)):
        raise CaptionSourceError(f"projection.train.captions.sha256: webdataset wants a list of {len(shards)} "
                                 f"sha256 (one per shard), got {cfg.sha256!r:.80}")
    digests = []
    for i, loc in enumerate(shards):
        shard = fetcher.get(loc, f"shard {loc}")
        digests.append(_check_sha256(shard, want[i] if want else None, f"shard {loc}"))
        for key, parts in _webdataset_samples(shard):
            name = key + next((e for e in IMAGE_EXTS if e in parts), ".jpg")
            if name in images:
                raise CaptionSourceError(f"{loc}: sample key {key!r} appears twice across the shards")
            img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
            if img is None:
                images[name] = f"sample {key!r} of {loc} has no image"
            else:
                (unpack / name).write_bytes(img)
                images[name] = unpack / name
            if ".txt" in parts:
                cap = parts[".txt"].decode("utf-8", errors="replace").strip()
                if cap:
                    captions[name] = [cap]
            if ".json" in parts:
                try:
                    meta = json.loads(parts[".json"])
                    if isinstance(meta.get("width"), int) and isinstance(meta.get("height"), int):
                        sizes[name] = (meta["width"], meta["height"])
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                    pass  # img2dataset's .json is informative only; the image itself is checked
    for name in images:
        captions.setdefault(name, [])
    return captions, images, sizes, digests


# ----------------------------------------------------------------------------- entry point


def build_captions_layout(cfg, out_dir: Path, *, seed: int, cache_dir: Path,
                          on_bad_image: Literal["fail", "skip"] = "fail", retries: int = 3,
                          timeout_s: float = 60.0, progress: bool = True) -> dict[str, Any]:
    """Write the COCO-format training layout of the image-caption set ``cfg`` into ``out_dir``.

    Args:
        cfg: ``projection.train.captions`` (path, images, format, sha256, subset).
        out_dir: result folder, replaced atomically (images/, annotations/, skipped.csv).
        seed: seed of the ``subset`` choice.
        cache_dir: where fetched files live between runs (resumable).
        on_bad_image: ``fail`` raises on the first bad image; ``skip`` lists it in skipped.csv.

    Returns: a summary (format, n_images, n_captions, n_available, n_skipped, sha256).
    """
    if not cfg.path:
        raise CaptionSourceError("projection.train.data: captions needs projection.train.captions.path")
    fmt = resolve_format(cfg.path, cfg.format)
    fetcher = _Fetcher(Path(cache_dir) / "captions", retries, timeout_s)
    sizes: dict[str, tuple[int, int]] = {}
    if fmt == "webdataset":
        if cfg.images:
            raise CaptionSourceError("projection.train.captions.images: a webdataset holds its images; leave it null")
        captions, images_in, sizes, digest = _read_webdataset(cfg, fetcher, Path(cache_dir) / "captions" / "unpacked")
        source = None
    else:
        if not cfg.images:
            raise CaptionSourceError(f"projection.train.captions.images: format {fmt} needs the image folder, "
                                     "archive or base URL")
        if isinstance(cfg.sha256, list):
            raise CaptionSourceError("projection.train.captions.sha256: one sha256 string for a captions file")
        cap_path = fetcher.get(cfg.path, "projection.train.captions.path")
        digest = _check_sha256(cap_path, cfg.sha256, "projection.train.captions.path")
        captions = read_captions_csv(cap_path) if fmt == "csv" else read_captions_coco(cap_path)
        images_in, source = {}, _ImageSource(cfg.images, fetcher)

    names = sorted(captions)
    chosen = [names[i] for i in select_image_ids(range(len(names)), cfg.subset, seed)]
    chosen.sort()
    records, sources, skipped, n_caps = [], [], [], 0
    staging = Path(cache_dir) / "captions" / "staging"  # the images as written; write_layout copies them
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for image_id, name in enumerate(tqdm(chosen, desc="training images", unit="img", disable=not progress), 1):
        file_name = PurePosixPath(name).name
        problem, data = None, b""
        try:
            got = images_in[name] if source is None else source.read(name)
        except (CaptionSourceError, DownloadError) as err:
            problem = str(err)
        else:
            if isinstance(got, str):
                problem = got
            else:
                data = got.read_bytes() if isinstance(got, Path) else got
        if problem is None:
            problem, (w, h) = image_problem(data, sizes.get(name))
        if problem is None and not captions[name]:
            problem = "has no caption"
        if problem is not None:
            reason = f"image {name}: {problem}"
            if on_bad_image == "fail":
                raise CaptionSourceError(f"{cfg.path}: {reason} (data.on_bad_image: fail; skip leaves it out)")
            skipped.append({"image_id": image_id, "file_name": file_name, "reason": reason})
            continue
        rec = {"id": image_id, "file_name": file_name, "width": w, "height": h,
               "sha256": hashlib.sha256(data).hexdigest(), "source_name": name}
        dest = staging / file_name
        dest.write_bytes(data)
        records.append(rec)
        sources.append((rec, dest))
        n_caps += len(captions[name])
    if len({r["file_name"] for r in records}) != len(records):
        raise CaptionSourceError(f"{cfg.path}: several images share a file name once their folders are dropped")
    if not records:
        raise CaptionSourceError(f"{cfg.path}: none of the {len(chosen)} chosen images is usable; first problem: "
                                 f"{skipped[0]['reason'] if skipped else 'no images'}")
    anns, k = [], 0
    for rec in records:
        for cap in captions[rec["source_name"]]:
            k += 1
            anns.append({"id": k, "image_id": rec["id"], "caption": cap})
    info = {"description": f"mmn training layout from {cfg.path} ({fmt})"}
    instances = {"info": info, "images": records, "annotations": [], "categories": []}
    captions_json = {"info": info, "images": records, "annotations": anns}
    write_layout(out_dir, sources, instances, captions_json, skipped)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(Path(cache_dir) / "captions" / "unpacked", ignore_errors=True)
    return {"format": fmt, "n_images": len(records), "n_captions": n_caps, "n_available": len(names),
            "n_skipped": len(skipped), "sha256": digest}
