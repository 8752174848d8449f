"""Expectation suites of the neuron-finder outputs fail on broken tables."""

from __future__ import annotations

import polars as pl
import pytest

from mmn.quality import QualityError, check_attributions, check_interpretable, check_neurons


def _att(k=3, images=(1, 2)):
    rows = []
    for i in images:
        for r in range(k):
            a, d = 2.0 - r * 0.5, 1.0
            rows.append({"image_id": i, "rank": r, "layer": r, "unit": 5 + r, "patch": r, "g": a * d,
                         "activation": a, "gradient": d, "target_token_id": 7})
    return pl.DataFrame(rows)


DIMS = dict(k=3, n_layers=4, n_units=10, n_patches=9)


def test_good_attributions_pass():
    check_attributions(_att(), **DIMS)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.filter(~((pl.col("image_id") == 2) & (pl.col("rank") == 2))), "rows_per_image"),
        (lambda d: d.with_columns(pl.when(pl.col("rank") == 1).then(99).otherwise(pl.col("layer")).alias("layer")),
         "column='layer'"),
        (lambda d: d.with_columns(pl.when(pl.col("rank") == 0).then(float("nan")).otherwise(pl.col("g")).alias("g")),
         "g_finite"),
        (lambda d: d.with_columns((pl.col("g") * 2).alias("g")), "g_matches"),
        (lambda d: d.with_columns(pl.col("activation").reverse().over("image_id"),
                                  pl.col("g").reverse().over("image_id")), "sorted_desc"),
    ],
)
def test_broken_attributions_fail(mutate, needle):
    with pytest.raises(QualityError) as err:
        check_attributions(mutate(_att()), **DIMS)
    assert needle in str(err.value)


def test_unit_mode_requires_distinct_units():
    """rank_by=unit: a unit repeated within an image (at another patch) fails; triple mode allows it."""
    dup = _att().with_columns(pl.when(pl.col("rank") == 2).then(1).otherwise(pl.col("layer")).alias("layer"),
                              pl.when(pl.col("rank") == 2).then(6).otherwise(pl.col("unit")).alias("unit"))
    check_attributions(dup, **DIMS, rank_by="triple")
    with pytest.raises(QualityError) as err:
        check_attributions(dup, **DIMS, rank_by="unit")
    assert "distinct_units_per_image" in str(err.value)
    check_attributions(_att(), **DIMS, rank_by="unit")


def test_unit_mode_k_capped_by_units_not_triples():
    """With fewer units than k (2 layers x 2 units = 4 < k = 6), unit mode expects 4 rows per
    image, triple mode 6 (4 units x 9 patches >= 6)."""
    rows = [{"image_id": 1, "rank": r, "layer": r // 2, "unit": r % 2, "patch": 0, "g": 4.0 - r,
             "activation": 4.0 - r, "gradient": 1.0, "target_token_id": 7} for r in range(4)]
    df = pl.DataFrame(rows)
    check_attributions(df, k=6, n_layers=2, n_units=2, n_patches=9, rank_by="unit")
    with pytest.raises(QualityError, match="rows_per_image"):
        check_attributions(df, k=6, n_layers=2, n_units=2, n_patches=9, rank_by="triple")


def _neu(n_tok=10):
    return pl.DataFrame({"layer": [0, 1], "unit": [3, 4], "token_ids": [list(range(n_tok))] * 2,
                         "tokens": [[f"t{i}" for i in range(n_tok)]] * 2,
                         "logits": [[float(10 - i) for i in range(n_tok)]] * 2, "decoded": ["a", "b"]})


def test_neurons_suite():
    check_neurons(_neu(), top_n=10, n_layers=2, n_units=5)
    with pytest.raises(QualityError, match="n_tokens"):
        check_neurons(_neu(9), top_n=10, n_layers=2, n_units=5)
    with pytest.raises(QualityError, match="missing column"):
        check_neurons(_neu().drop("tokens"), top_n=10, n_layers=2, n_units=5)
    dup = pl.concat([_neu(), _neu()])
    with pytest.raises(QualityError, match="unique"):
        check_neurons(dup, top_n=10, n_layers=2, n_units=5)


def test_interpretable_suite():
    d = _neu().with_columns(pl.Series("n_words", [3, 7]), pl.Series("interpretable", [False, True]))
    check_interpretable(d, top_n=10)
    with pytest.raises(QualityError, match="n_words"):
        check_interpretable(d.with_columns(pl.Series("n_words", [3, 12])), top_n=10)
