"""The IoU experiment (Fig. 5) and category selectivity: image selection on a hand-made
annotation set, random units without replacement, the dataset-quantile threshold, the
selectivity normalisation with negative means, and the per-image statistics wiring."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import polars as pl
import pytest

# --------------------------------------------------------------------------- hand-made COCO


def _square(x: int, y: int, s: int) -> list[list[float]]:
    return [[x, y, x + s, y, x + s, y + s, x, y + s]]


def _coco(annotations: list[tuple[int, str, int]], n_images: int = 8, size: int = 32):
    """A pycocotools COCO over ``n_images`` blank images; annotations ``(image, category, iscrowd)``,
    each a square in the top-left quarter."""
    from pycocotools.coco import COCO

    cats = [{"id": 1, "name": "cat", "supercategory": "animal"}, {"id": 2, "name": "dog", "supercategory": "animal"},
            {"id": 3, "name": "person", "supercategory": "person"}]
    cid = {c["name"]: c["id"] for c in cats}
    anns = [{"id": k + 1, "image_id": img, "category_id": cid[name], "iscrowd": crowd,
             "segmentation": _square(2, 2, size // 2 - 4), "area": (size // 2 - 4) ** 2,
             "bbox": [2, 2, size // 2 - 4, size // 2 - 4]}
            for k, (img, name, crowd) in enumerate(annotations)]
    c = COCO()
    c.dataset = {"images": [{"id": i, "width": size, "height": size, "file_name": f"{i}.png"}
                            for i in range(1, n_images + 1)],
                 "annotations": anns, "categories": cats}
    with contextlib.redirect_stdout(io.StringIO()):
        c.createIndex()
    return c


HAND = [
    (1, "cat", 0),                      # only a cat            -> only_object cat, one_instance cat
    (2, "cat", 0), (2, "dog", 0),       # a cat and a dog       -> one_instance cat and dog
    (3, "cat", 0), (3, "cat", 0),       # two cats              -> neither
    (4, "cat", 1),                      # one crowd of cats     -> neither
    (5, "dog", 0),                      # only a dog            -> only_object dog, one_instance dog
    (6, "cat", 0), (6, "person", 1),    # a cat + a crowd       -> one_instance cat only
    (7, "person", 0),                   # only a person (not asked for)
]                                       # image 8: no annotation


def test_only_object_vs_one_instance_on_a_hand_made_set():
    from mmn.metrics.iou import category_images, only_object_images, single_instance_images

    coco = _coco(HAND)
    assert only_object_images(coco, ["cat", "dog"]) == {"cat": [1], "dog": [5]}
    assert single_instance_images(coco, ["cat", "dog"]) == {"cat": [1, 2, 6], "dog": [2, 5]}
    assert category_images(coco, ["cat", "dog"]) == {"cat": [1], "dog": [5]}  # default: only_object
    assert category_images(coco, ["cat"], "one_instance") == {"cat": [1, 2, 6]}
    with pytest.raises(ValueError, match="'unicorn'.*valid names"):
        only_object_images(coco, ["cat", "unicorn"])
    with pytest.raises(ValueError, match="single must be one of"):
        category_images(coco, ["cat"], "whatever")


def test_iou_images_keeps_only_images_with_a_target_and_attributions():
    from mmn.experiments.iou import iou_images

    coco = _coco(HAND)
    caps = pl.DataFrame({"image_id": [1, 2, 5, 6], "has_noun": [True, True, False, True]})
    att = pl.DataFrame({"image_id": [1, 2, 6], "rank": [0, 0, 0], "layer": [0, 0, 0], "unit": [0, 0, 0]})
    assert iou_images(coco, caps, att, ["cat", "dog"]) == {"cat": [1], "dog": []}  # 5 has no target
    assert iou_images(coco, caps, att, ["cat", "dog"], "one_instance") == {"cat": [1, 2, 6], "dog": [2]}


# --------------------------------------------------------------------------- random units


def test_random_units_without_replacement_and_excluding_the_multimodal_units():
    from mmn.experiments.iou import random_units

    units = [(3, 1), (0, 4), (3, 7), (3, 2), (0, 0)]
    for seed in range(20):
        draws = random_units(units, d_mlp=12, draws=6, rng=np.random.default_rng(seed))
        assert len(draws) == 6
        for draw in draws:
            assert [l for l, _ in draw] == [l for l, _ in units]      # aligned, same layers
            assert len(set(draw)) == len(draw)                        # no repeat within a draw
            assert not set(draw) & set(units)                         # never a multimodal unit
            assert all(0 <= u < 12 for _, u in draw)
    again = random_units(units, 12, 6, np.random.default_rng(3))
    assert again == random_units(units, 12, 6, np.random.default_rng(3))
    # a layer with exactly as many free units as needed takes all of them, in some order
    tight = random_units([(0, 0), (0, 1), (0, 2)], d_mlp=6, draws=4, rng=np.random.default_rng(0))
    assert all(sorted(u for _, u in d) == [3, 4, 5] for d in tight)
    with pytest.raises(ValueError, match="layer 0: 3 random units needed but only 2"):
        random_units([(0, 0), (0, 1), (0, 2)], d_mlp=5, draws=1, rng=np.random.default_rng(0))


def _attributions(per_image: dict[int, list[tuple[int, int]]]) -> pl.DataFrame:
    rows = [{"image_id": i, "rank": r, "layer": l, "unit": u, "patch": 0, "g": 1.0 / (r + 1)}
            for i, units in per_image.items() for r, (l, u) in enumerate(units)]
    return pl.DataFrame(rows)


def test_iou_plan_rows_are_unique_and_pass_the_gate():
    """The coco-mini failure: two multimodal units of one layer got the same random unit.
    With d_mlp = 8 and 3 units in a layer that collided almost surely before."""
    from mmn.experiments.iou import iou_plan
    from mmn.quality import check_iou

    att = _attributions({1: [(0, 1), (0, 2), (0, 3), (1, 0)], 2: [(1, 5), (1, 6), (0, 0)]})
    plan = iou_plan({"cat": [1, 2], "dog": [2]}, att, top_units=None, random_draws=5, d_mlp=8, seed=0)
    key = ["category", "image_id", "kind", "layer", "unit", "draw"]
    assert plan.height == plan.unique(subset=key).height == (4 + 3 + 3) * 6
    mm = plan.filter(pl.col("kind") == "multimodal")
    assert sorted(mm.filter(pl.col("image_id") == 1).select("layer", "unit").iter_rows()) == [(0, 1), (0, 2), (0, 3),
                                                                                              (1, 0)]
    for img in (1, 2):  # both categories of image 2 share the same random draws
        r = plan.filter((pl.col("image_id") == img) & (pl.col("kind") == "random"))
        assert not set(r.select("layer", "unit").iter_rows()) & set(
            mm.filter(pl.col("image_id") == img).select("layer", "unit").iter_rows())
    r2 = plan.filter((pl.col("image_id") == 2) & (pl.col("kind") == "random")).drop("category")
    assert r2.filter(pl.col("draw") >= 0).height == 2 * 3 * 5
    assert r2.unique().height == 3 * 5
    top2 = iou_plan({"cat": [1]}, att, top_units=2, random_draws=1, d_mlp=8, seed=0)
    assert sorted(top2.filter(pl.col("kind") == "multimodal")["unit"].to_list()) == [1, 2]  # first 2 by rank
    scored = plan.with_columns(pl.lit(0.5).alias("iou"))
    check_iou(scored)  # passes


def test_iou_gate_rejects_duplicates_and_random_units_equal_to_multimodal_ones():
    from mmn.quality import QualityError, check_iou

    base = pl.DataFrame({"image_id": [1, 1, 1], "category": ["cat"] * 3, "kind": ["multimodal", "random", "random"],
                         "draw": [0, 0, 1], "layer": [0, 0, 0], "unit": [1, 2, 3], "iou": [0.1, 0.2, 0.3]})
    check_iou(base)
    dup = pl.concat([base, base.tail(1)])
    with pytest.raises(QualityError, match="expect_compound_columns_to_be_unique") as e:
        check_iou(dup)
    lines = str(e.value).splitlines()
    header = lines[next(i for i, ln in enumerate(lines) if "sample offending rows" in ln) + 1]
    assert header.split().count("image_id") == 1  # the sample rows show image_id once
    clash = base.with_columns(pl.when(pl.col("draw") == 1).then(1).otherwise(pl.col("unit")).alias("unit"))
    with pytest.raises(QualityError, match="random_is_multimodal"):
        check_iou(clash)


# --------------------------------------------------------------------------- thresholds

def test_dataset_threshold_is_the_numpy_quantile_over_all_images():
    """grid 2x2 upsampled to 2x2 is the identity, so every mask is checkable by hand."""
    from mmn.experiments.iou import score_iou, unit_thresholds
    from mmn.metrics.iou import dataset_threshold

    a, b = np.array([0.0, 1, 2, 3], np.float32), np.array([10.0, 20, 30, 40], np.float32)
    grids = {(1, 0, 7): a, (2, 0, 7): b}
    t = float(np.quantile(np.concatenate([a, b]), 0.5))
    assert t == 6.5
    assert dataset_threshold(np.stack([a, b]), 0.5) == t
    assert unit_thresholds(grids, 0.5) == {(0, 7): t}
    mask = np.array([[False, False], [False, True]])
    plan = pl.DataFrame({"image_id": [1, 2], "category": ["cat", "cat"], "kind": ["multimodal"] * 2, "draw": [0, 0],
                         "layer": [0, 0], "unit": [7, 7]})
    masks = {(1, "cat"): mask, (2, "cat"): mask}
    ds = score_iou(plan, grids, masks, grid=2, threshold="dataset", quantile=0.5)
    # dataset: image 1 is all below 6.5 -> empty field, IoU 0; image 2 all above -> 1/4
    assert ds.sort("image_id")["iou"].to_list() == [0.0, 0.25]
    im = score_iou(plan, grids, masks, grid=2, threshold="image", quantile=0.5)
    # image: each map above its own median -> the bottom row, IoU 1/2 on both
    assert im.sort("image_id")["iou"].to_list() == [0.5, 0.5]
    with pytest.raises(ValueError, match="threshold must be one of"):
        score_iou(plan, grids, masks, grid=2, threshold="unit")


def test_needed_units_per_threshold_mode():
    from mmn.experiments.iou import needed_units

    plan = pl.DataFrame({"image_id": [1, 1, 2], "category": ["cat"] * 3, "kind": ["multimodal"] * 3,
                         "draw": [0, 0, 0], "layer": [0, 1, 1], "unit": [3, 4, 5]})
    assert needed_units(plan, "image") == {1: [(0, 3), (1, 4)], 2: [(1, 5)]}
    assert needed_units(plan, "dataset") == {1: [(0, 3), (1, 4), (1, 5)], 2: [(0, 3), (1, 4), (1, 5)]}
    # NetDissect: the dataset threshold is taken over every EVALUATED image, not only the IoU images
    every = needed_units(plan, "dataset", evaluated=[1, 2, 3, 4])
    assert sorted(every) == [1, 2, 3, 4] and every[3] == every[4] == [(0, 3), (1, 4), (1, 5)]
    assert needed_units(plan, "image", evaluated=[1, 2, 3, 4]) == {1: [(0, 3), (1, 4)], 2: [(1, 5)]}


def test_dataset_threshold_uses_the_evaluated_images_outside_the_iou_plan():
    """An evaluated image that is not an IoU image moves the unit's threshold (it is in the
    grids that needed_units asks for) but gets no IoU row of its own."""
    from mmn.experiments.iou import needed_units, score_iou

    plan = pl.DataFrame({"image_id": [1], "category": ["cat"], "kind": ["multimodal"], "draw": [0],
                         "layer": [0], "unit": [7]})
    a = np.array([0.0, 1, 2, 3], np.float32)
    other = np.array([-9.0, -9, -9, -9], np.float32)  # image 2: evaluated, no single-object cat
    mask = {(1, "cat"): np.array([[False, False], [True, True]])}
    need = needed_units(plan, "dataset", evaluated=[1, 2])
    grids = {(i, l, u): (a if i == 1 else other) for i, units in need.items() for l, u in units}
    ds = score_iou(plan, grids, mask, grid=2, threshold="dataset", quantile=0.5)
    # over both images the median is -4.5: image 1's whole map is above it, IoU 2/4; over image 1 alone it
    # would be 1.5 (the bottom row, IoU 1)
    assert ds["image_id"].to_list() == [1] and ds["iou"].to_list() == [0.5]
    alone = score_iou(plan, {(1, 0, 7): a}, mask, grid=2, threshold="dataset", quantile=0.5)
    assert alone["iou"].to_list() == [1.0]


# --------------------------------------------------------------------------- selectivity

def test_selectivity_keeps_the_order_of_negative_means():
    from mmn.experiments.iou import selectivity_table

    plan = pl.DataFrame({"source_category": ["cat", "cat"], "layer": [0, 1], "unit": [5, 2], "frequency": [3, 1]})
    images = {"cat": [1], "dog": [2, 3], "bus": [4]}
    # unit (0, 5): means cat -1, dog -3, bus -2 (all negative: max = -1, dividing by it would invert)
    # unit (1, 2): mixed signs cat 0.5, dog -2, bus 1
    vals = {(0, 5): {1: -1.0, 2: -2.0, 3: -4.0, 4: -2.0}, (1, 2): {1: 0.5, 2: -3.0, 3: -1.0, 4: 1.0}}
    means = pl.DataFrame([{"image_id": i, "layer": l, "unit": u, "mean_activation": v}
                          for (l, u), d in vals.items() for i, v in d.items()])
    t = selectivity_table(plan, images, means, ["cat", "dog", "bus"])
    for (l, u), expect in {(0, 5): [-1 / 3, -1.0, -2 / 3], (1, 2): [0.25, -1.0, 0.5]}.items():
        sub = t.filter((pl.col("layer") == l) & (pl.col("unit") == u))
        assert sub["category"].to_list() == ["cat", "dog", "bus"]
        np.testing.assert_allclose(sub["normalised"].to_numpy(), expect)
        raw, norm = sub["mean_activation"].to_numpy(), sub["normalised"].to_numpy()
        assert list(np.argsort(raw)) == list(np.argsort(norm))  # same ordering as the raw means
    zero = selectivity_table(plan.head(1), {"cat": [1]}, means.with_columns(pl.lit(0.0).alias("mean_activation")),
                             ["cat"])
    assert zero["normalised"].to_list() == [None]


# --------------------------------------------------------------------------- statistics wiring

def _scored_rows() -> pl.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    # images 1-5: cat; 6-9: dog; image 10 in both (one_instance reading)
    for img in range(1, 11):
        for cat in (["cat"] if img <= 5 else ["dog"]) + (["cat"] if img == 10 else []):
            for j in range(3):
                rows.append((img, cat, "multimodal", 0, 0, j, float(rng.uniform(0.2, 0.6))))
                for d in range(2):
                    rows.append((img, cat, "random", d, 0, 10 + j + 3 * d, float(rng.uniform(0.0, 0.3))))
    schema = {"image_id": pl.Int64, "category": pl.Utf8, "kind": pl.Utf8, "draw": pl.Int64, "layer": pl.Int64,
              "unit": pl.Int64, "iou": pl.Float64}
    return pl.DataFrame(rows, schema=schema, orient="row")


def _hand_per_image(df: pl.DataFrame, cat: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Independent per-image values: plain Python over the rows."""
    acc: dict[tuple[int, str, str], list[float]] = {}
    for r in df.iter_rows(named=True):
        if cat is None or r["category"] == cat:
            acc.setdefault((r["image_id"], r["category"], r["kind"]), []).append(r["iou"])
    per_cat = {k: sum(v) / len(v) for k, v in acc.items()}
    out: dict[int, dict[str, list[float]]] = {}
    for (img, _, kind), v in per_cat.items():
        out.setdefault(img, {}).setdefault(kind, []).append(v)
    imgs = sorted(out)
    return (np.array([np.mean(out[i]["multimodal"]) for i in imgs]),
            np.array([np.mean(out[i]["random"]) for i in imgs]))


