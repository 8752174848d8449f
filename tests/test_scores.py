"""Table 1 / Table 2 scoring (mmn.experiments.scores): plans, per-image summaries, statistics."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import scipy.stats
import torch
from torch import nn

from helpers.fakes import FakeEncoder
from mmn.experiments import scores as S

# ----------------------------------------------------------------------------- fixtures


def _units(n_images: int = 5, k: int = 4) -> pl.DataFrame:
    """Image i has units (i, 0..k-1) (distinct across images); even units are interpretable."""
    rows = [(100 + i, j, i, j, f"tok{i}_{j}", j % 2 == 0) for i in range(n_images) for j in range(k)]
    return pl.DataFrame(rows, schema={"image_id": pl.Int64, "order": pl.Int64, "layer": pl.Int64,
                                      "unit": pl.Int64, "decoded": pl.Utf8, "interpretable": pl.Boolean},
                        orient="row")


def test_image_units_distinct_in_rank_order_and_missing_decoding_named():
    att = pl.DataFrame({"image_id": [1, 1, 1, 1, 2], "rank": [0, 1, 2, 3, 0],
                        "layer": [3, 3, 1, 2, 3], "unit": [7, 7, 5, 9, 7], "patch": [0, 4, 2, 2, 1]})
    neu = pl.DataFrame({"layer": [3, 1, 2], "unit": [7, 5, 9], "decoded": ["a", "b", "c"],
                        "interpretable": [True, False, True]})
    u = S.image_units(att, neu)
    assert u.filter(pl.col("image_id") == 1).select("layer", "unit").rows() == [(3, 7), (1, 5), (2, 9)]
    assert u.filter(pl.col("image_id") == 1)["order"].to_list() == [0, 1, 2]
    with pytest.raises(ValueError, match="layer 2 unit 9"):
        S.image_units(att, neu.filter(pl.col("unit") != 9))


def test_table1_plan_all_units_derangements_and_matched_interpretable_baseline():
    units = _units()
    plan, touched = S.table1_plan(units, random_draws=3, seed=0)
    assert touched == dict.fromkeys(touched, 0)  # no unit shared between images here
    own = {i: set(units.filter(pl.col("image_id") == i).select("layer", "unit").rows()) for i in range(100, 105)}
    by_layer = {next(iter(v))[0]: i for i, v in own.items()}  # layer encodes the source image
    mm = plan.filter(pl.col("item") == "multimodal_all")
    assert mm.group_by("image_id").len()["len"].to_list() == [4] * 5  # ALL top units, no cap
    mi = plan.filter(pl.col("item") == "multimodal_interpretable")
    assert set(mi["unit"].to_list()) == {0, 2} and mi.height == 10
    rp = plan.filter(pl.col("item") == "random_pairing")
    for (img, d), g in rp.group_by("image_id", "draw"):
        got = set(g.select("layer", "unit").rows())
        src = by_layer[g["layer"][0]]
        assert src != img and got == own[src]  # another image's full unit set
    # a derangement per draw: every image is a partner exactly once
    for d, g in rp.group_by("draw"):
        assert sorted({by_layer[x] for x in g["layer"].to_list()}) == list(range(100, 105))
    ri = plan.filter(pl.col("item") == "random_pairing_interpretable")
    assert ri["draw"].n_unique() == 3
    for (img, d), g in ri.group_by("image_id", "draw"):
        assert g.height == 2  # count-matched to the image's 2 interpretable units
        assert all(u % 2 == 0 for u in g["unit"].to_list())  # drawn from interpretable units
        assert all(by_layer[x] != img for x in g["layer"].to_list())  # of other images
    assert plan.equals(S.table1_plan(units, random_draws=3, seed=0)[0])
    assert not plan.equals(S.table1_plan(units, random_draws=3, seed=1)[0])


def test_random_pairing_never_scores_an_image_with_its_own_units():
    """Units shared between images' top lists: every baseline set of an image holds none of its
    own units; random_pairing keeps the partner's count (a shared unit replaced by another
    image's unit); the matched interpretable baseline keeps m; the touched draws are counted."""
    units = _units(n_images=4, k=4)
    shared = (0, 0)  # image 100's unit (layer 0, unit 0), an interpretable one, also in every other top list
    extra = pl.DataFrame([(100 + i, 4, *shared, "tok0_0", True) for i in range(1, 4)], schema=units.schema,
                         orient="row")
    units = pl.concat([units, extra]).sort("image_id", "order")
    own = {i: set(units.filter(pl.col("image_id") == i).select("layer", "unit").rows()) for i in range(100, 104)}
    plan, touched = S.table1_plan(units, random_draws=4, seed=0)
    for item in ("random_pairing", "random_pairing_interpretable"):
        for (img, d), g in plan.filter(pl.col("item") == item).group_by("image_id", "draw"):
            got = g.select("layer", "unit").rows()
            assert not set(got) & own[img] and len(set(got)) == len(got), (item, img, d)
            m = int(units.filter(pl.col("image_id") == img)["interpretable"].sum())
            if item == "random_pairing_interpretable":
                assert len(got) == m
    rp = plan.filter(pl.col("item") == "random_pairing")
    sizes = {i: len(v) for i, v in own.items()}
    # every image's partner set keeps its size: 4 for image 100, 5 for the others
    assert sorted(rp.group_by("image_id", "draw").len()["len"].to_list()) == sorted(
        sizes[p] for d in range(4) for p in _partners(rp, d, own))
    # the shared unit is in every image's list: every draw of every image touched it once
    assert touched["random_pairing_draws"] == touched["random_pairing_units"] == 4 * 4
    assert touched["random_pairing_interpretable_draws"] == 4 * 4


