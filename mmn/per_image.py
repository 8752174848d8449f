"""Per-image values of a finished run, read back from its ``data/`` tables, for paired
comparisons between two runs on the same images (two LMs, two projections, two seeds:
``scripts/compare_runs.py --paired``).

Each value is the one the stage itself averages over images, computed by the stage's own
helper, so the mean over a run's images equals the stage's summary mean (tested on the
shared end-to-end run). Gotchas:

* A comparison is paired only over the images **both** runs evaluated (:func:`paired`);
  two runs whose captions name different targets still pair by image, not by target.
* Table 1 and IoU are per-image *differences* (multimodal − random): comparing them across
  runs asks whether one run's advantage over its own random control is larger.
* ``methods_spearman`` is the uniform-sample Spearman (``compare.sample`` > 0); a run without
  it gives no values.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import scipy.stats

from mmn.metrics.stats import bootstrap_ci, paired_test

PerImage = dict[int, float]  # image_id -> value


def _read(run: Path, name: str, columns: tuple[str, ...]) -> pl.DataFrame | None:
    """``run/data/<name>.parquet``, None when the run has no such table (its stage did not run);
    a table without ``columns`` is an error naming the file and the column."""
    f = run / "data" / f"{name}.parquet"
    if not f.is_file():
        return None
    df = pl.read_parquet(f)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{f}: no column {missing[0]!r} (columns: {', '.join(df.columns)})")
    return df


def _as_dict(df: pl.DataFrame, col: str) -> PerImage:
    df = df.drop_nulls(col)
    return dict(zip(df["image_id"].to_list(), (float(v) for v in df[col].to_list())))


def captions(run: Path, col: str) -> PerImage | None:
    """``bertscore_own``, ``own_minus_shuffled`` or ``noun_in_refs`` (0/1) of each image's caption."""
    df = _read(run, "captions", ("image_id", "bertscore_own", "bertscore_shuffled", "noun_in_refs"))
    if df is None:
        return None
    df = df.with_columns((pl.col("bertscore_own") - pl.col("bertscore_shuffled")).alias("own_minus_shuffled"),
                         pl.col("noun_in_refs").cast(pl.Float64))
    return _as_dict(df, col)


def kept_fraction(run: Path) -> PerImage | None:
    """Interpretable share of the image's distinct top units (the filter stage's kept_fraction)."""
    from mmn.neurons.summary import kept_fraction_per_image

    att = _read(run, "attributions", ("image_id", "layer", "unit"))
    neu = _read(run, "interpretable", ("layer", "unit", "interpretable"))
    if att is None or neu is None:
        return None
    return _as_dict(kept_fraction_per_image(att, neu), "kept_fraction")


def relative_depth(run: Path, n_layers: int) -> PerImage | None:
    """Mean layer of the image's top units over ``n_layers - 1``: 0 = first MLP, 1 = last (LMs of
    different depth compare on this scale, not on layer indices)."""
    att = _read(run, "attributions", ("image_id", "layer", "unit"))
    if att is None:
        return None
    per = att.select("image_id", "layer", "unit").unique().group_by("image_id").agg(pl.col("layer").mean())
    return {i: float(v) / max(n_layers - 1, 1) for i, v in zip(per["image_id"].to_list(), per["layer"].to_list())}


def score_minus_control(run: Path, item: str, control: str) -> PerImage | None:
    """BERTScore of ``item`` minus its random ``control`` per image (scores stage): Table 1 items
    compare their max over units, Table 2's ``prompts`` their mean over patches."""
    from mmn.experiments.scores import per_image_scores

    df = _read(run, "scores", ("item", "image_id", "bertscore"))
    if df is None:
        return None
    pi = per_image_scores(df)

    def values(it: str, stat: str) -> PerImage:
        return _as_dict(pi.filter((pl.col("item") == it) & (pl.col("stat") == stat)), "bertscore")

    stat = "mean" if item == "prompts" else "max"
    a, b = values(item, stat), values(control, stat)
    return {i: a[i] - b[i] for i in sorted(set(a) & set(b))}


