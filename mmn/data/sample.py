"""The embedded ``sample`` data source: real public-domain / CC0 images that ship inside
installed wheels (scikit-image, matplotlib), with the project's own COCO annotations.

:func:`materialize_sample` writes the same layout as every other source::

    out_dir/images/<file_name>            # byte-for-byte copies of the package files
    out_dir/annotations/instances.json    # info, licenses, images, annotations, categories
    out_dir/annotations/captions.json     # info, licenses, images, annotations (captions)

Nothing is downloaded. ``sample_annotations.json`` (next to this module) holds the image
records (each with a ``source`` block: distribution, import package, path inside it,
sha256, credit and license statement), all 80 COCO categories with their official ids,
hand-traced polygon instances and 5 hand-written captions per image.

Gotchas:

* Images are located with :func:`mmn.resources.package_path` (the package is not imported).
  scikit-image fetches some of its data files at run time (pooch); only files that are
  inside the wheel are used here. A missing package or file raises
  :class:`~mmn.data.layout.LayoutError` naming both.
* ``camera.png`` and ``clock_motion.png`` are grayscale (mode ``L``) and ``horse.png`` is
  RGBA (a CC0 silhouette drawing, not a photograph): convert to RGB when decoding.
* A size mismatch with the record raises :class:`ValueError` (the polygons would be wrong);
  a different sha256 with the right size only warns (e.g. a re-compressed PNG).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

from PIL import Image

from mmn.data.layout import LayoutError, write_skipped
from mmn.io import atomic_dir
from mmn.resources import package_path

ANNOTATIONS_FILE = Path(__file__).with_name("sample_annotations.json")


def load_sample_annotations() -> dict[str, Any]:
    """The embedded annotation document (info, licenses, images, categories, annotations, captions)."""
    return json.loads(ANNOTATIONS_FILE.read_text(encoding="utf-8"))


def source_path(image: dict[str, Any]) -> Path:
    """Installed file behind one image record (its ``source`` block)."""
    src = image["source"]
    what = f"{src['distribution']}, for the sample data" if src.get("distribution") else "for the sample data"
    return package_path(src["package"], src["path"], what=what, error=LayoutError)


def _check_image(path: Path, image: dict[str, Any]) -> None:
    with Image.open(path) as im:
        size = im.size
    if size != (image["width"], image["height"]):
        raise ValueError(
            f"sample data: {path} is {size[0]}x{size[1]}, expected {image['width']}x{image['height']} "
            f"for {image['file_name']} (another version of {image['source']['distribution']}?)"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != image["source"]["sha256"]:
        warnings.warn(f"sample data: {path} differs from the annotated file (sha256 {digest})", stacklevel=3)


def _dump(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":")) + "\n"


def sample_image_ids() -> list[int]:
    """Ids of the embedded sample's images, sorted."""
    return sorted(im["id"] for im in load_sample_annotations()["images"])


def materialize_sample(out_dir: Path, image_ids: Collection[int] | None = None) -> dict[str, int]:
    """Write the COCO layout of the embedded sample to ``out_dir`` (replaced atomically).

    ``image_ids``: keep only these images (with their instances and captions), e.g. one
    part of :func:`mmn.data.split.split_ids`; None = all. An id not in the sample raises
    :class:`~mmn.data.layout.LayoutError`.

    Returns ``{"n_images", "n_instances", "n_captions"}``.
    """
    out_dir = Path(out_dir)
    doc = load_sample_annotations()
    if image_ids is not None:
        keep = {int(i) for i in image_ids}
        unknown = sorted(keep - {im["id"] for im in doc["images"]})
        if unknown:
            raise LayoutError(f"{ANNOTATIONS_FILE}: image id(s) {unknown} are not in the sample "
                              f"(it has {sample_image_ids()})")
        doc = {**doc, "images": [im for im in doc["images"] if im["id"] in keep],
               "annotations": [a for a in doc["annotations"] if a["image_id"] in keep],
               "captions": [c for c in doc["captions"] if c["image_id"] in keep]}
    images = doc["images"]
    sources = [(image, source_path(image)) for image in images]  # fail before writing anything

    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        (tmp / "annotations").mkdir()
        for image, src in sources:
            _check_image(src, image)
            shutil.copyfile(src, tmp / "images" / image["file_name"])
        head = {"info": doc["info"], "licenses": doc["licenses"], "images": images}
        instances = {**head, "annotations": doc["annotations"], "categories": doc["categories"]}
        captions = {**head, "annotations": doc["captions"]}
        (tmp / "annotations" / "instances.json").write_text(_dump(instances), encoding="utf-8")
        (tmp / "annotations" / "captions.json").write_text(_dump(captions), encoding="utf-8")
        write_skipped([], tmp)  # every shipped image is checked by the tests: nothing to skip
    return {"n_images": len(images), "n_instances": len(doc["annotations"]), "n_captions": len(doc["captions"])}
