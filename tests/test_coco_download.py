"""mmn.data.coco.download_coco against a local copy of the official COCO layout.

The server (tests/coco_server.py) is built from coco-mini and bound to 127.0.0.1; no test
opens any other connection. Tests skip when coco-mini is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from mmn.data.coco import (
    CocoDownloadError,
    archive_cache_path,
    download_coco,
    select_image_ids,
)
from mmn.params import CocoParams

try:  # tests/ is not a package today; also work if it becomes one
    from coco_server import (
        ARCHIVE,
        CocoServer,
        coco_server_factory,  # noqa: F401 - pytest fixture
        load_mini_json,
        local_only,
        require_coco_mini,
        split_of,
    )
except ImportError:  # pragma: no cover
    from tests.coco_server import (  # type: ignore[no-redef]
        ARCHIVE,
        CocoServer,
        coco_server_factory,  # noqa: F401
        load_mini_json,
        local_only,
        require_coco_mini,
        split_of,
    )

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _local_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy for 127.0.0.1, no sleeping between retries."""
    local_only(monkeypatch)


@pytest.fixture
def mini() -> Path:
    return require_coco_mini()


@pytest.fixture
def make_server(coco_server_factory):  # noqa: F811
    return coco_server_factory


def _cfg(srv: CocoServer, **over) -> CocoParams:
    fields = dict(
        base_url=srv.base_url,
        split="val2017",
        annotations_archive=ARCHIVE,
        annotations_sha1=srv.sha1,
        subset=0,
        timeout_s=10.0,
        retries=2,
    )
    fields.update(over)
    return CocoParams(**fields)


def _load(out: Path, kind: str) -> dict:
    return json.loads((out / "annotations" / f"{kind}.json").read_text())


def _image_ids(out: Path) -> list[int]:
    return sorted(im["id"] for im in _load(out, "instances")["images"])


def _image_requests(srv: CocoServer) -> list:
    return [r for r in srv.requests if r.path.endswith(".jpg")]


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_full_download_matches_coco_mini(make_server, mini: Path, tmp_path: Path) -> None:
    srv = make_server()
    out = tmp_path / "data" / "coco"
    summary = download_coco(_cfg(srv), out, seed=0, progress=False)

    # images: file for file, byte for byte
    want_files = sorted(p.name for p in (mini / "images").iterdir())
    assert sorted(p.name for p in (out / "images").iterdir()) == want_files
    for name in want_files:
        assert (out / "images" / name).read_bytes() == (mini / "images" / name).read_bytes(), name

    # JSON: same id sets, records verbatim
    for kind in ("instances", "captions"):
        got, want = _load(out, kind), load_mini_json(kind, mini)
        assert {im["id"] for im in got["images"]} == {im["id"] for im in want["images"]}
        assert {a["id"] for a in got["annotations"]} == {a["id"] for a in want["annotations"]}
        assert sorted(got["annotations"], key=lambda a: a["id"]) == sorted(
            want["annotations"], key=lambda a: a["id"]
        )
        assert got["info"] == want["info"] and got["licenses"] == want["licenses"]
    assert _load(out, "instances")["categories"] == load_mini_json("instances", mini)["categories"]

    # both load in pycocotools
    inst = COCO(str(out / "annotations" / "instances.json"))
    caps = COCO(str(out / "annotations" / "captions.json"))
    assert len(inst.getImgIds()) == 100 and len(inst.getAnnIds()) == 731
    assert len(caps.getAnnIds()) == 500

    assert summary["n_images"] == 100
    assert summary["n_instances"] == 731
    assert summary["n_captions"] == 500
    assert summary["archive_sha1"] == srv.sha1
    assert summary["n_fetched"] == 100

    # each image was asked for at the split its coco_url names
    by_split = {"val2017": 0, "train2017": 0}
    for r in _image_requests(srv):
        by_split[r.path.split("/")[1]] += 1
    assert by_split == {"val2017": 79, "train2017": 21}
    # default cache beside out_dir; no temp dirs left
    assert sorted(p.name for p in out.parent.iterdir()) == [".coco_cache", "coco"]