def iou(run: Path) -> PerImage | None:
    """Receptive-field IoU of the image's multimodal units minus its random units (iou stage)."""
    from mmn.experiments.iou import per_image_iou

    df = _read(run, "iou", ("category", "image_id", "kind", "iou"))
    if df is None:
        return None
    wide = per_image_iou(df)
    return {i: m - r for i, m, r in zip(wide["image_id"].to_list(), wide["multimodal"].to_list(),
                                        wide["random"].to_list())}


def ablation(run: Path, k: int, kind: str = "unfiltered") -> PerImage | None:
    """Relative drop of p(c) when the image's top ``k`` units of ``kind`` are zeroed (ablate stage)."""
    df = _read(run, "ablation", ("image_id", "kind", "k", "rel_drop"))
    if df is None:
        return None
    return _as_dict(df.filter((pl.col("kind") == kind) & (pl.col("k") == k)), "rel_drop")


def methods_spearman(run: Path, method: str = "grad_x_act") -> PerImage | None:
    """Spearman of ``method``'s unit scores with the exact Δy over the uniformly sampled units
    (compare_methods stage; the value its summary averages)."""
    from mmn.experiments.compare_methods import rank_corr

    col = f"score_{method}"
    df = _read(run, "compare_methods", ("image_id", "sampled", "dy", col))
    if df is None:
        return None
    out: PerImage = {}
    for (i,), g in df.filter(pl.col("sampled")).group_by(["image_id"]):
        r = rank_corr(scipy.stats.spearmanr, g[col].to_numpy(), g["dy"].to_numpy())
        if r is not None:
            out[int(i)] = r
    return out


Reader = Callable[[Path, "int | None"], "PerImage | None"]


def metrics() -> dict[str, tuple[str, Reader]]:
    """Name -> (description, reader(run, n_layers)) of every per-image value compared; ``n_layers``
    (the run's LM depth) is needed by ``relative_depth`` only (None: not computed)."""
    return {
        "caption_bertscore_own": ("caption BERTScore F1 with the image's own references",
                                  lambda r, n: captions(r, "bertscore_own")),
        "caption_own_minus_shuffled": ("caption: own − shuffled references",
                                       lambda r, n: captions(r, "own_minus_shuffled")),
        "caption_noun_in_refs": ("caption's first noun in its own references (0/1)",
                                 lambda r, n: captions(r, "noun_in_refs")),
        "kept_fraction": ("interpretable share of the image's top units", lambda r, n: kept_fraction(r)),
        "relative_depth": ("mean layer of the top units / (layers − 1)",
                           lambda r, n: None if n is None else relative_depth(r, n)),
        "table1_multimodal_minus_random": ("Table 1: all top units − random pairing (BERTScore)",
                                           lambda r, n: score_minus_control(r, "multimodal_all", "random_pairing")),
        "table1_interpretable_minus_random": ("Table 1: interpretable − count-matched random interpretable",
                                              lambda r, n: score_minus_control(r, "multimodal_interpretable",
                                                                  "random_pairing_interpretable")),
        "table2_prompts_minus_random": ("Table 2: image prompts − random prompt vectors (mean over patches)",
                                        lambda r, n: score_minus_control(r, "prompts", "random_prompts")),
        "iou_multimodal_minus_random": ("IoU: multimodal − random units", lambda r, n: iou(r)),
        **{f"ablation_k{k}": (f"relative drop of p(c), top {k} units by g", lambda r, n, k=k: ablation(r, k))
           for k in (50, 100, 400)},
        "methods_grad_x_act_spearman": ("grad_x_act Spearman with the exact Δy (uniform sample)",
                                        lambda r, n: methods_spearman(r)),
    }


def paired(a: PerImage, b: PerImage, seed: int = 0) -> dict:
    """Both runs' means with 95% bootstrap CIs over the images both evaluated, and the paired
    test of ``b - a`` over those images (:func:`mmn.metrics.stats.paired_test`)."""
    common = sorted(set(a) & set(b))
    if not common:
        return {"a": None, "b": None, "b_minus_a": None, "n": 0}
    xa, xb = np.array([a[i] for i in common]), np.array([b[i] for i in common])
    return {"a": bootstrap_ci(xa, seed=seed), "b": bootstrap_ci(xb, seed=seed),
            "b_minus_a": paired_test(xb, xa, seed=seed), "n": len(common)}
