"""Training images apart from evaluated images: the seeded split, split.json, the
disjointness gate and the stages download_coco + download_train in every mode.

Stage tests run the click commands in-process (PYTHONHASHSEED=0, so no re-exec) on the
embedded sample or on the 127.0.0.1 coco-mini mirror (tests/coco_server.py) at small size.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO
from helpers.download_stages import Run
from helpers.download_stages import ok as _ok
from coco_server import coco_server_factory, local_only, require_coco_mini, split_of  # noqa: F401 - fixture
from mmn.data.coco import select_image_ids
from mmn.data.layout import CocoLayout, LayoutError
from mmn.data.sample import materialize_sample, sample_image_ids
from mmn.data.split import (
    SPLIT_FILE,
    SplitError,
    n_held_out,
    read_split_info,
    seeded_split,
    split_ids,
    split_part,
    write_split_info,
)
from mmn.params import parse_params
from mmn.quality import QualityError, check_train_eval_disjoint

pytestmark = pytest.mark.timeout(180)


# ----------------------------------------------------------------------------- the split


@pytest.mark.parametrize("n, holdout", [(7, 0.2), (7, 0.3), (100, 0.2), (21, 0.5), (2, 0.9), (1000, 0.05)])
def test_split_is_disjoint_covers_all_and_has_the_holdout_fraction(n: int, holdout: float) -> None:
    ids = list(np.random.default_rng(n).choice(10**9, size=n, replace=False))
    s = split_ids(ids, holdout, seed=3)
    assert set(s.train).isdisjoint(s.eval)
    assert sorted(s.train + s.eval) == sorted(int(i) for i in ids)
    assert s.train == sorted(s.train) and s.eval == sorted(s.eval)
    # holdout * n rounded half up, within [1, n - 1]
    want = min(max(int(holdout * n + 0.5), 1), n - 1)
    assert len(s.eval) == want == n_held_out(n, holdout)
    if 1 <= holdout * n <= n - 1:  # not clamped: the nearest whole number of images
        assert abs(len(s.eval) - holdout * n) <= 0.5


def test_split_is_seeded_and_depends_only_on_the_id_set() -> None:
    ids = list(range(1000, 1100))
    a = split_ids(ids, 0.2, seed=0)
    assert split_ids(list(reversed(ids)) + ids[:5], 0.2, seed=0) == a  # order, duplicates: no effect
    b = split_ids(ids, 0.2, seed=1)
    assert b.eval != a.eval  # another seed, another split (C(100, 20) choices)
    # not simply the first/last ids: a random draw spreads over the range
    assert min(a.eval) < 1050 < max(a.eval)
    # the split's stream is not the subset's: same seed, different draw than select_image_ids
    assert a.eval != select_image_ids(ids, 20, seed=0)


@pytest.mark.parametrize("n, n_held, seed", [(7, 1, 0), (7, 3, 5), (100, 20, 1), (2, 1, 9), (5, 0, 0), (5, 5, 2)])
def test_seeded_split_is_the_python_random_sample_of_the_sorted_ids(n: int, n_held: int, seed: int) -> None:
    """The one seeded split against an independent computation: Random(seed).sample over the sorted ids."""
    import random

    ids = [int(i) for i in np.random.default_rng(n).choice(10**6, size=n, replace=False)]
    held = sorted(random.Random(seed).sample(sorted(ids), n_held))
    s = seeded_split(list(reversed(ids)) + ids[:2], n_held, seed)  # order and duplicates: no effect
    assert s.eval == held and s.train == sorted(set(ids) - set(held))
    assert split_ids(ids, 0.3, seed) == seeded_split(ids, n_held_out(len(ids), 0.3), seed)
    with pytest.raises(SplitError, match="cannot hold out"):
        seeded_split(ids, n + 1, seed)


def test_the_default_run_splits_exactly_as_before_the_unification() -> None:
    """params.yaml's default profile trains on the evaluated images (``split_ids`` is never
    called) and cuts the 7-image sample into fit/validation with ``split_train_val``: the
    unified :func:`seeded_split` reproduces the ids of that call's former body (inlined here),
    so data/projection and every downstream result keep their bytes."""
    import random

    from mmn.projection_training import split_train_val

    params = parse_params(yaml.safe_load((REPO / "params.yaml").read_text()), REPO / "params.yaml")
    assert params.train_data == "eval"  # download_coco/download_train call split_ids only under `split`
    tp, ids = params.train_loop, sample_image_ids()

    def before(image_ids, val_fraction, val_max, seed):  # split_train_val up to commit ad262dc
        ids = sorted(int(i) for i in image_ids)
        n_val = 0
        if val_fraction > 0 and len(ids) >= 2:
            n_val = min(val_max, max(1, round(val_fraction * len(ids))), len(ids) - 1)
        val = sorted(random.Random(seed).sample(ids, n_val))
        return [i for i in ids if i not in set(val)], val

    got = split_train_val(ids, tp.val_fraction, tp.val_max_images, params.seed)
    assert got == before(ids, tp.val_fraction, tp.val_max_images, params.seed)
    metrics = json.loads((REPO / "summary" / "projection.json").read_text())  # the committed full results
    assert (len(got[0]), len(got[1])) == (metrics["n_train_images"], metrics["n_val_images"])
    for seed in range(20):  # and beyond the default seed, on the same ids
        assert split_train_val(ids, 0.2, 64, seed) == before(ids, 0.2, 64, seed)
        assert split_train_val(ids, 0.5, 2, seed) == before(ids, 0.5, 2, seed)


def test_split_parts_agree_with_the_split() -> None:
    ids = [5, 3, 9, 11, 2, 8, 13, 21]
    s = split_ids(ids, 0.25, seed=4)
    assert split_part("train", 0.25, 4)(ids) == s.train
    assert split_part("eval", 0.25, 4)(ids) == s.eval
    with pytest.raises(ValueError, match="part must be"):
        split_part("test", 0.25, 4)  # type: ignore[arg-type]


@pytest.mark.parametrize("ids, holdout, match", [([1], 0.2, "at least 2 images"), ([], 0.2, "at least 2"),
                                                 ([1, 2, 3], 0.0, "holdout"), ([1, 2, 3], 1.0, "holdout")])
def test_split_rejects_what_cannot_be_split(ids, holdout, match) -> None:
    with pytest.raises(SplitError, match=match):
        split_ids(ids, holdout, seed=0)


def test_split_info_round_trip_and_errors(tmp_path: Path) -> None:
    info = write_split_info(tmp_path, "split", [9, 4, 7], n_eval=2)
    assert info.held_out is True and info.train_ids == [4, 7, 9] and info.n_train == 3
    assert json.loads((tmp_path / SPLIT_FILE).read_text()) == {
        "mode": "split", "held_out": True, "n_train": 3, "n_eval": 2, "train_ids": [4, 7, 9]}
    assert read_split_info(tmp_path) == info
    assert write_split_info(tmp_path, "eval", [1, 2], n_eval=2).held_out is False
    bad = {"mode": "eval", "held_out": True, "n_train": 1, "n_eval": 1, "train_ids": [1]}
    (tmp_path / SPLIT_FILE).write_text(json.dumps(bad))
    with pytest.raises(SplitError, match=r"split\.json: 'held_out' is True under mode 'eval'"):
        read_split_info(tmp_path)
    (tmp_path / SPLIT_FILE).write_text(json.dumps({**bad, "held_out": False, "n_train": 2}))
    with pytest.raises(SplitError, match="'n_train' is 2 but 'train_ids' has 1"):
        read_split_info(tmp_path)
    (tmp_path / SPLIT_FILE).write_text(json.dumps({k: v for k, v in bad.items() if k != "n_eval"}))
    with pytest.raises(SplitError, match="missing key 'n_eval'"):
        read_split_info(tmp_path)
    with pytest.raises(SplitError, match="unknown projection.train.data"):
        write_split_info(tmp_path, "all", [1], n_eval=1)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- sample subsets + gate


def _ids(root: Path) -> list[int]:
    return [r["id"] for r in CocoLayout(root).images]


def test_materialize_sample_keeps_only_the_given_images(tmp_path: Path) -> None:
    all_ids = sample_image_ids()
    keep = all_ids[1:4]
    materialize_sample(tmp_path / "part", image_ids=keep)
    lay = CocoLayout(tmp_path / "part")
    assert _ids(lay.root) == keep
    assert sorted(p.name for p in lay.images_dir.iterdir()) == sorted(lay.image_by_id[i]["file_name"] for i in keep)
    assert {a["image_id"] for a in lay.instances["annotations"]} == set(keep)
    assert {a["image_id"] for a in lay.captions_json["annotations"]} == set(keep)
    assert all(len(lay.captions[i]) == 5 for i in keep)
    with pytest.raises(LayoutError, match=r"image id\(s\) \[123456789\] are not in the sample"):
        materialize_sample(tmp_path / "bad", image_ids=[all_ids[0], 123456789])
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def sample_parts(tmp_path_factory) -> tuple[Path, Path, Path, list[int]]:
    """Three sample layouts: ids[:4], ids[4:], ids[2:6] (overlapping the first in ids[2:4])."""
    root = tmp_path_factory.mktemp("parts")
    ids = sample_image_ids()
    for name, part in (("a", ids[:4]), ("b", ids[4:]), ("c", ids[2:6])):
        materialize_sample(root / name, image_ids=part)
    return root / "a", root / "b", root / "c", ids


def test_gate_passes_disjoint_layouts(sample_parts) -> None:
    a, b, _, _ = sample_parts
    assert check_train_eval_disjoint(b, a) == []


def test_gate_rejects_an_overlapping_layout_and_names_the_ids(sample_parts) -> None:
    a, _, c, ids = sample_parts
    with pytest.raises(QualityError) as e:
        check_train_eval_disjoint(c, a)
    msg = str(e.value)
    assert e.value.suite == "train_eval_disjoint"
    assert f"2 of the 4 training images in {c}" in msg and str(a) in msg
    assert f"image id(s) {ids[2]}, {ids[3]}" in msg
    for i in ids[:2] + ids[4:6]:  # only the overlapping ids are named as such
        assert f"image id(s) {i}" not in msg and f", {i}\n" not in msg
    assert e.value.failures and e.value.failures[0].type == "expect_column_values_to_not_be_in_set"
    # eval mode: allowed, the overlap is returned for the loud log line
    assert check_train_eval_disjoint(c, a, allow_overlap=True) == ids[2:4]


# ----------------------------------------------------------------------------- params


def _raw_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_defaults_and_laptop_profile_resolve() -> None:
    raw = _raw_params()
    p = parse_params(raw)
    assert p.profile == "embedded" and p.train_data == "eval"  # the offline 7-image default, flagged
    assert p.model.data_source == "sample"
    lap = parse_params({**raw, "profile": "laptop"})
    emb = lap.profiles["embedded"]
    assert lap.model.data_source == "coco" and lap.train_data == "coco-train"
    assert (lap.model.lm, lap.model.encoder, lap.model.bert_model) == (emb.lm, emb.encoder, emb.bert_model)
    assert lap.coco_train.split == "train2017" and 1000 <= lap.coco_train.subset <= 10000
    assert lap.coco_eval.split == "val2017" and 100 <= lap.coco_eval.subset < 1000
    assert lap.coco_train.base_url == lap.coco_eval.base_url == raw["data"]["coco"]["base_url"]
    # without the profile keys the global ones apply
    assert p.coco_eval == p.data.coco and p.coco_train.subset == raw["projection"]["train"]["subset"]
    # the training loop: global keys for the 7-image default except its float64 training (thread-invariant
    # projection), the laptop profile's overrides (bfloat16: the global dtype)
    assert p.projection.train.dtype == "bfloat16" and p.model.train_dtype == "float64"
    assert p.train_loop == p.projection.train.model_copy(update={"dtype": "float64"})
    assert lap.train_loop.dtype == "bfloat16"
    lt = lap.train_loop
    assert (lt.max_steps, lt.batch_size, lt.views) == (lap.model.train_max_steps, lap.model.train_batch_size,
                                                       lap.model.train_views) != (None, None, None)
    assert (lt.lr, lt.patience) == (lap.projection.train.lr, lap.projection.train.patience)
    with pytest.raises(ValueError, match="projection.train.data"):
        parse_params({**raw, "projection": {"train": {**raw["projection"]["train"], "data": "all"}}})
    with pytest.raises(ValueError, match="projection.train.holdout"):
        parse_params({**raw, "projection": {"train": {**raw["projection"]["train"], "holdout": 1.0}}})


# ----------------------------------------------------------------------------- stages


@pytest.fixture(autouse=True)
def _no_reexec_local_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONHASHSEED", "0")  # stage_main re-execs otherwise
    local_only(monkeypatch)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_stage_eval_mode_on_sample_copies_the_layout_and_says_so(tmp_path: Path) -> None:
    run = Run(tmp_path, **{"projection.train.data": "eval"})
    _ok(run.coco())
    out = _ok(run.train())
    assert _tree_digest(run.eval_dir) == {k: v for k, v in _tree_digest(run.train_dir).items() if k != SPLIT_FILE}
    ids = _ids(run.eval_dir)
    assert run.split_info() == {"mode": "eval", "held_out": False, "n_train": len(ids), "n_eval": len(ids),
                                "train_ids": ids}
    assert "WARNING: projection.train.data = eval" in out and "held_out: false" in out
    assert f"({len(ids)} images of {run.eval_dir}/)" in out


def test_stage_split_mode_on_sample_keeps_the_parts_apart(tmp_path: Path) -> None:
    run = Run(tmp_path, **{"projection.train.data": "split", "projection.train.holdout": 0.3, "seed": 5})
    _ok(run.coco())
    out = _ok(run.train())
    assert "WARNING" not in out
    evald, trained, every = _ids(run.eval_dir), _ids(run.train_dir), sample_image_ids()
    assert len(evald) == 2 and len(trained) == 5  # 0.3 * 7 = 2.1 -> 2 evaluated
    assert set(evald).isdisjoint(trained) and sorted(evald + trained) == every
    assert (evald, trained) == (split_ids(every, 0.3, 5).eval, split_ids(every, 0.3, 5).train)
    assert run.split_info() == {"mode": "split", "held_out": True, "n_train": 5, "n_eval": 2, "train_ids": trained}
    assert read_split_info(run.train_dir).held_out is True


def test_stage_coco_train_on_sample_fails_clearly(tmp_path: Path) -> None:
    run = Run(tmp_path, **{"projection.train.data": "coco-train"})
    _ok(run.coco())
    r = run.train()
    assert r.exit_code == 1
    assert "[download_train] error: projection.train.data: coco-train needs the profile's data_source to be coco" \
        in r.output
    assert not run.train_dir.exists() and not list(tmp_path.glob("data/.tmp-*"))


def test_stage_without_eval_layout_fails_clearly(tmp_path: Path) -> None:
    run = Run(tmp_path)
    r = run.train()
    assert r.exit_code == 1 and f"[download_train] error: {run.eval_dir}: input does not exist" in r.output
    run.eval_dir.mkdir(parents=True)  # present but not a COCO layout: the layout's own error names the file
    r = run.train()
    assert r.exit_code == 1 and "[download_train] error:" in r.output and "instances.json" in r.output


def _mirror(run: Run, srv, **over) -> Run:
    """Point ``run``'s params at the mirror (then apply ``over``)."""
    return Run(run.root, **{"profile": "embedded", "profiles.embedded.data_source": "coco",
                            "data.coco.base_url": srv.base_url, "data.coco.annotations_sha1": srv.sha1,
                            "data.coco.timeout_s": 10.0, "data.coco.retries": 1, **over})