def _partners(rp: pl.DataFrame, draw: int, own: dict) -> list[int]:
    """The partner image of each image in one draw: the image whose own units its set mostly holds."""
    out = []
    for img, g in rp.filter(pl.col("draw") == draw).group_by("image_id"):
        got = set(g.select("layer", "unit").rows())
        out.append(max((i for i in own if i != img[0]), key=lambda i: len(got & own[i])))
    return out


def _long(values: dict[tuple[str, int, int, int], float]) -> pl.DataFrame:
    rows = [{"table": "table2" if item in S.PROMPT_ITEMS else "table1", "item": item, "image_id": i, "draw": d,
             "index": j, "layer": None, "unit": None, "text": "x", "bertscore": v, "clipscore": None}
            for (item, i, d, j), v in values.items()]
    return pl.DataFrame(rows, schema=S.SCORE_SCHEMA)


def _synthetic(n_images: int, rng: np.random.Generator) -> tuple[pl.DataFrame, dict]:
    vals: dict = {}
    for i in range(n_images):
        for j in range(3):
            vals[("multimodal_all", i, 0, j)] = rng.normal(0.5, 0.1)
        vals[("multimodal_interpretable", i, 0, 0)] = vals[("multimodal_all", i, 0, 0)]
        for d in range(2):
            for j in range(3):
                vals[("random_pairing", i, d, j)] = rng.normal(0.4, 0.1)
            vals[("random_pairing_interpretable", i, d, 0)] = rng.normal(0.4, 0.1)
        vals[("captions", i, 0, 0)] = rng.normal(0.7, 0.1)
        vals[("coco_nouns", i, 0, 0)] = rng.normal(0.6, 0.1)
        for j in range(6):
            vals[("prompts", i, 0, j)] = rng.normal(0.3, 0.1)
            vals[("random_prompts", i, 0, j)] = rng.normal(0.3, 0.1)
    return _long(vals), vals


def test_per_image_scores_by_hand():
    df, v = _synthetic(4, np.random.default_rng(0))
    pi = S.per_image_scores(df)

    def get(item, stat, i):
        return pi.filter((pl.col("item") == item) & (pl.col("stat") == stat) & (pl.col("image_id") == i))[
            "bertscore"].item()

    for i in range(4):
        assert get("multimodal_all", "max", i) == pytest.approx(max(v[("multimodal_all", i, 0, j)] for j in range(3)))
        rand = np.mean([max(v[("random_pairing", i, d, j)] for j in range(3)) for d in range(2)])
        assert get("random_pairing", "max", i) == pytest.approx(rand)
        assert get("captions", "value", i) == pytest.approx(v[("captions", i, 0, 0)])
        p = [v[("prompts", i, 0, j)] for j in range(6)]
        assert get("prompts", "mean", i) == pytest.approx(np.mean(p))
        assert get("prompts", "max", i) == pytest.approx(max(p))
    assert pi["clipscore"].null_count() == pi.height


