"""projection.train.data: captions: any image-caption set (CSV, COCO captions JSON, webdataset shards)
as the projection's training layout, from a folder, an archive or a 127.0.0.1 mirror; bad input;
the disjointness gate by content; the download_train stage on the real Flickr8k sample."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coco_server import local_only, require_flickr8k, serve
from mmn.data.captions_source import CaptionSourceError, build_captions_layout, expand_braces, resolve_format
from mmn.data.layout import CocoLayout
from mmn.data.sample import materialize_sample
from mmn.params import CaptionSourceParams
from mmn.quality import QualityError, check_coco_layout, check_train_eval_disjoint

pytestmark = pytest.mark.timeout(180)

#: name -> captions; commas and quotes inside captions, names not in sorted order
CAPTIONS = {
    "zebra_01.jpg": ["A zebra, grazing.", 'A "striped" horse'],
    "apple_02.jpg": ["An apple on a table ."],
    "moon_03.png": ["The moon, at night, over a lake", "A bright moon", "Night sky"],
}


@pytest.fixture(autouse=True)
def _local(monkeypatch: pytest.MonkeyPatch) -> None:
    local_only(monkeypatch)


def _image_bytes(name: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (40 + seed, 48, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG" if name.endswith(".png") else "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """``ds/captions.csv`` + ``ds/images/`` + the same as ``captions.json`` (COCO), ``images.zip``,
    ``images.tar.gz`` and two webdataset shards ``shards/part-{0..1}.tar``."""
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    for seed, name in enumerate(CAPTIONS):
        (ds / "images" / name).write_bytes(_image_bytes(name, seed))
    with open(ds / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for name, caps in CAPTIONS.items():
            for c in caps:
                w.writerow([name, c])
    images = [{"id": 10 + i, "file_name": n, "width": 1, "height": 1} for i, n in enumerate(CAPTIONS)]
    anns = [{"id": k, "image_id": 10 + i, "caption": c}
            for k, (i, c) in enumerate((i, c) for i, n in enumerate(CAPTIONS) for c in CAPTIONS[n])]
    (ds / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    with zipfile.ZipFile(ds / "images.zip", "w") as z:
        for name in CAPTIONS:
            z.write(ds / "images" / name, f"flickr/{name}")
    with tarfile.open(ds / "images.tar.gz", "w:gz") as t:
        t.add(ds / "images", arcname="images")
    (ds / "shards").mkdir()
    names = list(CAPTIONS)
    for k, part in enumerate((names[:2], names[2:])):
        with tarfile.open(ds / "shards" / f"part-{k}.tar", "w") as t:
            for name in part:
                key, ext = name.split(".")
                size = Image.open(ds / "images" / name).size
                files = {f"{key}.{ext}": (ds / "images" / name).read_bytes(),
                         f"{key}.txt": CAPTIONS[name][0].encode(),
                         f"{key}.json": json.dumps({"width": size[0], "height": size[1], "key": key}).encode()}
                for member, data in files.items():
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
    return ds


def _build(tmp_path: Path, name: str = "out", on_bad_image: str = "fail", **cfg) -> tuple[dict, CocoLayout]:
    out = tmp_path / name
    summary = build_captions_layout(CaptionSourceParams(**cfg), out, seed=0, cache_dir=tmp_path / "cache",
                                    on_bad_image=on_bad_image, retries=0, timeout_s=10, progress=False)
    check_coco_layout(out)
    return summary, CocoLayout(out)


def _content(lay: CocoLayout) -> dict[str, tuple[list[str], str]]:
    """file_name -> (captions, sha256 of the written file)."""
    caps = lay.captions
    return {im["file_name"]: (caps.get(im["id"], []),
                              hashlib.sha256((lay.images_dir / im["file_name"]).read_bytes()).hexdigest())
            for im in lay.images}


def _want(ds: Path, first_only: bool = False) -> dict[str, tuple[list[str], str]]:
    return {n: (c[:1] if first_only else c, hashlib.sha256((ds / "images" / n).read_bytes()).hexdigest())
            for n, c in CAPTIONS.items()}


def test_csv_with_an_image_folder(tmp_path: Path, dataset: Path) -> None:
    digest = hashlib.sha256((dataset / "captions.csv").read_bytes()).hexdigest()
    s, lay = _build(tmp_path, path=str(dataset / "captions.csv"), images=str(dataset / "images"), sha256=digest)
    assert _content(lay) == _want(dataset)
    # ids 1..N in sorted name order; each record carries its content hash and size
    assert [(im["id"], im["file_name"]) for im in lay.images] == list(enumerate(sorted(CAPTIONS), 1))
    for im in lay.images:
        assert im["sha256"] == _want(dataset)[im["file_name"]][1]
        assert (im["width"], im["height"]) == Image.open(dataset / "images" / im["file_name"]).size
    assert s == {"format": "csv", "n_images": 3, "n_captions": 6, "n_available": 3, "n_skipped": 0, "sha256": digest}
    assert lay.instances["annotations"] == [] and lay.categories == {}


@pytest.mark.parametrize("images", ["images.zip", "images.tar.gz"])
def test_archives_give_the_folder_layout(tmp_path: Path, dataset: Path, images: str) -> None:
    _, lay = _build(tmp_path, path=str(dataset / "captions.csv"), images=str(dataset / images))
    assert _content(lay) == _want(dataset)


def test_coco_captions_json_gives_the_csv_layout(tmp_path: Path, dataset: Path) -> None:
    s, lay = _build(tmp_path, path=str(dataset / "captions.json"), images=str(dataset / "images"))
    assert s["format"] == "coco" and _content(lay) == _want(dataset)


def test_webdataset_shards_folder_and_brace_range(tmp_path: Path, dataset: Path) -> None:
    s, lay = _build(tmp_path, path=str(dataset / "shards"))
    assert s["format"] == "webdataset" and _content(lay) == _want(dataset, first_only=True)
    _, lay2 = _build(tmp_path, "out2", path=str(dataset / "shards" / "part-{0..1}.tar"))
    assert _content(lay2) == _content(lay)
    digests = [hashlib.sha256((dataset / "shards" / f"part-{k}.tar").read_bytes()).hexdigest() for k in (0, 1)]
    assert s["sha256"] == digests
    with pytest.raises(CaptionSourceError, match=r"shard .*part-1.tar: .* has sha256 .* says 0+"):
        _build(tmp_path, "out3", path=str(dataset / "shards"), sha256=[digests[0], "0" * 64])


def test_a_127_0_0_1_mirror_gives_the_local_layout_and_resumes(tmp_path: Path, dataset: Path) -> None:
    _, local = _build(tmp_path, "local", path=str(dataset / "captions.csv"), images=str(dataset / "images"))
    with serve(dataset) as httpd:
        base = "http://%s:%d" % httpd.server_address[:2]
        httpd.faults["/images/zebra_01.jpg"] = ["404"]  # the last in name order
        with pytest.raises(CaptionSourceError, match=r"image zebra_01.jpg: .*404"):
            _build(tmp_path, "remote", path=f"{base}/captions.csv", images=f"{base}/images")
        assert not (tmp_path / "remote").exists()  # nothing half-written
        before = len(httpd.requests)
        _, remote = _build(tmp_path, "remote", path=f"{base}/captions.csv", images=f"{base}/images")
        fetched = [r.path for r in httpd.requests[before:]]
        assert fetched == ["/images/zebra_01.jpg"]  # the rerun fetched only what was missing
        _, from_zip = _build(tmp_path, "zip", path=f"{base}/captions.csv", images=f"{base}/images.zip")
        _, shards = _build(tmp_path, "wds", path=f"{base}/shards/part-{{0..1}}.tar")
    assert _content(remote) == _content(local) == _content(from_zip)
    assert _content(shards) == _want(dataset, first_only=True)


def test_subset_is_seeded(tmp_path: Path) -> None:
    ds = tmp_path / "many"
    (ds / "images").mkdir(parents=True)
    rows = []
    for i in range(30):
        (ds / "images" / f"im{i:02d}.jpg").write_bytes(_image_bytes("x.jpg", i % 5))
        rows.append(f"im{i:02d}.jpg,caption {i}")
    (ds / "c.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    _, a = _build(tmp_path, "a", path=str(ds / "c.csv"), images=str(ds / "images"), subset=7)
    _, b = _build(tmp_path, "b", path=str(ds / "c.csv"), images=str(ds / "images"), subset=7)
    names = [im["file_name"] for im in a.images]
    assert len(names) == 7 and names == [im["file_name"] for im in b.images] == sorted(names)
    assert {a.captions[im["id"]][0] for im in a.images} == {f"caption {int(n[2:4])}" for n in names}


def test_bad_images_fail_or_are_skipped_with_the_reason(tmp_path: Path, dataset: Path) -> None:
    (dataset / "images" / "apple_02.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (dataset / "images" / "moon_03.png").unlink()
    with open(dataset / "captions.csv", "a") as f:
        f.write("tiny.jpg,too small\n")
    Image.new("RGB", (8, 8)).save(dataset / "images" / "tiny.jpg")
    args = dict(path=str(dataset / "captions.csv"), images=str(dataset / "images"))
    with pytest.raises(CaptionSourceError, match=r"image apple_02.jpg: does not decode"):
        _build(tmp_path, **args)
    assert not (tmp_path / "out").exists()
    s, lay = _build(tmp_path, on_bad_image="skip", **args)
    assert [im["file_name"] for im in lay.images] == ["zebra_01.jpg"] and s["n_skipped"] == 3
    reasons = {r["file_name"]: r["reason"] for r in lay.skipped()}
    assert "does not decode" in reasons["apple_02.jpg"] and "no file" in reasons["moon_03.png"]
    assert "is 8x8, smaller than 16 px" in reasons["tiny.jpg"]
    assert set(lay.captions) == {lay.images[0]["id"]}  # no caption of a skipped image is kept


@pytest.mark.parametrize("text, match", [
    ("name,caption\na.jpg,x\n", r"header \['name', 'caption'\] lacks 'image' and 'caption'"),
    ("image,caption\nzebra_01.jpg,ok\napple_02.jpg,\n", r"row 3 has an empty caption"),
    ("image,caption\n", r"no caption rows"),
])
def test_bad_csv_names_the_file_and_row(tmp_path: Path, dataset: Path, text: str, match: str) -> None:
    (dataset / "captions.csv").write_text(text)
    with pytest.raises(CaptionSourceError, match=match) as e:
        _build(tmp_path, path=str(dataset / "captions.csv"), images=str(dataset / "images"))
    assert str(dataset / "captions.csv") in str(e.value)


def test_bad_settings_name_the_key(tmp_path: Path, dataset: Path) -> None:
    cases = [({"path": None}, r"needs projection.train.captions.path"),
             ({"path": str(dataset / "captions.csv")}, r"captions.images: format csv needs"),
             ({"path": str(dataset / "captions.csv"), "images": str(dataset / "images"), "sha256": "ab" * 32},
              r"captions.csv has sha256 [0-9a-f]{64}, projection.train.captions.sha256 says abab"),
             ({"path": str(dataset / "nope.csv"), "images": str(dataset / "images")}, r"nope.csv does not exist"),
             ({"path": str(dataset / "captions.csv"), "images": str(dataset / "captions.json")},
              r"neither a folder, an archive"),
             ({"path": str(dataset / "shards"), "images": str(dataset / "images")}, r"a webdataset holds its images")]
    for cfg, match in cases:
        with pytest.raises(CaptionSourceError, match=match):
            _build(tmp_path, **cfg)
    assert resolve_format("x/Captions.TXT", "auto") == "csv" and resolve_format("a.json", "auto") == "coco"
    assert resolve_format("s/{000..003}.tar", "auto") == "webdataset"
    assert expand_braces("s-{08..11}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar", "s-11.tar"]
    assert expand_braces("a{1..2}b{0..1}") == ["a1b0", "a1b1", "a2b0", "a2b1"]


def test_gate_compares_content_not_ids_across_datasets(tmp_path: Path, dataset: Path) -> None:
    """A captions layout numbers its images 1..N: the same ids as an evaluated layout are not an
    overlap, the same file content is, whatever its name or id."""
    materialize_sample(tmp_path / "eval", [1, 2, 3])
    _, lay = _build(tmp_path, "train", path=str(dataset / "captions.csv"), images=str(dataset / "images"))
    train = tmp_path / "train"
    assert {im["id"] for im in lay.images} & {1, 2, 3}  # colliding ids ...
    assert check_train_eval_disjoint(train, tmp_path / "eval", compare_ids=False) == []  # ... are no overlap
    with pytest.raises(QualityError, match=r"also evaluated in .*\(compared by image id or file content\)"):
        check_train_eval_disjoint(train, tmp_path / "eval")  # the COCO-id comparison would be wrong here
    # an evaluated photo slipped into the set under another name
    ev = CocoLayout(tmp_path / "eval")
    shutil.copyfile(ev.images_dir / ev.images[1]["file_name"], dataset / "images" / "zebra_01.jpg")
    _, lay = _build(tmp_path, "train2", path=str(dataset / "captions.csv"), images=str(dataset / "images"))
    zebra = next(im["id"] for im in lay.images if im["file_name"] == "zebra_01.jpg")
    with pytest.raises(QualityError, match=rf"1 of the 3 training images .*: image id\(s\) {zebra} of the training "
                                           rf"layout \(compared by file content\)\n"):
        check_train_eval_disjoint(tmp_path / "train2", tmp_path / "eval", compare_ids=False)


def test_stage_trains_on_the_flickr8k_sample_through_a_mirror(tmp_path: Path) -> None:
    """download_train with projection.train.data: captions on a 127.0.0.1 mirror of the Flickr8k
    sample (the format of Flickr8k's own captions.txt), 12 of its 5000 images."""
    from helpers.download_stages import Run
    from helpers.download_stages import ok as _ok

    flickr = require_flickr8k()
    rows = list(csv.DictReader(open(flickr / "captions.csv", newline="", encoding="utf-8")))
    with serve(flickr) as httpd:
        base = "http://%s:%d" % httpd.server_address[:2]
        run = Run(tmp_path, **{"projection.train.data": "captions", "projection.train.captions": {
            "path": f"{base}/captions.csv", "images": f"{base}/images", "format": "auto",
            "sha256": "7145a5c242495b9ba7a4a63fe2cc33ad73ae7190565475aef2d54446dd0e80f4", "subset": 12}})
        _ok(run.coco())
        out = _ok(run.train())
    lay = CocoLayout(run.train_dir)
    assert len(lay.images) == 12 and "mode=captions" in out and "12 training image(s)" in out
    want: dict[str, list[str]] = {}
    for r in rows:
        want.setdefault(r["image"], []).append(r["caption"])
    for im in lay.images:
        assert lay.captions[im["id"]] == want[im["file_name"]] and len(want[im["file_name"]]) == 5
        assert (lay.images_dir / im["file_name"]).read_bytes() == (flickr / "images" / im["file_name"]).read_bytes()
    info = run.split_info()
    assert info["mode"] == "captions" and info["held_out"] is True and info["n_train"] == 12