def _image_paths(srv, start: int = 0) -> list[str]:
    return [r.path for r in srv.requests[start:] if r.path.endswith(".jpg")]


def test_stage_coco_train_on_mirror_fetches_only_train_images(tmp_path: Path, coco_server_factory) -> None:  # noqa: F811
    mini = require_coco_mini()
    srv = coco_server_factory(merged_val=False)  # as the official server: val JSON = val images only
    run = _mirror(Run(tmp_path), srv, **{"data.coco.subset": 5, "projection.train.data": "coco-train",
                                         "projection.train.subset": 6, "seed": 2})
    _ok(run.coco())
    before, n_req = _tree_digest(run.eval_dir), len(srv.requests)
    out = _ok(run.train())
    assert _tree_digest(run.eval_dir) == before  # data/coco untouched

    records = json.loads((mini / "annotations" / "instances.json").read_text())["images"]
    train_pool = sorted(r["id"] for r in records if split_of(r) == "train2017")
    assert len(train_pool) == 21
    trained = _ids(run.train_dir)
    assert trained == select_image_ids(train_pool, 6, seed=2)
    fetched = _image_paths(srv, n_req)
    assert len(fetched) == 6 and all(p.startswith("/train2017/") for p in fetched), fetched
    evald = _ids(run.eval_dir)
    assert len(evald) == 5 and set(evald).isdisjoint(trained)
    assert run.split_info() == {"mode": "coco-train", "held_out": True, "n_train": 6, "n_eval": 5,
                                "train_ids": trained}
    by_id = {r["id"]: r for r in records}
    for i in trained:  # byte-identical to coco-mini, captions of the train JSON
        name = by_id[i]["file_name"]
        assert (run.train_dir / "images" / name).read_bytes() == (mini / "images" / name).read_bytes()
        assert len(CocoLayout(run.train_dir).captions[i]) >= 5
    assert "held_out=true" in out and "WARNING" not in out