def test_summary_and_category_table_are_bootstrap_and_paired_test_of_per_image_values():
    import json

    from mmn.experiments.iou import category_table, iou_summary
    from mmn.metrics.stats import bootstrap_ci, paired_test

    df = _scored_rows()
    m = iou_summary(df, ["cat", "dog", "bus"])
    mm, rnd = _hand_per_image(df, None)
    assert m["n_images"] == 10 == len(mm)
    assert m["overall"]["multimodal"] == pytest.approx(bootstrap_ci(mm), rel=1e-12)
    assert m["overall"]["random"] == pytest.approx(bootstrap_ci(rnd), rel=1e-12)
    assert m["multimodal_vs_random"] == pytest.approx(paired_test(mm, rnd), rel=1e-12)
    assert m["per_category"] == {"cat": 6, "dog": 5, "bus": 0} and m["n_categories"] == 2
    ok = json.loads(json.dumps(m))  # numbers only (and nested dicts)
    leaves = []

    def walk(o):
        for v in o.values():
            walk(v) if isinstance(v, dict) else leaves.append(v)
    walk(ok)
    assert all(v is None or isinstance(v, (int, float)) for v in leaves) and len(leaves) <= 40

    t = category_table(df, ["cat", "dog", "bus"])
    assert t["category"].to_list() == ["cat", "dog"]  # bus has no image: not in the table
    for cat in ("cat", "dog"):
        row = t.filter(pl.col("category") == cat).row(0, named=True)
        a, b = _hand_per_image(df, cat)
        ci_a, ci_b, test = bootstrap_ci(a), bootstrap_ci(b), paired_test(a, b)
        assert row["n_images"] == len(a)
        close = pytest.approx
        assert (row["multimodal"], row["multimodal_lo"], row["multimodal_hi"]) == close(
            (ci_a["mean"], ci_a["lo"], ci_a["hi"]), rel=1e-12)
        assert (row["random"], row["random_lo"], row["random_hi"]) == close((ci_b["mean"], ci_b["lo"], ci_b["hi"]),
                                                                            rel=1e-12)
        assert (row["diff"], row["diff_lo"], row["diff_hi"], row["p"]) == close(
            (test["diff"], test["lo"], test["hi"], test["p"]), rel=1e-12)
        assert row["multimodal_lo"] <= row["multimodal"] <= row["multimodal_hi"]