def test_seeded_subset_is_deterministic(make_server, mini: Path, tmp_path: Path) -> None:
    srv = make_server()
    cache = tmp_path / "cache"
    cfg = _cfg(srv, subset=10)
    s_a = download_coco(cfg, tmp_path / "a", seed=0, cache_dir=cache, progress=False)
    s_b = download_coco(cfg, tmp_path / "b", seed=0, cache_dir=cache, progress=False)
    download_coco(cfg, tmp_path / "c", seed=1, cache_dir=cache, progress=False)
    a, b, c = (_image_ids(tmp_path / n) for n in "abc")

    all_ids = sorted(im["id"] for im in load_mini_json("instances", mini)["images"])
    assert len(a) == 10 and len(set(a)) == 10 and set(a) <= set(all_ids)
    assert a == b, "same seed, different subset"
    assert a != c, "different seeds gave the same subset"
    assert a == select_image_ids(all_ids, 10, 0)
    assert s_a["n_fetched"] == 10 and s_b["n_fetched"] == 0 and s_b["n_cached"] == 10

    # annotations restricted to the chosen images, none lost
    inst = load_mini_json("instances", mini)
    want_anns = {x["id"] for x in inst["annotations"] if x["image_id"] in set(a)}
    got = _load(tmp_path / "a", "instances")
    assert {x["id"] for x in got["annotations"]} == want_anns
    assert len(got["categories"]) == 80
    caps = _load(tmp_path / "a", "captions")
    assert {x["image_id"] for x in caps["annotations"]} == set(a) and len(caps["annotations"]) == 50
    names = {im["file_name"] for im in got["images"]}
    assert {p.name for p in (tmp_path / "a" / "images").iterdir()} == names

    # rerunning into an existing out_dir replaces it whole (no stale images)
    download_coco(cfg, tmp_path / "a", seed=1, cache_dir=cache, progress=False)
    assert _image_ids(tmp_path / "a") == c
    assert len(list((tmp_path / "a" / "images").iterdir())) == 10
    assert _leftovers(tmp_path) == []


def test_select_image_ids() -> None:
    ids = list(range(1000, 0, -7))
    assert select_image_ids(ids, 0, 3) == sorted(ids)
    assert select_image_ids(ids, len(ids) + 5, 3) == sorted(ids)
    s = select_image_ids(ids, 20, 3)
    assert s == sorted(s) and len(set(s)) == 20 and set(s) <= set(ids)
    assert s == select_image_ids(list(reversed(ids)), 20, 3), "depends on the input order"
    pick = np.random.default_rng(3).choice(len(ids), 20, replace=False)
    assert s == sorted(sorted(ids)[i] for i in pick)


def test_restrict_fetches_only_one_part_of_the_split(make_server, mini: Path, tmp_path: Path) -> None:
    from mmn.data.split import split_ids, split_part

    srv = make_server()
    cache = tmp_path / "cache"
    all_ids = sorted(im["id"] for im in load_mini_json("instances", mini)["images"])
    pool = select_image_ids(all_ids, 10, 4)
    parts = split_ids(pool, 0.3, 4)
    s_eval = download_coco(_cfg(srv, subset=10), tmp_path / "eval", seed=4, cache_dir=cache, progress=False,
                           restrict=split_part("eval", 0.3, 4))
    assert _image_ids(tmp_path / "eval") == parts.eval and len(parts.eval) == 3
    assert s_eval["n_pool"] == 10 and s_eval["n_images"] == 3 and s_eval["n_fetched"] == 3
    fetched = {r.path.rsplit("/", 1)[1] for r in _image_requests(srv)}
    by_id = {im["id"]: im for im in load_mini_json("instances", mini)["images"]}
    assert fetched == {by_id[i]["file_name"] for i in parts.eval}  # the other part is not downloaded
    download_coco(_cfg(srv, subset=10), tmp_path / "train", seed=4, cache_dir=cache, progress=False,
                  restrict=split_part("train", 0.3, 4))
    assert _image_ids(tmp_path / "train") == parts.train and len(parts.train) == 7
    caps = _load(tmp_path / "train", "captions")
    assert {x["image_id"] for x in caps["annotations"]} == set(parts.train)
    with pytest.raises(ValueError, match="restrict returned ids that were not chosen"):
        download_coco(_cfg(srv, subset=10), tmp_path / "bad", seed=4, cache_dir=cache, progress=False,
                      restrict=lambda ids: [*ids[:2], -1])
    assert not (tmp_path / "bad").exists()


