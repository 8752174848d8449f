"""Summaries of the found units: kept fraction and layer distribution (paper §3.1 and
supplement), every count over **units**.

The paper: "For the 100 u_k with highest g_{k,c} for each image, we compute
decoder(W_out^k) ... Restricting analyses to interpretable neurons ... retains 50% of
neurons with high g_{k,c}" and "Most top-scoring neurons are found between layers 5 and
10 of GPT-J". So the unit of count is an image's top unit: one (image, layer, unit),
whatever number of patches it won (under ``attribute.rank_by=triple`` a unit that
appears at several patches of an image counts once).
"""

from __future__ import annotations

import polars as pl

from mmn.metrics.stats import bootstrap_ci


def image_units(attributions: pl.DataFrame, neurons: pl.DataFrame) -> pl.DataFrame:
    """One row per distinct (image_id, layer, unit) of ``attributions`` with its
    ``interpretable`` flag (False when the unit is missing from ``neurons``)."""
    flags = neurons.select("layer", "unit", "interpretable")
    return (
        attributions.select("image_id", "layer", "unit").unique()
        .join(flags, on=["layer", "unit"], how="left")
        .with_columns(pl.col("interpretable").fill_null(False))
        .sort(["image_id", "layer", "unit"])
    )


def kept_fraction_per_image(attributions: pl.DataFrame, neurons: pl.DataFrame) -> pl.DataFrame:
    """Per image: ``n_units`` (its distinct top units), ``n_interpretable`` and
    ``kept_fraction`` = n_interpretable / n_units."""
    return (
        image_units(attributions, neurons)
        .group_by("image_id")
        .agg(pl.len().cast(pl.Int64).alias("n_units"),
             pl.col("interpretable").sum().cast(pl.Int64).alias("n_interpretable"))
        .with_columns((pl.col("n_interpretable") / pl.col("n_units")).alias("kept_fraction"))
        .sort("image_id")
    )


def layer_distribution(attributions: pl.DataFrame, neurons: pl.DataFrame) -> pl.DataFrame:
    """Plot-ready table: per layer, the number of images' top units (distinct (image,
    layer, unit)), how many of them are interpretable, and the share of all. Every layer
    from 0 to the max seen is present. Columns: layer, n_units, n_interpretable_units, share."""
    iu = image_units(attributions, neurons)
    top = max(int(iu["layer"].max()) if iu.height else -1, int(neurons["layer"].max()) if neurons.height else -1)
    base = pl.DataFrame({"layer": list(range(top + 1))}, schema={"layer": pl.Int64})
    counts = iu.group_by("layer").agg(
        pl.len().cast(pl.Int64).alias("n_units"),
        pl.col("interpretable").sum().cast(pl.Int64).alias("n_interpretable_units"),
    )
    out = base.join(counts, on="layer", how="left").fill_null(0).sort("layer")
    total = max(int(out["n_units"].sum()), 1)
    return out.with_columns((pl.col("n_units") / total).round(6).alias("share"))


def _num(x: float | None, nd: int = 6) -> float | None:
    return None if x is None else round(float(x), nd)


def neuron_metrics(attributions: pl.DataFrame, neurons: pl.DataFrame, *, seed: int = 0) -> dict:
    """Numbers only (summary/neurons.json; headline: metrics/neurons.json).

    * ``kept_fraction``: {"mean","lo","hi","n"}, 95% bootstrap CI over images of each
      image's fraction of interpretable units among its top units (n = images);
    * ``kept_fraction_pooled``: interpretable / all (image, unit) pairs;
    * ``kept_fraction_distinct``: interpretable / distinct units over all images;
    * ``n_images``, ``n_image_units`` (pairs), ``n_units`` / ``n_interpretable`` (distinct);
    * ``mean_layer``/``median_layer``/``modal_layer`` over (image, unit) pairs and
      ``mean_layer_interpretable``/``median_layer_interpretable`` over the interpretable ones.
    """
    iu = image_units(attributions, neurons)
    per_image = kept_fraction_per_image(attributions, neurons)
    distinct = iu.select("layer", "unit", "interpretable").unique()
    layers = iu["layer"]
    li = iu.filter(pl.col("interpretable"))["layer"]
    ci = bootstrap_ci(per_image["kept_fraction"].to_numpy(), seed=seed) if per_image.height else {
        "mean": None, "lo": None, "hi": None, "n": 0}
    return {
        "n_images": int(per_image.height),
        "n_image_units": int(iu.height),
        "n_units": int(distinct.height),
        "n_interpretable": int(distinct["interpretable"].sum()),
        "kept_fraction": {key: (_num(v) if key != "n" else v) for key, v in ci.items()},
        "kept_fraction_pooled": _num(iu["interpretable"].mean()) if iu.height else None,
        "kept_fraction_distinct": _num(distinct["interpretable"].mean()) if distinct.height else None,
        "mean_layer": _num(layers.mean(), 4) if layers.len() else None,
        "median_layer": _num(layers.median(), 4) if layers.len() else None,
        "modal_layer": int(layers.mode().sort()[0]) if layers.len() else None,
        "mean_layer_interpretable": _num(li.mean(), 4) if li.len() else None,
        "median_layer_interpretable": _num(li.median(), 4) if li.len() else None,
    }