def test_per_image_iou_does_not_depend_on_the_row_order():
    """Means over units and over an image's categories sum in one fixed order: a permuted table
    gives the same bits."""
    from mmn.experiments.iou import per_image_iou

    rng = np.random.default_rng(1)
    rows = [(img, cat, kind, d, 0, u, round(float(rng.random()), 6))
            for img in range(40) for cat in ("cat", "dog", "bus")
            for kind, draws in (("multimodal", 1), ("random", 5)) for d in range(draws) for u in range(15)]
    df = pl.DataFrame(rows, schema=_scored_rows().schema, orient="row")
    for by_category in (False, True):
        ref = per_image_iou(df, by_category)
        for seed in range(3):
            got = per_image_iou(df[np.random.default_rng(seed).permutation(df.height).tolist()], by_category)
            assert got.rows() == ref.rows(), (by_category, seed)


def test_fig5_bars_draw_the_category_cis():
    from mmn.experiments.iou import category_table
    from mmn.plots.tables import iou_bars

    df = _scored_rows()
    bars = iou_bars(df, ["dog", "cat"])
    assert bars["category"].to_list() == ["dog", "dog", "cat", "cat"]
    t = category_table(df, ["dog", "cat"])
    for r in bars.iter_rows(named=True):
        row = t.filter(pl.col("category") == r["category"]).row(0, named=True)
        k = r["kind"]
        assert (r["n"], r["iou"], r["lo"], r["hi"]) == (row["n_images"], row[k], row[f"{k}_lo"], row[f"{k}_hi"])