def test_per_image_scores_do_not_depend_on_the_row_order():
    """Every per-image mean sums in one fixed order: a permuted table gives the same bits (it did
    not: polars' unordered group_by averaged the draws in a varying order, so two calls on the
    stage's own table differed in the last bits)."""
    rng = np.random.default_rng(3)
    vals = {(item, i, d, j): round(float(rng.random()), 6) for item in ("random_pairing", "prompts")
            for i in range(60) for d in range(5 if item == "random_pairing" else 1) for j in range(20)}
    df = _long(vals)
    ref = S.per_image_scores(df)
    for seed in range(3):
        perm = df[np.random.default_rng(seed).permutation(df.height).tolist()]
        got = S.per_image_scores(perm)
        assert got["bertscore"].to_list() == ref["bertscore"].to_list(), seed


@pytest.mark.parametrize("n_images", [3, 12])
def test_summarise_ks_over_images_n_is_image_count(n_images):
    df, _ = _synthetic(n_images, np.random.default_rng(n_images))
    pi = S.per_image_scores(df)
    m = S.summarise(pi, bert_rescaled=False, clip_w=1.0, clip_computed=False)
    b = m["bertscore"]
    # KS on per-image values, n = images per side (never the 6 * n_images per-prompt scores)
    for name, (stat, other) in {"prompts_vs_random_mean": ("mean", "random_prompts"),
                                "prompts_vs_random_max": ("max", "random_prompts")}.items():
        a = pi.filter((pl.col("item") == "prompts") & (pl.col("stat") == stat)).sort("image_id")["bertscore"]
        r = pi.filter((pl.col("item") == other) & (pl.col("stat") == stat)).sort("image_id")["bertscore"]
        ref = scipy.stats.ks_2samp(a.to_numpy(), r.to_numpy())
        assert b["ks"][name]["n"] == n_images
        assert b["ks"][name]["D"] == pytest.approx(ref.statistic, rel=1e-5)
        assert b["ks"][name]["p"] == pytest.approx(ref.pvalue, rel=1e-5)
    assert b["ks"]["prompts_vs_coco_nouns_mean"]["n"] == n_images
    row = b["table1"]["multimodal_all"]
    assert row["n"] == n_images and row["lo"] <= row["mean"] <= row["hi"]
    mm = pi.filter((pl.col("item") == "multimodal_all"))["bertscore"].mean()
    assert row["mean"] == pytest.approx(mm, rel=1e-5)
    pt = b["paired"]["multimodal_vs_random"]
    rnd = pi.filter(pl.col("item") == "random_pairing")["bertscore"].mean()
    assert pt["n"] == n_images and pt["diff"] == pytest.approx(mm - rnd, rel=1e-4)
    assert b["table2"]["prompts"]["n"] == n_images
    assert m["clipscore"] is None and m["scale"] == {"bertscore_rescaled": 0, "clip_w": 1.0}

    # numbers-only, modest size (DVC metrics)
    leaves: list = []

    def walk(o):
        if isinstance(o, dict):
            for x in o.values():
                walk(x)
        else:
            leaves.append(o)

    walk(m)
    assert all(x is None or isinstance(x, (int, float)) and not isinstance(x, bool) for x in leaves)
    assert len(leaves) <= 56
    json.dumps(m, allow_nan=False)


def test_sample_nouns_five_seeded_from_captions():
    refs = ["a dog and a cat on a sofa near a window", "the cat sleeps on the table by the lamp",
            "a kitchen with a stove"]
    pool = {"dog", "cat", "sofa", "window", "table", "lamp", "kitchen", "stove"}
    a = S.sample_nouns(refs, 5, seed=0, image_id=1)
    words = a.split(", ")
    assert len(words) == 5 == len(set(words)) and set(words) <= pool
    assert a == S.sample_nouns(refs, 5, seed=0, image_id=1)
    draws = {S.sample_nouns(refs, 5, seed=s, image_id=1) for s in range(10)}
    assert len(draws) > 1  # really sampled
    assert set(S.sample_nouns(refs[2:], 5, seed=0, image_id=1).split(", ")) == {"kitchen", "stove"}


# ----------------------------------------------------------------------------- end to end, tiny models

class _FakeBert:
    """Deterministic stand-in: score = length of the candidate / 100 (same for every reference)."""

    calls = 0

    def mean_f1_over_refs(self, cands, refs):
        _FakeBert.calls += len(cands)
        return np.array([len(c) / 100 for c in cands], dtype=np.float64)


