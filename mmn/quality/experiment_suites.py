"""Expectation suites for the experiment outputs (score, iou, ablate stages)."""

from __future__ import annotations

from typing import Any

import polars as pl

from .core import expect, run_suite
from .suites import register_suite


def _pl(df: Any) -> pl.DataFrame:
    return df if isinstance(df, pl.DataFrame) else pl.from_pandas(df)


def scores_suite(clip_computed: bool = False, bert_min: float = 0.0, clip_max: float = 100.0) -> list[dict]:
    """``bert_min``: the lowest BERTScore F1 possible (0 raw with the sign guard; -b/(1-b) when
    baseline-rescaled); ``clip_max``: 100 * w (100 on the paper's scale, 250 at Hessel's w)."""
    es = [
        *[expect("expect_column_to_exist", column=c)
          for c in ("table", "item", "image_id", "draw", "index", "text", "bertscore")],
        expect("expect_table_row_count_to_be_between", min_value=1),
        expect("expect_column_values_to_be_in_set", column="table", value_set=["table1", "table2"]),
        expect("expect_column_values_to_be_in_set", column="item",
               value_set=["multimodal_all", "multimodal_interpretable", "random_pairing",
                          "random_pairing_interpretable", "captions", "coco_nouns", "prompts", "random_prompts"]),
        expect("expect_compound_columns_to_be_unique", column_list=["item", "image_id", "draw", "index"]),
        expect("expect_column_values_to_not_be_null", column="bertscore"),
        expect("expect_column_values_to_be_between", column="bertscore", min_value=bert_min - 1e-6,
               max_value=1.0 + 1e-6),
    ]
    if clip_computed:
        es += [expect("expect_column_values_to_not_be_null", column="clipscore"),
               expect("expect_column_values_to_be_between", column="clipscore", min_value=0.0,
                      max_value=clip_max + 1e-6)]
    else:
        es.append(expect("expect_column_values_to_be_null", column="clipscore",
                         description="CLIPScore must stay empty when it was not computed"))
    return es


def check_scores(df: Any, *, clip_computed: bool, bert_min: float = 0.0, clip_max: float = 100.0) -> None:
    run_suite(_pl(df), "scores", scores_suite(clip_computed, bert_min, clip_max))


def iou_suite() -> list[dict]:
    return [
        *[expect("expect_column_to_exist", column=c) for c in ("image_id", "category", "kind", "layer", "unit", "iou")],
        expect("expect_column_values_to_be_between", column="iou", min_value=0.0, max_value=1.0),
        expect("expect_column_values_to_not_be_null", column="iou"),
        expect("expect_column_values_to_be_in_set", column="kind", value_set=["multimodal", "random"]),
        expect("expect_compound_columns_to_be_unique",
               column_list=["category", "image_id", "kind", "layer", "unit", "draw"]),
        expect("expect_column_values_to_be_in_set", column="random_is_multimodal", value_set=[False],
               description="random units exclude the image's multimodal units"),
    ]


def check_iou(df: Any) -> None:
    d = _pl(df)
    if not {"image_id", "kind", "layer", "unit"} <= set(d.columns):  # the suite names what is missing
        run_suite(d.with_columns(pl.lit(False).alias("random_is_multimodal")), "iou", iou_suite())
        return
    mm = (d.filter(pl.col("kind") == "multimodal").select("image_id", "layer", "unit").unique()
          .with_columns(pl.lit(True).alias("_mm")))
    d = (d.with_row_index("_i").join(mm, on=["image_id", "layer", "unit"], how="left").sort("_i")
         .with_columns(((pl.col("kind") == "random") & pl.col("_mm").fill_null(False)).alias("random_is_multimodal"))
         .drop("_i", "_mm"))
    run_suite(d, "iou", iou_suite())


def ablation_suite() -> list[dict]:
    return [
        *[expect("expect_column_to_exist", column=c) for c in ("image_id", "kind", "k", "p_target", "rel_drop")],
        expect("expect_column_values_to_be_between", column="p_target", min_value=0.0, max_value=1.0),
        expect("expect_column_values_to_be_between", column="p_clean", min_value=0.0, max_value=1.0),
        expect("expect_column_values_to_not_be_null", column="p_target"),
        expect("expect_column_values_to_be_in_set", column="kind", value_set=["unfiltered", "filtered", "random", "random_filtered"]),
        expect("expect_compound_columns_to_be_unique", column_list=["image_id", "kind", "k"]),
        expect("expect_column_values_to_be_in_set", column="k0_unchanged", value_set=[True],
               description="with k = 0 nothing is ablated, so p(c) must equal the clean p(c)"),
        expect("expect_column_values_to_not_be_null", column="rel_drop"),
        expect("expect_column_values_to_be_between", column="rel_drop", max_value=1.0,
               description="1 - p_k/p_clean cannot exceed 1 (p(c) >= 0)"),
        expect("expect_column_values_to_be_in_set", column="k_effective_ok", value_set=[True],
               description="0 <= k_effective <= k: at most k units are ablated"),
    ]


def check_ablation(df: Any) -> None:
    d = _pl(df).with_columns(
        ((pl.col("k") > 0) | ((pl.col("p_target") - pl.col("p_clean")).abs() <= 1e-5 + 1e-4 * pl.col("p_clean")))
        .alias("k0_unchanged"),
        ((pl.col("k_effective") >= 0) & (pl.col("k_effective") <= pl.col("k"))).alias("k_effective_ok"))
    run_suite(d, "ablation", ablation_suite())


def methods_suite() -> list[dict]:
    """Stage compare_methods' candidate table: one row per (image, unit), exact effects and
    every method's score present and finite, |Δp| <= 1."""
    from mmn.neurons.names import METHODS

    scores = [f"score_{m}" for m in METHODS]
    return [
        *[expect("expect_column_to_exist", column=c) for c in ("image_id", "layer", "unit", "dy", "dp", *scores)],
        expect("expect_table_row_count_to_be_between", min_value=1),
        expect("expect_compound_columns_to_be_unique", column_list=["image_id", "layer", "unit"]),
        *[expect("expect_column_values_to_not_be_null", column=c) for c in ("dy", "dp", *scores)],
        expect("expect_column_values_to_be_between", column="dp", min_value=-1.0 - 1e-6, max_value=1.0 + 1e-6,
               description="dp = p_clean - p_ablated, both probabilities"),
        expect("expect_column_values_to_be_in_set", column="finite", value_set=[True],
               description="dy and every method's score are finite numbers"),
    ]


def check_methods(df: Any) -> None:
    d = _pl(df)
    cols = [c for c in d.columns if c == "dy" or c.startswith("score_")]
    fin = pl.all_horizontal([pl.col(c).is_finite().fill_null(False) for c in cols]) if cols else pl.lit(True)
    run_suite(d.with_columns(fin.alias("finite")), "methods", methods_suite())


register_suite("scores", scores_suite)
register_suite("iou", iou_suite)
register_suite("ablation", ablation_suite)
register_suite("methods", methods_suite)
