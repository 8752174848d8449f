"""Which attribution finds the units that matter? Every method against the exact effect.

Per image with a target c, for each method of :data:`mmn.neurons.methods.METHODS`:

1. the method's per-unit score (max over image positions of A·M, as the paper ranks g)
   and its wall time;
2. candidates: the union over methods of each one's top ``candidates`` units;
3. ground truth: each candidate ablated ALONE (zeroed at the image positions), the rows of
   batched forwards (:func:`mmn.neurons.ablation.single_unit_effects`): exact
   Δy^c = y_clean − y_ablated and Δp(c);
4. per method: Spearman and Kendall (tau-b) correlation of its score with Δy over the
   candidates; precision@k = |method's top k ∩ exact top k by Δy| / k; the ablation curve
   (relative drop of p(c) with the method's top k units ablated together, k in
   ``ablate.ks``, the same ablation code) and its area (trapezoid with the ks equally
   spaced, divided by their number of gaps: the mean height of the curve as plotted);
   ``completeness``: |Σ A·M − (y(A) − y(0))| / |y(A) − y(0)| over every attributed unit
   and image position, y(0) = all of them zeroed (exactly 0 for integrated gradients in the
   limit of many steps; for the others how far their linear estimate is from the truth).

Every per-image value is one number per image; CIs bootstrap over images and methods are
compared by paired tests over images (:mod:`mmn.metrics.stats`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import polars as pl
import scipy.stats
import torch
from PIL import Image
from tqdm import tqdm

from mmn.models.prefix_lm import ImagePrefixLM
from mmn.neurons.ablation import rank_units, set_effects, single_unit_effects
from mmn.neurons.methods import METHODS, unit_score_map

CANDIDATE_SCHEMA = {"image_id": pl.Int64, "layer": pl.Int64, "unit": pl.Int64, "dy": pl.Float64,
                    "dp": pl.Float64} | {f"score_{m}": pl.Float64 for m in METHODS}
IMAGE_SCHEMA = {"image_id": pl.Int64, "method": pl.Utf8, "seconds": pl.Float64, "spearman": pl.Float64,
                "kendall": pl.Float64, "precision": pl.Float64, "auc": pl.Float64, "completeness": pl.Float64,
                "n_candidates": pl.Int64,
                "y_clean": pl.Float64, "p_clean": pl.Float64}
CURVE_SCHEMA = {"image_id": pl.Int64, "method": pl.Utf8, "k": pl.Int64, "p_target": pl.Float64,
                "p_clean": pl.Float64, "rel_drop": pl.Float64}


def curve_area(rel_drop: Sequence[float]) -> float:
    """Area under the ablation curve with the ks equally spaced, per gap (= mean height)."""
    r = np.asarray(rel_drop, dtype=np.float64)
    if r.size == 1:
        return float(r[0])
    return float(((r[1:] + r[:-1]) / 2).mean())


def _corr(fn, s: np.ndarray, dy: np.ndarray) -> float | None:
    """Rank correlation, None when undefined (fewer than 2 candidates or a constant side)."""
    if s.size < 2 or np.all(s == s[0]) or np.all(dy == dy[0]):
        return None
    return float(fn(s, dy).statistic)


def precision_at_k(method_top: Sequence[tuple[int, int]], units: Sequence[tuple[int, int]], dy: np.ndarray,
                   k: int) -> float:
    """|method's top k ∩ the k candidates with the largest exact Δy (ties by candidate order)| / k."""
    k = min(k, len(units))
    order = np.argsort(-dy, kind="stable")[:k]
    exact = {tuple(units[i]) for i in order}
    return len(exact & {tuple(u) for u in method_top[:k]}) / k if k else 0.0