def test_mirror_serves_both_splits(make_server, mini: Path, tmp_path: Path) -> None:
    import zipfile

    records = load_mini_json("instances", mini)["images"]
    val = sorted(r["id"] for r in records if split_of(r) == "val2017")
    train = sorted(r["id"] for r in records if split_of(r) == "train2017")
    assert (len(val), len(train)) == (79, 21)
    merged, official = make_server(), make_server(merged_val=False)
    for srv, want_val in ((merged, sorted(val + train)), (official, val)):
        with zipfile.ZipFile(srv.site.archive) as zf:
            assert sorted(zf.namelist()) == [f"annotations/{k}_{s}.json" for k in ("captions", "instances")
                                             for s in ("train2017", "val2017")]
            for kind in ("instances", "captions"):
                got_val = json.loads(zf.read(f"annotations/{kind}_val2017.json"))
                got_train = json.loads(zf.read(f"annotations/{kind}_train2017.json"))
                assert sorted(im["id"] for im in got_val["images"]) == want_val
                assert sorted(im["id"] for im in got_train["images"]) == train
                assert {a["image_id"] for a in got_train["annotations"]} <= set(train)
                assert {a["image_id"] for a in got_val["annotations"]} <= set(want_val)
    # the official-like mirror: train2017 from /train2017/ only, val2017 from /val2017/ only
    cache = tmp_path / "cache"
    download_coco(_cfg(official, split="train2017", subset=4), tmp_path / "t", seed=0, cache_dir=cache,
                  progress=False)
    download_coco(_cfg(official, subset=4), tmp_path / "v", seed=0, cache_dir=cache, progress=False)
    paths = [r.path for r in _image_requests(official)]
    assert len(paths) == 8
    assert all(p.startswith("/train2017/") for p in paths[:4]) and all(p.startswith("/val2017/") for p in paths[4:])
    assert set(_image_ids(tmp_path / "t")) <= set(train) and set(_image_ids(tmp_path / "v")) <= set(val)


def test_truncated_image_is_detected(make_server, mini: Path, tmp_path: Path) -> None:
    victim = "000000397133.jpg"
    srv = make_server(corrupt_images=[victim])
    out = tmp_path / "coco"
    with pytest.raises(CocoDownloadError) as info:
        download_coco(_cfg(srv), out, seed=0, progress=False)
    msg = str(info.value)
    assert victim in msg and "397133" in msg and f"{srv.base_url}/val2017/{victim}" in msg
    assert "decode" in msg
    # downloaded twice, then given up (not retried forever)
    assert len(srv.requests_for(f"/val2017/{victim}")) == 2
    assert not out.exists() and _leftovers(tmp_path) == []


def test_bad_images_are_skipped_and_recorded(make_server, mini: Path, tmp_path: Path) -> None:
    """on_bad_image="skip": a corrupt and a missing (404) image are left out of the
    layout (records and annotations) and listed in skipped.csv with the reason."""
    from mmn.data.layout import CocoLayout
    from mmn.quality import check_coco_layout

    corrupt, missing = "000000397133.jpg", "000000000139.jpg"
    srv = make_server(corrupt_images=[corrupt])
    srv.faults[f"/val2017/{missing}"] = ["404"]
    out = tmp_path / "coco"
    summary = download_coco(_cfg(srv), out, seed=0, progress=False, on_bad_image="skip")
    assert summary["n_skipped"] == 2 and summary["n_images"] == 98
    lay = CocoLayout(out)
    skipped = {r["file_name"]: r for r in lay.skipped()}
    assert set(skipped) == {corrupt, missing}
    assert skipped[missing]["image_id"] == 139 and "404" in skipped[missing]["reason"]
    assert skipped[corrupt]["image_id"] == 397133 and "decode" in skipped[corrupt]["reason"]
    left = {r["id"] for r in _load(out, "instances")["images"]}
    assert len(left) == 98 and not left & {139, 397133}
    for kind in ("instances", "captions"):
        assert not {a["image_id"] for a in _load(out, kind)["annotations"]} & {139, 397133}
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(r["file_name"] for r in lay.images)
    check_coco_layout(out)  # the gate accepts it (skipped ids are not in the layout)


def test_skipped_table_gate_rejects_a_skipped_image_still_in_the_layout(make_server, tmp_path: Path) -> None:
    from mmn.data.layout import write_skipped
    from mmn.quality import QualityError, check_coco_layout

    srv = make_server()
    out = tmp_path / "coco"
    summary = download_coco(_cfg(srv, subset=3), out, seed=0, progress=False)
    assert summary["n_skipped"] == 0 and (out / "skipped.csv").read_text() == "image_id,file_name,reason\n"
    kept = _image_ids(out)[0]
    write_skipped([{"image_id": kept, "file_name": "x.jpg", "reason": "test"}], out)
    with pytest.raises(QualityError) as info:
        check_coco_layout(out)
    assert "coco_skipped" in str(info.value) and str(kept) in str(info.value)


def test_wrong_archive_sha1_is_rejected(make_server, tmp_path: Path) -> None:
    srv = make_server()
    bad = "0" * 40
    cache = tmp_path / "cache"
    cfg = _cfg(srv, annotations_sha1=bad)
    with pytest.raises(CocoDownloadError) as info:
        download_coco(cfg, tmp_path / "coco", seed=0, cache_dir=cache, progress=False)
    msg = str(info.value)
    assert f"{srv.base_url}/{ARCHIVE}" in msg and bad in msg and srv.sha1 in msg
    dest = archive_cache_path(cfg, cache)
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()
    assert not (tmp_path / "coco").exists()
    assert _image_requests(srv) == [], "images fetched although the archive was rejected"


