"""Expectation suites for the experiment outputs (score, iou, ablate stages)."""

from __future__ import annotations

from typing import Any

import polars as pl

from .core import expect, run_suite
from .suites import register_suite


def _pl(df: Any) -> pl.DataFrame:
    return df if isinstance(df, pl.DataFrame) else pl.from_pandas(df)


def scores_suite(clip_computed: bool) -> list[dict]:
    es = [
        *[expect("expect_column_to_exist", column=c) for c in ("table", "item", "image_id", "text", "bertscore")],
        expect("expect_table_row_count_to_be_between", min_value=1),
        expect("expect_column_values_to_be_in_set", column="table", value_set=["table1", "table2"]),
        expect("expect_column_values_to_not_be_null", column="bertscore"),
        expect("expect_column_values_to_be_between", column="bertscore", min_value=-1.0, max_value=1.0),
    ]
    if clip_computed:
        es += [expect("expect_column_values_to_not_be_null", column="clipscore"),
               expect("expect_column_values_to_be_between", column="clipscore", min_value=0.0, max_value=250.0)]
    else:
        es.append(expect("expect_column_values_to_be_null", column="clipscore",
                         description="CLIPScore must stay empty when it was not computed"))
    return es


def check_scores(df: Any, *, clip_computed: bool) -> None:
    run_suite(_pl(df), "scores", scores_suite(clip_computed))


def iou_suite() -> list[dict]:
    return [
        *[expect("expect_column_to_exist", column=c) for c in ("image_id", "category", "kind", "layer", "unit", "iou")],
        expect("expect_column_values_to_be_between", column="iou", min_value=0.0, max_value=1.0),
        expect("expect_column_values_to_not_be_null", column="iou"),
        expect("expect_column_values_to_be_in_set", column="kind", value_set=["multimodal", "random"]),
        expect("expect_compound_columns_to_be_unique",
               column_list=["category", "image_id", "kind", "layer", "unit", "draw"]),
    ]


def check_iou(df: Any) -> None:
    run_suite(_pl(df), "iou", iou_suite())


def ablation_suite() -> list[dict]:
    return [
        *[expect("expect_column_to_exist", column=c) for c in ("image_id", "kind", "k", "p_target", "rel_drop")],
        expect("expect_column_values_to_be_between", column="p_target", min_value=0.0, max_value=1.0),
        expect("expect_column_values_to_be_between", column="p_clean", min_value=0.0, max_value=1.0),
        expect("expect_column_values_to_not_be_null", column="p_target"),
        expect("expect_column_values_to_be_in_set", column="kind", value_set=["unfiltered", "filtered", "random"]),
        expect("expect_compound_columns_to_be_unique", column_list=["image_id", "kind", "k"]),
        expect("expect_column_values_to_be_in_set", column="k0_unchanged", value_set=[True],
               description="with k = 0 nothing is ablated, so p(c) must equal the clean p(c)"),
    ]


def check_ablation(df: Any) -> None:
    d = _pl(df).with_columns(
        ((pl.col("k") > 0) | ((pl.col("p_target") - pl.col("p_clean")).abs() <= 1e-5 + 1e-4 * pl.col("p_clean")))
        .alias("k0_unchanged"))
    run_suite(d, "ablation", ablation_suite())


register_suite("scores", scores_suite)
register_suite("iou", iou_suite)
register_suite("ablation", ablation_suite)
