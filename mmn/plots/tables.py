"""Plot-ready tables from the stage outputs (pure polars; no models, no pyplot).

The ``plot`` stage writes these as CSV under ``plots/data/`` for ``dvc plots`` and draws
the PNG figures from the same frames, so both show the same numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import polars as pl

ABLATION_KINDS = ("unfiltered", "filtered", "random", "random_filtered")  # mmn.experiments.ablation.KINDS
SCORE_SERIES = (  # Fig. 3: (item, per-image stat, label) — see mmn.experiments.scores.per_image_scores
    ("prompts", "mean", "prompts"),
    ("random_prompts", "mean", "random_prompts"),
    ("prompts", "max", "prompts_max"),
    ("random_prompts", "max", "random_prompts_max"),
    ("coco_nouns", "value", "coco_nouns"),
    ("captions", "value", "captions"),
)


def _sem(col: str) -> pl.Expr:
    return (pl.col(col).std() / pl.col(col).count().sqrt()).fill_null(0.0).fill_nan(0.0)


def unit_key(layer: int, unit: int) -> str:
    """The id of a unit in file names and report links: ``L3-U1207``."""
    return f"L{int(layer)}-U{int(unit)}"


# --------------------------------------------------------------------------- selection

def unit_summary(attributions: pl.DataFrame, interpretable: pl.DataFrame) -> pl.DataFrame:
    """One row per attributed unit: max g and where it peaks, number of images, decoding.

    Columns: ``layer, unit, max_g, best_image, best_patch, n_images, n_triples, tokens,
    logits, decoded, n_words, interpretable`` sorted by ``max_g`` descending (ties by layer, unit).
    """
    best = (attributions.sort(["g", "image_id", "patch"], descending=[True, False, False])
            .group_by(["layer", "unit"], maintain_order=True)
            .agg(pl.col("g").first().alias("max_g"), pl.col("image_id").first().alias("best_image"),
                 pl.col("patch").first().alias("best_patch"), pl.col("image_id").n_unique().alias("n_images"),
                 pl.len().alias("n_triples")))
    dec = interpretable.select("layer", "unit", "tokens", "logits", "decoded", "n_words", "interpretable")
    return (best.join(dec, on=["layer", "unit"], how="left")
            .sort(["max_g", "layer", "unit"], descending=[True, False, False]))


def image_top_units(attributions: pl.DataFrame, n: int) -> pl.DataFrame:
    """Per image, its first ``n`` distinct units by attribution rank (a unit can hold several
    ranks, one per patch; its best rank counts). Columns: ``image_id, order, layer, unit,
    rank, g, patch``."""
    return (attributions.sort(["image_id", "rank"])
            .unique(subset=["image_id", "layer", "unit"], keep="first", maintain_order=True)
            .group_by("image_id", maintain_order=True).head(n)
            .with_columns(pl.int_range(pl.len()).over("image_id").alias("order"))
            .select("image_id", "order", "layer", "unit", "rank", "g", "patch"))


@dataclass(frozen=True)
class Selection:
    """What the figures and the report show (bounded by the ``plot`` params)."""

    images: list[int]                   # images with a Fig. 2 panel and a report page; scanned for Fig. 4
    card_units: list[tuple[int, int]]   # Fig. 1 cards and Fig. 4 panels
    units: list[tuple[int, int]]        # every unit with a report page (cards + images' top units)
    per_image: pl.DataFrame             # image_top_units(...) restricted to ``images``
    summary: pl.DataFrame               # unit_summary(...) of every attributed unit


def select(captions: pl.DataFrame, attributions: pl.DataFrame, interpretable: pl.DataFrame, *, images: int,
           units_per_image: int, cards: int) -> Selection:
    """The ``cards`` units with the highest max g overall; the first ``images`` captioned
    images by id plus each card unit's best image; their top ``units_per_image`` units.
    At most ``images + cards`` images and ``cards + (images + cards) * units_per_image`` units."""
    summary = unit_summary(attributions, interpretable)
    top = summary.head(cards)
    card_units = [(int(l), int(u)) for l, u in top.select("layer", "unit").iter_rows()]
    first = sorted(captions["image_id"].to_list())[:images]  # images without a target have no units
    ids = sorted(set(first) | set(int(i) for i in top["best_image"].to_list()))
    per_image = image_top_units(attributions.filter(pl.col("image_id").is_in(ids)), units_per_image)
    units = list(dict.fromkeys(card_units + [(int(l), int(u)) for l, u in
                                             per_image.select("layer", "unit").iter_rows()]))
    return Selection(ids, card_units, units, per_image, summary)


# --------------------------------------------------------------------------- captions

def mark_target(caption: str, noun: str | None, target_token: str | None = None) -> tuple[str, str, str]:
    """Split a caption around its target word: ``(before, word, after)``.

    The caption stage's first noun is searched as a whole word (case-insensitive, first
    occurrence); failing that, the target token's text; ``("caption", "", "")`` when
    neither occurs (e.g. no noun).
    """
    for needle in (noun, (target_token or "").strip()):
        if not needle:
            continue
        m = re.search(rf"(?<!\w){re.escape(needle)}\w*", caption, flags=re.IGNORECASE)
        if m:
            return caption[: m.start()], caption[m.start(): m.end()], caption[m.end():]
    return caption, "", ""


# --------------------------------------------------------------------------- experiment tables

def ablation_curves(ablation: pl.DataFrame) -> pl.DataFrame:
    """Fig. 6, long: one row per (kind, k) with the mean per-image relative drop of p(c) and its
    95% bootstrap CI over images (``rel_drop``, ``rel_drop_lo``, ``rel_drop_hi``), the relative
    drop of the mean p(c) (``drop_of_mean``), the paired test against random units
    (``vs_random_*``) and BERTScore with its CI: the ablate stage's data/ablation_curve.csv
    (:func:`mmn.experiments.ablation.ablation_curve`, same seed, so the same numbers)."""
    from mmn.experiments.ablation import ablation_curve

    return ablation_curve(ablation)


def wide(long: pl.DataFrame, index: str, column: str, value: str, order: tuple[str, ...]) -> pl.DataFrame:
    """Pivot ``long`` to one column per ``column`` value (in ``order``, present ones only)."""
    w = long.pivot(on=column, index=index, values=value).sort(index)
    return w.select([index] + [c for c in order if c in w.columns])


def ablation_example(ablation: pl.DataFrame) -> dict | None:
    """Fig. 6 (right): one caption before/after ablation — the image and the smallest k at
    which ablating the unfiltered top units changes its caption most (lowest BERTScore when
    present, else largest relative drop). None when no caption changed."""
    if "caption_changed" not in ablation.columns:
        return None
    ch = ablation.filter((pl.col("kind") == "unfiltered") & pl.col("caption_changed").fill_null(False))
    if ch.height == 0:
        return None
    key = ["bertscore_f1", "k"] if "bertscore_f1" in ch.columns else ["rel_drop", "k"]
    desc = [False, False] if key[0] == "bertscore_f1" else [True, False]
    row = ch.sort(key + ["image_id"], descending=desc + [False]).row(0, named=True)
    clean = ablation.filter((pl.col("image_id") == row["image_id"]) & (pl.col("k") == 0)
                            & (pl.col("kind") == "unfiltered"))
    before = clean["caption"][0] if clean.height else None
    return {"image_id": row["image_id"], "k": row["k"], "before": before, "after": row["caption"],
            "p_clean": row["p_clean"], "p_after": row["p_target"], "rel_drop": row["rel_drop"],
            "bertscore_f1": row.get("bertscore_f1")}


def iou_bars(iou: pl.DataFrame, categories: list[str] | None = None) -> pl.DataFrame:
    """Fig. 5, long: ``category, kind, n, iou, lo, hi``: per category and kind the mean over
    images of the per-image mean IoU, with its 95% bootstrap CI over images (``n`` images;
    :func:`mmn.experiments.iou.category_table`, as in data/iou_categories.csv)."""
    from mmn.experiments.iou import KINDS, category_table

    present = list(dict.fromkeys(iou["category"].to_list()))
    t = category_table(iou, [c for c in (categories or sorted(present)) if c in present])
    out = pl.concat([t.select("category", pl.lit(k).alias("kind"), pl.col("n_images").alias("n"),
                              pl.col(k).alias("iou"), pl.col(f"{k}_lo").alias("lo"), pl.col(f"{k}_hi").alias("hi"))
                     for k in KINDS], how="vertical")
    order = categories or sorted(out["category"].unique().to_list())
    rank = {c: i for i, c in enumerate(order)}
    return (out.filter(pl.col("category").is_in(order))
            .with_columns(pl.col("category").replace_strict(rank, return_dtype=pl.Int64).alias("_o"))
            .sort(["_o", "kind"]).drop("_o"))


def score_series(scores: pl.DataFrame, metric: str) -> dict[str, np.ndarray]:
    """Fig. 3: per series label, ONE finite value per image of ``metric`` (bertscore |
    clipscore): prompts / random prompts summarised by the mean (``prompts``) and the max
    (``prompts_max``) over an image's patches; COCO nouns and captions as they are."""
    from mmn.experiments.scores import per_image_scores

    pi = per_image_scores(scores)
    out: dict[str, np.ndarray] = {}
    for item, stat, label in SCORE_SERIES:
        v = pi.filter((pl.col("item") == item) & (pl.col("stat") == stat)).sort("image_id")[metric]
        arr = v.drop_nulls().to_numpy().astype(np.float64)
        arr = arr[np.isfinite(arr)]
        if arr.size:
            out[label] = arr
    return out


