"""Read the COCO-format layout every data source produces.

``root/images/<file_name>``, ``root/annotations/instances.json``,
``root/annotations/captions.json`` (pycocotools-loadable) and ``root/skipped.csv``
(images the source left out under ``data.on_bad_image: skip``, with the reason;
header only when none). Errors name the file; the JSON structure is checked by
:mod:`mmn.data.coco_format`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mmn.data.coco_format import read_coco_json
from mmn.errors import DataError


SKIPPED_COLUMNS = ("image_id", "file_name", "reason")


def write_skipped(rows: list[dict], root: Path) -> Path:
    """Write ``root/skipped.csv`` (sorted by image_id; header only when ``rows`` is empty)."""
    path = Path(root) / "skipped.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=SKIPPED_COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in sorted(rows, key=lambda r: r["image_id"]):
            w.writerow({k: r[k] for k in SKIPPED_COLUMNS})
    return path


class LayoutError(DataError):
    """Missing or malformed data in the COCO layout; the message names the file/row."""


@dataclass
class CocoLayout:
    root: Path

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def instances_path(self) -> Path:
        return self.root / "annotations" / "instances.json"

    @property
    def captions_path(self) -> Path:
        return self.root / "annotations" / "captions.json"

    @property
    def skipped_path(self) -> Path:
        return self.root / "skipped.csv"

    def skipped(self) -> list[dict]:
        """Rows of ``skipped.csv`` (image_id as int); [] when the file is absent."""
        if not self.skipped_path.exists():
            return []
        with open(self.skipped_path, newline="", encoding="utf-8") as f:
            return [{**r, "image_id": int(r["image_id"])} for r in csv.DictReader(f)]

    @cached_property
    def instances(self) -> dict:
        return read_coco_json(self.instances_path, "instances", LayoutError)

    @cached_property
    def captions_json(self) -> dict:
        return read_coco_json(self.captions_path, "captions", LayoutError)

    @cached_property
    def images(self) -> list[dict]:
        """Image records sorted by id."""
        return sorted(self.instances["images"], key=lambda r: r["id"])

    @cached_property
    def image_by_id(self) -> dict[int, dict]:
        return {r["id"]: r for r in self.images}

    @cached_property
    def captions(self) -> dict[int, list[str]]:
        """Reference captions per image id, in annotation-id order."""
        out: dict[int, list[str]] = {r["id"]: [] for r in self.images}
        for a in sorted(self.captions_json["annotations"], key=lambda a: a["id"]):
            if a["image_id"] not in out:
                raise LayoutError(f"{self.captions_path}: caption {a['id']} refers to unknown image {a['image_id']}")
            out[a["image_id"]].append(a["caption"].strip())
        return out

    @cached_property
    def categories(self) -> dict[int, str]:
        return {c["id"]: c["name"] for c in self.instances["categories"]}

    def image_path(self, image_id: int) -> Path:
        return self.images_dir / self.image_by_id[image_id]["file_name"]

    def load_image(self, image_id: int) -> Image.Image:
        """Decode fully as RGB; a missing, corrupt or truncated file raises LayoutError."""
        path = self.image_path(image_id)
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except FileNotFoundError:
            raise LayoutError(f"{path}: image {image_id} is missing from disk") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise LayoutError(f"{path}: image {image_id} cannot be decoded ({err})") from None