def test_partial_archive_is_resumed_with_range(make_server, tmp_path: Path) -> None:
    srv = make_server()
    cache = tmp_path / "cache"
    cfg = _cfg(srv, subset=3)
    body = srv.site.archive.read_bytes()
    dest = archive_cache_path(cfg, cache)
    dest.parent.mkdir(parents=True)
    cut = int(len(body) * 0.4)
    dest.with_name(dest.name + ".part").write_bytes(body[:cut])

    summary = download_coco(cfg, tmp_path / "coco", seed=0, cache_dir=cache, progress=False)

    reqs = srv.requests_for(f"/{ARCHIVE}")
    assert [(r.range, r.status) for r in reqs] == [(f"bytes={cut}-", 206)]
    assert summary["archive_sha1"] == srv.sha1 and summary["n_images"] == 3
    assert dest.read_bytes() == body and not dest.with_name(dest.name + ".part").exists()


def test_cut_transfers_are_retried_and_resumed(make_server, mini: Path, tmp_path: Path) -> None:
    srv = make_server()
    image = "000000000139.jpg"
    srv.faults[f"/{ARCHIVE}"] = ["cut"]
    srv.faults[f"/val2017/{image}"] = ["503", "cut"]
    out = tmp_path / "coco"
    summary = download_coco(_cfg(srv, retries=2), out, seed=0, progress=False)

    arch = srv.requests_for(f"/{ARCHIVE}")
    assert [r.status for r in arch] == [200, 206] and arch[1].range.startswith("bytes=")
    assert summary["archive_sha1"] == srv.sha1
    img = srv.requests_for(f"/val2017/{image}")
    assert [r.status for r in img] == [503, 200, 206]
    assert (out / "images" / image).read_bytes() == (mini / "images" / image).read_bytes()


def test_rerun_after_failure_resumes(make_server, mini: Path, tmp_path: Path) -> None:
    srv = make_server()
    records = sorted(load_mini_json("instances", mini)["images"], key=lambda r: r["id"])
    last = records[-1]  # images are fetched in id order: all others are cached first
    path = f"/{split_of(last)}/{last['file_name']}"
    srv.faults[path] = ["503"] * 3
    out = tmp_path / "coco"
    with pytest.raises(CocoDownloadError) as info:
        download_coco(_cfg(srv, retries=2), out, seed=0, progress=False)
    msg = str(info.value)
    assert str(last["id"]) in msg and last["file_name"] in msg and "3 attempt(s)" in msg
    assert not out.exists()

    n_before = len(srv.requests)
    summary = download_coco(_cfg(srv, retries=2), out, seed=0, progress=False)
    fetched = [r.path for r in srv.requests[n_before:] if r.path.endswith(".jpg")]
    assert fetched == [path], "rerun fetched images that were already cached"
    assert summary["n_fetched"] == 1 and summary["n_cached"] == 99
    assert not [r for r in srv.requests[n_before:] if r.path == f"/{ARCHIVE}"], "archive fetched again"


def test_missing_image_is_not_retried(make_server, tmp_path: Path) -> None:
    srv = make_server()
    image = "000000000139.jpg"
    srv.faults[f"/val2017/{image}"] = ["404"]
    with pytest.raises(CocoDownloadError) as info:
        download_coco(_cfg(srv, retries=3), tmp_path / "coco", seed=0, progress=False)
    assert "404" in str(info.value) and image in str(info.value) and "139" in str(info.value)
    assert len(srv.requests_for(f"/val2017/{image}")) == 1


def test_truncated_annotations_json(make_server, mini: Path, tmp_path: Path) -> None:
    raw = (mini / "annotations" / "instances.json").read_bytes()
    srv = make_server(instances_bytes=raw[: len(raw) // 2])
    with pytest.raises(CocoDownloadError) as info:
        download_coco(_cfg(srv), tmp_path / "coco", seed=0, progress=False)
    msg = str(info.value)
    assert "instances_val2017.json" in msg and "not valid JSON" in msg
    assert not (tmp_path / "coco").exists()


@pytest.mark.parametrize(
    ("kind", "key"), [("instances", "categories"), ("instances", "images"), ("captions", "annotations")]
)
def test_json_missing_key(make_server, mini: Path, tmp_path: Path, kind: str, key: str) -> None:
    data = load_mini_json(kind, mini)
    del data[key]
    srv = make_server(**{f"{kind}_bytes": json.dumps(data).encode()})
    with pytest.raises(CocoDownloadError) as info:
        download_coco(_cfg(srv), tmp_path / "coco", seed=0, progress=False)
    msg = str(info.value)
    assert f"{kind}_val2017.json" in msg and repr(key) in msg and "missing" in msg