def compare_image(plm: ImagePrefixLM, soft: torch.Tensor, text: list[int], target: int, allowed: torch.Tensor,
                  *, methods: Sequence[str] = METHODS, candidates: int, precision_k: int, ks: Sequence[int],
                  ig_steps: int, rows: int) -> tuple[list[dict], list[dict], list[dict]]:
    """One image: ``(candidate rows, per-method rows, curve rows)`` without ``image_id``.

    ``soft``: ``[1, P, d_model]``; ``allowed``: ``Bool[Tensor, "layers d_mlp"]`` (attributed layers).
    """
    layers = [l for l in range(allowed.shape[0]) if bool(allowed[l].any())]
    limit = max(candidates, max(ks), precision_k)
    scores, ranking, secs, totals = {}, {}, {}, {}
    for m in methods:
        t0 = time.perf_counter()
        _, s, totals[m] = unit_score_map(plm, soft, text, target, m, layers=layers, ig_steps=ig_steps,
                                         rows=rows)
        ranking[m] = rank_units(s, allowed, limit=limit)
        secs[m] = time.perf_counter() - t0
        scores[m] = s
    units = sorted({u for m in methods for u in ranking[m][:candidates]})
    gt = single_unit_effects(plm, soft, text, target, units, rows)
    dy, dp = gt["dy"].double().numpy(), gt["dp"].double().numpy()
    li = torch.tensor([u[0] for u in units], dtype=torch.long)
    ui = torch.tensor([u[1] for u in units], dtype=torch.long)
    sv = {m: scores[m][li, ui].double().numpy() for m in methods}
    cand = [{"layer": l, "unit": u, "dy": float(a), "dp": float(b)} | {f"score_{m}": float(sv[m][i]) for m in methods}
            for i, ((l, u), a, b) in enumerate(zip(units, dy, dp))]
    ks = sorted(ks)
    sets = [ranking[m][:k] for m in methods for k in ks]
    every = [tuple(u) for u in torch.nonzero(allowed).tolist()]  # y(0): every attributed unit zeroed
    y, p = set_effects(plm, soft, text, target, [[]] + sets + [every], rows)
    gap = float(y[0] - y[-1])
    p_clean, p = float(p[0]), p[1:-1].double().numpy().reshape(len(methods), len(ks))
    per, curve = [], []
    for j, m in enumerate(methods):
        rel = (p_clean - p[j]) / p_clean if p_clean > 0 else np.zeros(len(ks))
        curve += [{"method": m, "k": k, "p_target": float(pk), "p_clean": p_clean, "rel_drop": float(r)}
                  for k, pk, r in zip(ks, p[j], rel)]
        per.append({"method": m, "seconds": secs[m], "spearman": _corr(scipy.stats.spearmanr, sv[m], dy),
                    "kendall": _corr(scipy.stats.kendalltau, sv[m], dy),
                    "precision": precision_at_k(ranking[m], units, dy, precision_k), "auc": curve_area(rel),
                    "completeness": abs(totals[m] - gap) / abs(gap) if gap != 0 else None,
                    "n_candidates": len(units), "y_clean": gt["y_clean"], "p_clean": gt["p_clean"]})
    return cand, per, curve


