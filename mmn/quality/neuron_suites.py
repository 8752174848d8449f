"""Expectation suites for the neuron-finder outputs (attribute, decode, filter stages).

* ``attributions``: exactly k rows per image (rank 0..k-1), layer/unit/patch in
  range, finite g/activation/gradient, g = activation × gradient sorted descending;
  under ``rank_by="unit"`` the k rows are k distinct (layer, unit) per image.
* ``neurons``: one row per (layer, unit), exactly ``top_n`` tokens per unit.
* ``interpretable``: the same plus n_words in [0, top_n] and a boolean flag.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from .core import QualityError, expect, run_suite
from .suites import register_suite


def _pl(df: Any) -> pl.DataFrame:
    return df if isinstance(df, pl.DataFrame) else pl.from_pandas(df)


def attributions_suite(k: int, n_layers: int, n_units: int, n_patches: int,
                       layers: list[int] | None = None, rank_by: str = "unit") -> list[dict]:
    """``layers``: the attributed layers (``attribute.layers``; None = all); ``rank_by``:
    ``attribute.rank_by`` (unit: every image's k rows are k distinct units)."""
    cols = ["image_id", "rank", "layer", "unit", "patch", "g", "activation", "gradient", "target_token_id"]
    layer_check = (
        expect("expect_column_values_to_be_between", column="layer", min_value=0, max_value=n_layers - 1)
        if layers is None else
        expect("expect_column_values_to_be_in_set", column="layer", value_set=list(layers),
               description="only the layers of attribute.layers")
    )
    return [
        *[expect("expect_column_to_exist", column=c) for c in cols],
        *[expect("expect_column_values_to_not_be_null", column=c) for c in cols],
        layer_check,
        expect("expect_column_values_to_be_between", column="unit", min_value=0, max_value=n_units - 1),
        expect("expect_column_values_to_be_between", column="patch", min_value=0, max_value=n_patches - 1),
        expect("expect_column_values_to_be_between", column="rank", min_value=0, max_value=k - 1),
        expect("expect_column_values_to_be_in_set", column="g_finite", value_set=[True],
               description="g, activation and gradient must be finite"),
        expect("expect_column_values_to_be_in_set", column="g_matches", value_set=[True],
               description="g must equal activation x gradient"),
        expect("expect_column_values_to_be_in_set", column="sorted_desc", value_set=[True],
               description="within an image, g must not increase with rank"),
        expect("expect_column_values_to_be_in_set", column="rows_per_image", value_set=[k],
               description=f"every image must have exactly k={k} rows"),
        expect("expect_compound_columns_to_be_unique", column_list=["image_id", "rank"]),
        *([expect("expect_column_values_to_be_in_set", column="distinct_units_per_image", value_set=[k],
                  description=f"rank_by=unit: every image must have k={k} distinct (layer, unit)"),
           expect("expect_compound_columns_to_be_unique", column_list=["image_id", "layer", "unit"])]
          if rank_by == "unit" else []),
    ]


def check_attributions(df: Any, *, k: int, n_layers: int, n_units: int, n_patches: int,
                       layers: list[int] | None = None, rank_by: str = "unit", aggregate: str = "max") -> None:
    """``aggregate="sum"``: g is Σ_p A·M, not the recorded patch's product: not compared."""
    d = _pl(df).sort(["image_id", "rank"])
    d = d.with_columns(
        (pl.col("g").is_finite() & pl.col("activation").is_finite() & pl.col("gradient").is_finite())
        .alias("g_finite"),
        (((pl.col("g") - pl.col("activation") * pl.col("gradient")).abs()
          <= 1e-4 * (pl.col("g").abs() + 1e-6)) | pl.lit(aggregate == "sum")).alias("g_matches"),
        (pl.col("g").diff().over("image_id").fill_null(0.0) <= 0).alias("sorted_desc"),
        pl.len().over("image_id").cast(pl.Int64).alias("rows_per_image"),
        pl.struct("layer", "unit").n_unique().over("image_id").cast(pl.Int64).alias("distinct_units_per_image"),
    )
    # an image may have fewer than k rows only if the model has fewer than k candidates in all
    n_candidates = (n_layers if layers is None else len(layers)) * n_units * (1 if rank_by == "unit" else n_patches)
    run_suite(d, "attributions",
              attributions_suite(min(k, n_candidates), n_layers, n_units, n_patches, layers, rank_by))


def neurons_suite(top_n: int, n_layers: int, n_units: int) -> list[dict]:
    cols = ["layer", "unit", "decoded", "n_tokens", "logits_finite_sorted"]
    return [
        *[expect("expect_column_to_exist", column=c) for c in cols],
        expect("expect_table_row_count_to_be_between", min_value=1),
        expect("expect_column_values_to_be_between", column="layer", min_value=0, max_value=n_layers - 1),
        expect("expect_column_values_to_be_between", column="unit", min_value=0, max_value=n_units - 1),
        expect("expect_compound_columns_to_be_unique", column_list=["layer", "unit"]),
        expect("expect_column_values_to_be_in_set", column="n_tokens", value_set=[top_n],
               description=f"every unit must have exactly {top_n} decoded tokens"),
        expect("expect_column_values_to_be_in_set", column="logits_finite_sorted", value_set=[True],
               description="token logits must be finite and sorted descending"),
    ]


def _require_lists(d: pl.DataFrame, suite: str) -> None:
    """List columns are summarised before GX sees them; check they exist first."""
    missing = [c for c in ("token_ids", "tokens", "logits") if c not in d.columns]
    if missing:
        raise QualityError(f"data-quality suite {suite!r}: missing column(s) {missing}", suite=suite)


def _neuron_frame(df: Any) -> pl.DataFrame:
    d = _pl(df)
    _require_lists(d, "neurons")
    ok = [bool(np.all(np.isfinite(v)) and np.all(np.diff(v) <= 0)) for v in d["logits"].to_list()]
    return d.with_columns(
        pl.col("tokens").list.len().cast(pl.Int64).alias("n_tokens"),
        pl.Series("logits_finite_sorted", ok, dtype=pl.Boolean),
    ).drop("token_ids", "tokens", "logits")


def check_neurons(df: Any, *, top_n: int, n_layers: int, n_units: int) -> None:
    run_suite(_neuron_frame(df), "neurons", neurons_suite(top_n, n_layers, n_units))


def interpretable_suite(top_n: int) -> list[dict]:
    return [
        *[expect("expect_column_to_exist", column=c) for c in ("layer", "unit", "n_words", "interpretable")],
        expect("expect_column_values_to_not_be_null", column="interpretable"),
        expect("expect_column_values_to_be_between", column="n_words", min_value=0, max_value=top_n),
        expect("expect_compound_columns_to_be_unique", column_list=["layer", "unit"]),
    ]


def check_interpretable(df: Any, *, top_n: int) -> None:
    d = _pl(df)
    _require_lists(d, "interpretable")
    d = d.with_columns(pl.col("tokens").list.len().cast(pl.Int64).alias("n_tokens")).drop(
        "token_ids", "tokens", "logits")
    run_suite(d, "interpretable", interpretable_suite(top_n))


register_suite("attributions", attributions_suite)
register_suite("neurons", neurons_suite)
register_suite("interpretable", interpretable_suite)