def score_cis(series: dict[str, np.ndarray]) -> dict[str, dict]:
    """Mean with its 95% bootstrap CI over images (``mmn.metrics.stats.bootstrap_ci``) per series."""
    from mmn.metrics.stats import bootstrap_ci

    return {label: bootstrap_ci(v) for label, v in series.items()}


def score_histogram(series: dict[str, np.ndarray], bins: int) -> pl.DataFrame:
    """Density histograms of all series on shared bins: ``bin`` (centre) + one column per series."""
    if not series:
        return pl.DataFrame({"bin": []}, schema={"bin": pl.Float64})
    allv = np.concatenate(list(series.values()))
    lo, hi = float(allv.min()), float(allv.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    cols = {"bin": np.round((edges[:-1] + edges[1:]) / 2, 6)}
    for label, v in series.items():
        cols[label] = np.round(np.histogram(v, bins=edges, density=True)[0], 6)
    return pl.DataFrame(cols)


def selectivity_matrix(sel: pl.DataFrame) -> tuple[list[str], list[str], np.ndarray]:
    """Supplement: rows ``"<source>: L3-U12"``, columns categories, normalised mean activation
    (NaN where missing)."""
    if sel.height == 0:
        return [], [], np.zeros((0, 0))
    cats = list(dict.fromkeys(sel["category"].to_list()))
    rows = list(dict.fromkeys((s, l, u) for s, l, u in sel.select("source_category", "layer", "unit").iter_rows()))
    idx = {r: i for i, r in enumerate(rows)}
    cidx = {c: j for j, c in enumerate(cats)}
    m = np.full((len(rows), len(cats)), np.nan)
    for s, l, u, c, v in sel.select("source_category", "layer", "unit", "category", "normalised").iter_rows():
        m[idx[(s, l, u)], cidx[c]] = np.nan if v is None else v
    return [f"{s}: {unit_key(l, u)}" for s, l, u in rows], cats, m