def test_score_tables_tiny_lm_real_vocab_and_ks_n(tiny_adapters, monkeypatch):
    from mmn.models.prefix_lm import ImagePrefixLM

    ad, tok = tiny_adapters["gpt2"]
    real = torch.arange(200, 300)  # pretend only these rows are real vocabulary
    monkeypatch.setattr(ad, "real_token_ids", real)
    torch.manual_seed(0)
    plm = ImagePrefixLM(ad, tok, nn.Linear(8, ad.d_model), encoder=FakeEncoder(4, 8, 1))  # 4 patches, 8-d features
    images = [1, 2, 3]
    att = pl.DataFrame({"image_id": [i for i in images for _ in range(3)], "rank": [0, 1, 2] * 3,
                        "layer": [0, 1, 2] * 3, "unit": [i + j for i in images for j in range(3)],
                        "patch": [0] * 9})
    neu = (att.select("layer", "unit").unique()
           .with_columns(pl.format("w{}_{}", "layer", "unit").alias("decoded"),
                         (pl.col("unit") % 2 == 0).alias("interpretable")))
    caps = pl.DataFrame({"image_id": images, "caption": ["a cat", "a dog on grass", "two buses"]})
    refs = {i: ["a cat sits on a mat", "a dog runs in the park", "a red bus"] for i in images}
    _FakeBert.calls = 0
    df, _ = S.score_tables(caps, att, neu, refs, lambda i: i, plm, _FakeBert(), None,
                        random_draws=2, prompt_neighbours=3, seed=0)
    assert set(df.columns) == set(S.SCORE_SCHEMA)
    n_rows = df.height
    assert _FakeBert.calls < n_rows  # each distinct (image, text) pair scored once
    np.testing.assert_allclose(df["bertscore"].to_numpy(), [len(t) / 100 for t in df["text"].to_list()])
    allowed = {tok.decode([t]).strip() for t in real.tolist()}
    for item in ("prompts", "random_prompts"):
        sub = df.filter(pl.col("item") == item)
        assert sub.group_by("image_id").len()["len"].to_list() == [4, 4, 4]  # one row per patch
        for t in sub["text"].to_list():
            assert len(t.split(", ")) == 3
            assert set(t.split(", ")) <= allowed  # only real-vocabulary rows
    pi = S.per_image_scores(df)
    m = S.summarise(pi, bert_rescaled=False, clip_w=1.0, clip_computed=False)
    for ks in m["bertscore"]["ks"].values():
        assert ks["n"] == len(images)
    assert m["bertscore"]["table1"]["multimodal_all"]["n"] == 3


def test_fig3_series_are_per_image_and_cis_contain_the_mean():
    from mmn.plots import tables as T

    df, v = _synthetic(7, np.random.default_rng(3))
    series = T.score_series(df, "bertscore")
    assert set(series) == {"prompts", "random_prompts", "prompts_max", "random_prompts_max", "coco_nouns",
                           "captions"}
    assert all(a.size == 7 for a in series.values())  # one value per image, not per prompt
    assert (series["prompts_max"] >= series["prompts"]).all()
    np.testing.assert_allclose(series["prompts"][0], np.mean([v[("prompts", 0, 0, j)] for j in range(6)]))
    assert T.score_series(df, "clipscore") == {}
    ci = T.score_cis(series)["prompts"]
    assert ci["lo"] <= ci["mean"] <= ci["hi"] and ci["n"] == 7


def test_scores_quality_gate_ranges_and_row_key():
    from mmn.quality import QualityError, check_scores

    df, _ = _synthetic(3, np.random.default_rng(5))
    df = df.with_columns(pl.col("bertscore").clip(0, 1))
    check_scores(df, clip_computed=False)  # raw guarded F1 in [0, 1]
    low = df.with_columns(pl.when(pl.col("index") == 0).then(-0.5).otherwise(pl.col("bertscore"))
                          .alias("bertscore"))
    with pytest.raises(QualityError, match="bertscore"):
        check_scores(low, clip_computed=False)
    check_scores(low, clip_computed=False, bert_min=-4.92)  # rescaled roberta-large: down to -b/(1-b)
    with pytest.raises(QualityError):
        check_scores(pl.concat([df, df.head(1)]), clip_computed=False)  # duplicated (item, image, draw, index)
    clip = df.with_columns(pl.lit(150.0).alias("clipscore"))
    with pytest.raises(QualityError, match="clipscore"):
        check_scores(clip, clip_computed=True)  # w = 1: at most 100
    check_scores(clip, clip_computed=True, clip_max=250.0)