def test_stage_gate_rejects_training_images_that_are_evaluated(tmp_path: Path, coco_server_factory) -> None:  # noqa: F811
    srv = coco_server_factory(merged_val=False)
    # misconfiguration: evaluation drawn from train2017 too, so 4 evaluated images are trained on
    run = _mirror(Run(tmp_path), srv, **{"data.coco.split": "train2017", "data.coco.subset": 4,
                                         "projection.train.data": "coco-train", "projection.train.subset": 0})
    _ok(run.coco())
    evald = _ids(run.eval_dir)
    r = run.train()
    assert r.exit_code == 1, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("[download_train] error:"))
    assert "data-quality gate 'train_eval_disjoint' failed: 4 of the 21 training images" in line
    assert "image id(s) " + ", ".join(map(str, evald)) in line
    assert f"training images in {run.train_dir}/ are also evaluated in {run.eval_dir}:" in line
    assert "Traceback" not in r.output
    assert not run.train_dir.exists()


def test_stage_split_mode_on_mirror(tmp_path: Path, coco_server_factory) -> None:  # noqa: F811
    srv = coco_server_factory()  # merged val JSON: all 100 coco-mini images
    run = _mirror(Run(tmp_path), srv, **{"data.coco.subset": 20, "projection.train.data": "split",
                                         "projection.train.holdout": 0.25, "seed": 1})
    _ok(run.coco())
    _ok(run.train())
    all_ids = [r["id"] for r in srv.site.images]
    pool = select_image_ids(all_ids, 20, seed=1)
    evald, trained = _ids(run.eval_dir), _ids(run.train_dir)
    assert evald == split_ids(pool, 0.25, 1).eval and len(evald) == 5
    assert trained == split_ids(pool, 0.25, 1).train and len(trained) == 15
    assert run.split_info()["n_eval"] == 5 and run.split_info()["held_out"] is True