# --------------------------------------------------------------------------- with a tiny model

def test_collect_activations_and_score_on_a_tiny_model(tiny_adapters):
    import torch
    from torch import nn

    from mmn.experiments.iou import collect_activations, grids_dict, iou_plan, needed_units, score_iou
    from mmn.metrics.iou import iou, receptive_field, threshold_map
    from mmn.models.prefix_lm import ImagePrefixLM
    from mmn.neurons.activations import image_activations

    ad, tok = tiny_adapters["llama"]
    torch.manual_seed(0)
    plm = ImagePrefixLM(ad, tok, nn.Linear(12, ad.d_model))
    feats = {i: torch.randn(1, 9, 12) * 2 for i in (1, 2, 3)}

    class Enc:
        grid = 3

        def encode(self, images):
            return feats[images[0]]

    plm.encoder = Enc()
    att = _attributions({1: [(0, 1), (1, 2)], 2: [(1, 3)]})
    plan = iou_plan({"cat": [1, 2]}, att, top_units=None, random_draws=2, d_mlp=ad.d_mlp, seed=0)
    need = needed_units(plan, "image")
    grids, means = collect_activations(need, [(0, 4)], {2, 3}, lambda i: i, plm, progress=False)
    g = grids_dict(grids)
    full = {i: image_activations(plm, plm.soft_tokens(feats[i])) for i in (1, 2, 3)}
    assert set(g) == {(i, l, u) for i, us in need.items() for l, u in us}
    for (i, l, u), a in g.items():
        np.testing.assert_allclose(a, full[i][l, :, u].numpy(), rtol=1e-6)
    assert sorted(means["image_id"].to_list()) == [2, 3]
    for i, l, u, v in means.iter_rows():
        assert v == pytest.approx(float(full[i][l, :, u].mean()), rel=1e-6)
    # two shards together give the one-process frames
    parts = [collect_activations(need, [(0, 4)], {2, 3}, lambda i: i, plm, progress=False, shard=(r, 2))
             for r in range(2)]
    merged = pl.concat([p[0] for p in parts]).sort(["image_id", "layer", "unit"])
    assert merged.equals(grids.sort(["image_id", "layer", "unit"]))
    mask = np.zeros((6, 6), bool)
    mask[:3, :3] = True
    df = score_iou(plan, g, {(1, "cat"): mask, (2, "cat"): mask}, grid=3)
    for r in df.iter_rows(named=True):
        field = threshold_map(receptive_field(full[r["image_id"]][r["layer"], :, r["unit"]].reshape(3, 3), (6, 6)))
        assert r["iou"] == pytest.approx(iou(field, mask))
