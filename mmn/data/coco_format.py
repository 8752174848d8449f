"""The COCO-format structure every reader of ``instances.json`` / ``captions.json`` relies on.

One place for the checks that the downloader (:mod:`mmn.data.coco`), the layout reader
(:mod:`mmn.data.layout`) and the data-quality gate (:mod:`mmn.quality.suites`) share:

* :func:`read_json_object`: a file that exists, parses as JSON and holds an object;
* :func:`check_coco_structure`: the top-level keys of a COCO ``kind`` (:data:`REQUIRED_KEYS`)
  are lists of objects; ``strict`` adds per-record checks (image id/file_name/width/height
  types, a safe file_name, unique image ids, annotation keys);
* :func:`read_coco_json`: both.

Each caller keeps its own error type: ``error`` is an exception class or any
``callable(message) -> Exception``. Messages start with the file (or label) at fault.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, Literal

Kind = Literal["instances", "captions"]
ErrorFactory = Callable[[str], Exception]

#: top-level keys (each a list of objects) a COCO file of each kind needs
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "instances": ("images", "annotations", "categories"),
    "captions": ("images", "annotations"),
}
#: keys every annotation record needs under ``strict``
ANNOTATION_KEYS: dict[str, tuple[str, ...]] = {
    "instances": ("id", "image_id", "category_id"),
    "captions": ("id", "image_id"),
}
_IMAGE_FIELDS = (("id", int), ("file_name", str), ("width", int), ("height", int))


def read_json_object(path: Path, error: ErrorFactory) -> dict[str, Any]:
    """The JSON object in ``path``; ``error`` names the file when it is missing, not JSON or not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except (FileNotFoundError, IsADirectoryError):
        raise error(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON (truncated or corrupt?): {err}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: top level is a {type(data).__name__}, expected a JSON object")
    return data


def read_coco_json(path: Path, kind: Kind, error: ErrorFactory, *, strict: bool = False) -> dict[str, Any]:
    """A COCO ``kind`` file read by :func:`read_json_object` and checked by :func:`check_coco_structure`."""
    data = read_json_object(path, error)
    check_coco_structure(data, str(path), kind, error=error, strict=strict)
    return data


def check_coco_structure(data: Any, label: str, kind: Kind, *, error: ErrorFactory, strict: bool = False) -> None:
    """Raise ``error`` (message starting with ``label``) unless ``data`` has the COCO ``kind`` structure.

    Always: a JSON object whose :data:`REQUIRED_KEYS` are lists of objects. ``strict``: also
    every image has int ``id``/``width``/``height`` and a plain ``file_name`` (no folder, not
    ``.``/``..``), image ids are unique, and every annotation has :data:`ANNOTATION_KEYS`.
    """
    if not isinstance(data, dict):
        raise error(f"{label}: top level is a {type(data).__name__}, expected a JSON object")
    required = REQUIRED_KEYS[kind]
    missing = [k for k in required if k not in data]
    if missing:
        raise error(f"{label}: missing top-level key {', '.join(map(repr, missing))} "
                    f"(a COCO {kind} file needs {', '.join(required)})")
    for key in required:
        if not isinstance(data[key], list):
            raise error(f"{label}: {key!r} is a {type(data[key]).__name__}, expected a list")
        bad = next((i for i, r in enumerate(data[key]) if not isinstance(r, dict)), None)
        if bad is not None:
            raise error(f"{label}: {key}[{bad}] is not an object")
    if strict:
        _check_images(data["images"], label, error)
        _check_annotations(data["annotations"], label, ANNOTATION_KEYS[kind], error)


def _check_images(images: list[dict[str, Any]], label: str, error: ErrorFactory) -> None:
    seen: set[int] = set()
    for i, im in enumerate(images):
        bad = [k for k, t in _IMAGE_FIELDS if not isinstance(im.get(k), t) or isinstance(im.get(k), bool)]
        if bad:
            raise error(f"{label}: images[{i}] lacks a valid {bad} (record: {im!r:.200})")
        fn = im["file_name"]
        if fn in ("", ".", "..") or PurePosixPath(fn).name != fn or "\\" in fn:
            raise error(f"{label}: images[{i}] (id {im['id']}) has unsafe file_name {fn!r}")
        if im["id"] in seen:
            raise error(f"{label}: duplicate image id {im['id']}")
        seen.add(im["id"])


def _check_annotations(anns: list[dict[str, Any]], label: str, keys: tuple[str, ...], error: ErrorFactory) -> None:
    for i, ann in enumerate(anns):
        if any(k not in ann for k in keys):
            raise error(f"{label}: annotations[{i}] lacks one of {list(keys)} (record: {ann!r:.200})")