def test_stage_eval_mode_on_mirror(tmp_path: Path, coco_server_factory) -> None:  # noqa: F811
    srv = coco_server_factory()
    run = _mirror(Run(tmp_path), srv, **{"data.coco.subset": 3, "projection.train.data": "eval"})
    _ok(run.coco())
    n_req = len(srv.requests)
    out = _ok(run.train())
    assert len(srv.requests) == n_req  # nothing fetched: a copy of data/coco
    info = run.split_info()
    assert info["held_out"] is False and info["train_ids"] == _ids(run.eval_dir) and info["n_eval"] == 3
    assert "WARNING: projection.train.data = eval" in out


def test_laptop_profile_at_small_size_on_mirror(tmp_path: Path, coco_server_factory) -> None:  # noqa: F811
    """`-S profile=laptop` alone switches both stages: val2017 evaluated, train2017 trained on."""
    srv = coco_server_factory(merged_val=False)
    run = Run(tmp_path, **{"profile": "laptop", "data.coco.base_url": srv.base_url,
                           "data.coco.annotations_sha1": srv.sha1, "profiles.laptop.train_subset": 7,
                           "profiles.laptop.eval_subset": 4})
    _ok(run.coco())
    _ok(run.train())
    evald, trained = _ids(run.eval_dir), _ids(run.train_dir)
    by_id = {r["id"]: r for r in srv.site.images}
    assert len(evald) == 4 and all(split_of(by_id[i]) == "val2017" for i in evald)
    assert len(trained) == 7 and all(split_of(by_id[i]) == "train2017" for i in trained)
    assert run.split_info()["mode"] == "coco-train" and run.split_info()["held_out"] is True
