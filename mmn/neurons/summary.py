"""Summaries of the found units: kept fraction and layer distribution (paper supplement)."""

from __future__ import annotations

import polars as pl


def layer_distribution(attributions: pl.DataFrame, neurons: pl.DataFrame) -> pl.DataFrame:
    """Plot-ready table: per layer, the number and share of top-k triples, and of those
    whose unit is interpretable. Every layer from 0 to the max seen is present."""
    flagged = attributions.join(neurons.select("layer", "unit", "interpretable"), on=["layer", "unit"], how="left")
    n_layers = int(neurons["layer"].max()) + 1 if neurons.height else 0
    base = pl.DataFrame({"layer": list(range(n_layers))}, schema={"layer": pl.Int64})
    counts = flagged.group_by("layer").agg(
        pl.len().cast(pl.Int64).alias("n_triples"),
        pl.col("interpretable").fill_null(False).sum().cast(pl.Int64).alias("n_interpretable_triples"),
    )
    out = base.join(counts, on="layer", how="left").fill_null(0).sort("layer")
    total = max(int(out["n_triples"].sum()), 1)
    return out.with_columns((pl.col("n_triples") / total).round(6).alias("share"))


def neuron_metrics(attributions: pl.DataFrame, neurons: pl.DataFrame) -> dict:
    """Kept fraction (units and triples), layer histogram summary."""
    flagged = attributions.join(neurons.select("layer", "unit", "interpretable"), on=["layer", "unit"], how="left")
    n_units = neurons.height
    n_int = int(neurons["interpretable"].sum()) if n_units else 0
    layers = attributions["layer"]
    return {
        "n_images": int(attributions["image_id"].n_unique()),
        "n_triples": attributions.height,
        "n_units": n_units,
        "n_interpretable": n_int,
        "kept_fraction": round(n_int / n_units, 6) if n_units else 0.0,
        "kept_fraction_triples": round(float(flagged["interpretable"].fill_null(False).mean()), 6)
        if flagged.height
        else 0.0,
        "mean_layer": round(float(layers.mean()), 4) if layers.len() else None,
        "median_layer": float(layers.median()) if layers.len() else None,
        "modal_layer": int(layers.mode().sort()[0]) if layers.len() else None,
    }