def compare_images(captions: pl.DataFrame, load_image: Callable[[int], Image.Image], plm: ImagePrefixLM,
                   *, methods: Sequence[str] = METHODS, candidates: int, precision_k: int,
                   ks: Sequence[int], ig_steps: int, rows: int, layers: Sequence[int] | None = None,
                   max_images: int | None = None, progress: bool = True
                   ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Every image with a target (the first ``max_images`` by id): ``(candidates, per image ×
    method, curves)`` tables (:data:`CANDIDATE_SCHEMA`, :data:`IMAGE_SCHEMA`, :data:`CURVE_SCHEMA`).

    One untimed warm-up attribution precedes the timed ones, so the first method does not
    pay for lazy initialisation.
    """
    ad = plm.adapter
    allowed = torch.zeros(ad.n_layers, ad.d_mlp, dtype=torch.bool)
    allowed[list(range(ad.n_layers)) if layers is None else list(layers)] = True
    recs = list(captions.filter(pl.col("has_noun")).sort("image_id").iter_rows(named=True))[:max_images]
    cand, per, curve = [], [], []
    for n, r in enumerate(tqdm(recs, desc="compare_methods", disable=not progress)):
        soft = plm.image_soft_tokens([load_image(r["image_id"])])
        text, target = list(r["caption_token_ids"][: r["target_pos"]]), int(r["target_token_id"])
        if n == 0:
            unit_score_map(plm, soft, text, target, methods[0], layers=layers, ig_steps=ig_steps, rows=rows)
        c, p, cu = compare_image(plm, soft, text, target, allowed, methods=methods, candidates=candidates,
                                 precision_k=precision_k, ks=ks, ig_steps=ig_steps, rows=rows)
        iid = {"image_id": r["image_id"]}
        cand += [iid | x for x in c]
        per += [iid | x for x in p]
        curve += [iid | x for x in cu]
    return (pl.DataFrame(cand, schema=CANDIDATE_SCHEMA).sort(["image_id", "layer", "unit"]),
            pl.DataFrame(per, schema=IMAGE_SCHEMA).sort(["image_id", "method"]),
            pl.DataFrame(curve, schema=CURVE_SCHEMA).sort(["image_id", "method", "k"]))


SUMMARY_SCHEMA = {"method": pl.Utf8, "metric": pl.Utf8, "mean": pl.Float64, "lo": pl.Float64, "hi": pl.Float64,
                  "n": pl.Int64, "vs": pl.Utf8, "diff": pl.Float64, "diff_lo": pl.Float64, "diff_hi": pl.Float64,
                  "p": pl.Float64}
METRICS = ("spearman", "kendall", "precision", "auc", "completeness")  # deterministic: seconds are not
CURVE_TABLE_SCHEMA = {"method": pl.Utf8, "k": pl.Int64, "n": pl.Int64, "rel_drop": pl.Float64,
                      "rel_drop_lo": pl.Float64, "rel_drop_hi": pl.Float64, "drop_of_mean": pl.Float64}


def _paired_frame(per: pl.DataFrame, metric: str, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-image values of ``metric`` for methods a and b on the images where both are defined."""
    wide = (per.filter(pl.col("method").is_in([a, b])).pivot(on="method", index="image_id", values=metric)
            .drop_nulls().sort("image_id"))
    if wide.height == 0 or a not in wide.columns or b not in wide.columns:
        return np.zeros(0), np.zeros(0)
    return wide[a].to_numpy(), wide[b].to_numpy()


def method_summary(per: pl.DataFrame, seed: int = 0) -> pl.DataFrame:
    """One row per (method, metric): mean over images with its bootstrap CI; and one row per
    (method, metric, other method): the paired test over images (``vs``, ``diff*``, ``p``)."""
    from mmn.metrics.stats import bootstrap_ci, paired_test

    methods = [m for m in METHODS if m in set(per["method"])]
    rows = []
    for m in methods:
        g = per.filter(pl.col("method") == m)
        for metric in METRICS:
            x = g[metric].drop_nulls().to_numpy()
            if x.size:
                rows.append({"method": m, "metric": metric} | bootstrap_ci(x, seed=seed))
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            for metric in METRICS:
                xa, xb = _paired_frame(per, metric, a, b)
                if xa.size:
                    t = paired_test(xa, xb, seed=seed)
                    rows.append({"method": a, "metric": metric, "vs": b, "diff": t["diff"], "diff_lo": t["lo"],
                                 "diff_hi": t["hi"], "p": t["p"], "n": t["n"]})
    return pl.DataFrame(rows, schema=SUMMARY_SCHEMA)


def summary_lines(summary: pl.DataFrame, seconds: dict) -> list[str]:
    """Log lines: each method's Spearman and AUC (mean [CI], n) and its seconds per image."""
    lines = []
    for r in summary.filter(pl.col("vs").is_null(), pl.col("metric").is_in(["spearman", "auc"])).iter_rows(named=True):
        ci = "" if r["lo"] is None else f" [95% CI {r['lo']:.3f}, {r['hi']:.3f}]"
        lines.append(f"{r['method']}: {r['metric']} {r['mean']:.3f}{ci} (n={r['n']})")
    lines += [f"{m}: {t['mean']:.2f} s per image (wall time, in data/info only)" for m, t in seconds.items()]
    return lines


def timing_summary(per: pl.DataFrame, seed: int = 0) -> dict:
    """Seconds per image per method, ``{method: {"mean","lo","hi","n"}}`` (bootstrap over images).

    Wall time differs from run to run, so it goes to data/info/compare_methods.json, not to
    the metrics or tables, which a forced rerun rewrites byte for byte."""
    from mmn.metrics.stats import bootstrap_ci

    return {m: bootstrap_ci(per.filter(pl.col("method") == m)["seconds"].to_numpy(), seed=seed)
            for m in METHODS if m in set(per["method"])}


def method_curves(curve: pl.DataFrame, seed: int = 0) -> pl.DataFrame:
    """Per (method, k): mean per-image relative drop of p(c) with its CI, and the drop of the mean."""
    from mmn.experiments.ablation import drop_of_mean
    from mmn.metrics.stats import bootstrap_ci

    rows = []
    for (m, k), g in sorted(curve.group_by(["method", "k"]), key=lambda t: (METHODS.index(t[0][0]), t[0][1])):
        ci = bootstrap_ci(g["rel_drop"].to_numpy(), seed=seed)
        rows.append({"method": m, "k": k, "n": ci["n"], "rel_drop": ci["mean"], "rel_drop_lo": ci["lo"],
                     "rel_drop_hi": ci["hi"],
                     "drop_of_mean": drop_of_mean(g["p_target"].to_numpy(), g["p_clean"].to_numpy())})
    return pl.DataFrame(rows, schema=CURVE_TABLE_SCHEMA)


def methods_metrics(summary: pl.DataFrame, n_images: int) -> dict:
    """Compact numbers-only summary/methods.json (≤ 40 leaves; headline: metrics/methods.json): per method Spearman and
    Kendall as ``{"mean","lo","hi","n"}``, precision@k and curve area as means (their CIs:
    data/compare_methods.csv); integrated gradients' completeness error;
    per pair of methods the paired test's p-value on Spearman (differences with CIs: the CSV)."""
    out: dict = {"n_images": n_images}
    single = summary.filter(pl.col("vs").is_null())
    for r in single.iter_rows(named=True):
        d = out.setdefault(r["method"], {})
        if r["metric"] in ("spearman", "kendall"):
            d[r["metric"]] = {"mean": r["mean"], "lo": r["lo"], "hi": r["hi"], "n": r["n"]}
        elif r["metric"] != "completeness" or r["method"] == "integrated_gradients":
            d[r["metric"]] = r["mean"]
    for r in summary.filter(pl.col("vs").is_not_null(), pl.col("metric") == "spearman").iter_rows(named=True):
        out[f"{r['method']}_vs_{r['vs']}_spearman_p"] = r["p"]
    return out


def methods_info(precision_k: int, layers: Sequence[int], n_images: int, seconds: dict | None = None) -> dict:
    """The compare_methods stage's description (data/info/compare_methods.json): definitions
    (strings allowed) and the measured ``seconds_per_image`` per method (:func:`timing_summary`;
    wall time, not reproducible)."""
    return {
        "methods": list(METHODS), "layers": list(layers), "images": n_images, "seconds_per_image": seconds or {},
        "definitions": {
            "score": "per unit: max over image positions of A*M; M = dy/dA (grad_x_act), W_U[c].W_out^k "
                     "(direct_logit), path-averaged dy/dA from 0 to A, all layers scaled together "
                     "(integrated_gradients)",
            "candidates": "union over methods of each method's top `candidates` units of the image",
            "dy": "exact effect: y^c clean minus y^c with the unit alone zeroed at the image positions",
            "spearman": "Spearman correlation of the method's score with dy over the candidates, per image; "
                        "mean with 95% percentile bootstrap CI over images",
            "kendall": "Kendall tau-b of score vs dy over the candidates, per image; mean with 95% CI over images",
            "completeness": "|sum of A*M over every attributed unit and image position - (y(A) - y(0))| / "
                            "|y(A) - y(0)|, y(0) = all of them zeroed at the image positions; mean over images",
            "precision": f"|method's top k and exact top k by dy| / k, k = {precision_k}; mean over images",
            "auc": "area under the per-image ablation curve (relative drop of p(c), method's top k ablated "
                   "together, k in ablate.ks) with the ks equally spaced, divided by the gaps; mean over images",
            "seconds_per_image": "wall time of the method's per-unit scores for one image in this run (after "
                                 "one untimed warm-up), mean with 95% CI over images; here, not in "
                                 "summary/methods.json, because it is not reproducible byte for byte",
            "a_vs_b_spearman_p": "paired over images: two-sided sign-flip permutation p-value of the mean "
                                 "per-image Spearman difference a - b (diff and CI: the summary table)",
        },
        "tables": {"summary": "data/compare_methods.csv", "curves": "data/compare_methods_curve.csv",
                   "candidates": "data/compare_methods.parquet"},
    }
