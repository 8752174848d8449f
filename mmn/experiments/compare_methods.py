"""Which attribution finds the units that matter? Every method against the exact effect.

Per image with a target c, for each method of :data:`mmn.neurons.methods.METHODS`:

1. the method's per-unit score from one pass, aggregated over image positions both ways:
   ``max`` of A·M (the paper's g; the method's plain name) and ``sum`` Σ_p A·M (named
   ``<method>:sum``; the first-order estimate of the exact effect below, which zeroes the unit
   at ALL image positions), and the pass's wall time;
2. candidates: the union over variants of each one's top ``candidates`` units; and, apart
   from them, a seeded uniform ``sample`` of units of the attributed layers (chosen without
   looking at any score: correlations over the union of top units are over a selected set,
   where a unit ranked high by one method and low by another makes a negative correlation
   with no relation behind it, Berkson's paradox);
3. ground truth: each candidate and sampled unit ablated ALONE (zeroed at the image
   positions), the rows of batched forwards (:func:`mmn.neurons.ablation.single_unit_effects`):
   exact Δy^c = y_clean − y_ablated and Δp(c);
4. per variant: Spearman and Kendall (tau-b) correlation of its score with Δy over the
   uniform sample (the headline; ``*_union``: over the candidates, as before, selected);
   precision@k = |variant's top k ∩ exact top k by Δy among the candidates| / k; the ablation curve
   (relative drop of p(c) with the method's top k units ablated together, k in
   ``ablate.ks``, the same ablation code) and its area (trapezoid with the ks equally
   spaced, divided by their number of gaps: the mean height of the curve as plotted);
   ``completeness``: |Σ A·M − gap| / |gap| over every attributed unit and image position,
   gap = y(A) − y(0), y(0) = all of them zeroed; for integrated gradients, complete layer by
   layer, gap = Σ_l [y(A) − y(A_l = 0)] (its error is exactly 0 in the limit of many steps;
   for the others how far their linear estimate is from the truth).
   A mean of per-image ratios is dominated by images with a tiny y(A) − y(0), so the summary
   gives its median and the ratio of sums Σ_i |error_i| / Σ_i |gap_i|, each with a CI.

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
from mmn.neurons.methods import METHODS, unit_score_map, unit_score_maps

AGGREGATES = ("max", "sum")


def variant(method: str, aggregate: str) -> str:
    """A compared variant's name: the method's (the paper's ``max``) or ``<method>:sum``."""
    return method if aggregate == "max" else f"{method}:{aggregate}"


VARIANTS = tuple(variant(m, a) for m in METHODS for a in AGGREGATES)
CANDIDATE_SCHEMA = {"image_id": pl.Int64, "layer": pl.Int64, "unit": pl.Int64, "candidate": pl.Boolean,
                    "sampled": pl.Boolean, "dy": pl.Float64, "dp": pl.Float64} | {
                    f"score_{v}": pl.Float64 for v in VARIANTS}
IMAGE_SCHEMA = {"image_id": pl.Int64, "method": pl.Utf8, "seconds": pl.Float64, "spearman": pl.Float64,
                "kendall": pl.Float64, "spearman_union": pl.Float64, "kendall_union": pl.Float64,
                "precision": pl.Float64, "auc": pl.Float64, "completeness": pl.Float64,
                "total": pl.Float64, "gap": pl.Float64, "n_candidates": pl.Int64, "n_sampled": pl.Int64,
                "y_clean": pl.Float64, "p_clean": pl.Float64}
CURVE_SCHEMA = {"image_id": pl.Int64, "method": pl.Utf8, "k": pl.Int64, "p_target": pl.Float64,
                "p_clean": pl.Float64, "rel_drop": pl.Float64}


def curve_area(rel_drop: Sequence[float]) -> float:
    """Area under the ablation curve with the ks equally spaced, per gap (= mean height)."""
    r = np.asarray(rel_drop, dtype=np.float64)
    if r.size == 1:
        return float(r[0])
    return float(((r[1:] + r[:-1]) / 2).mean())


def rank_corr(fn, s: np.ndarray, dy: np.ndarray) -> float | None:
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


def uniform_units(allowed: torch.Tensor, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``n`` units drawn uniformly without replacement from the ``allowed`` ones
    (``Bool[Tensor, "layers d_mlp"]``), sorted: chosen without looking at any score."""
    every = torch.nonzero(allowed).tolist()
    pick = rng.choice(len(every), size=min(n, len(every)), replace=False)
    return sorted(tuple(every[i]) for i in pick.tolist())


def compare_image(plm: ImagePrefixLM, soft: torch.Tensor, text: list[int], target: int, allowed: torch.Tensor,
                  *, methods: Sequence[str] = METHODS, candidates: int, precision_k: int, ks: Sequence[int],
                  ig_steps: int, rows: int, sample: int = 0, rng: np.random.Generator | None = None,
                  aggregates: Sequence[str] = AGGREGATES) -> tuple[list[dict], list[dict], list[dict]]:
    """One image: ``(candidate and sampled unit rows, per-variant rows, curve rows)`` without
    ``image_id``. ``soft``: ``[1, P, d_model]``; ``allowed``: ``Bool[Tensor, "layers d_mlp"]``
    (attributed layers); ``sample`` units are drawn with ``rng`` (:func:`uniform_units`).
    """
    layers = [l for l in range(allowed.shape[0]) if bool(allowed[l].any())]
    limit = max(candidates, max(ks), precision_k)
    scores, ranking, secs, totals = {}, {}, {}, {}
    for m in methods:
        t0 = time.perf_counter()
        _, maps, total = unit_score_maps(plm, soft, text, target, m, layers=layers, ig_steps=ig_steps, rows=rows,
                                         aggregates=aggregates)
        for agg in aggregates:  # one pass, both aggregates: the same wall time
            v = variant(m, agg)
            scores[v], totals[v] = maps[agg], total
            ranking[v] = rank_units(maps[agg], allowed, limit=limit)
            secs[v] = time.perf_counter() - t0
    names = list(scores)
    cands = sorted({u for v in names for u in ranking[v][:candidates]})
    sampled = uniform_units(allowed, sample, rng) if sample else []
    units = sorted(set(cands) | set(sampled))
    gt = single_unit_effects(plm, soft, text, target, units, rows)
    dy_all, dp = gt["dy"].double().numpy(), gt["dp"].double().numpy()
    li = torch.tensor([u[0] for u in units], dtype=torch.long)
    ui = torch.tensor([u[1] for u in units], dtype=torch.long)
    sv_all = {v: scores[v][li, ui].double().numpy() for v in names}
    in_c, in_s = set(cands), set(sampled)
    cand = [{"layer": l, "unit": u, "candidate": (l, u) in in_c, "sampled": (l, u) in in_s, "dy": float(a),
             "dp": float(b)} | {f"score_{v}": float(sv_all[v][i]) for v in names}
            for i, ((l, u), a, b) in enumerate(zip(units, dy_all, dp))]
    ci = np.array([u in in_c for u in units], dtype=bool)
    si = np.array([u in in_s for u in units], dtype=bool)
    ks = sorted(ks)
    sets = [ranking[v][:k] for v in names for k in ks]
    every = [tuple(u) for u in torch.nonzero(allowed).tolist()]  # y(0): every attributed unit zeroed
    per_layer = [[(l, u) for u in range(allowed.shape[1]) if bool(allowed[l, u])] for l in layers]
    y, p = set_effects(plm, soft, text, target, [[]] + sets + [every] + per_layer, rows)
    n_sets = 1 + len(sets)
    gap = float(y[0] - y[n_sets])  # y(A) - y(0)
    gap_layers = float(sum(y[0] - y[n_sets + 1 + j] for j in range(len(per_layer))))  # sum_l y(A) - y(A_l = 0)
    p_clean, p = float(p[0]), p[1:n_sets].double().numpy().reshape(len(names), len(ks))
    per, curve = [], []
    for j, v in enumerate(names):
        rel = (p_clean - p[j]) / p_clean if p_clean > 0 else np.zeros(len(ks))
        curve += [{"method": v, "k": k, "p_target": float(pk), "p_clean": p_clean, "rel_drop": float(r)}
                  for k, pk, r in zip(ks, p[j], rel)]
        s, d = sv_all[v], dy_all
        g = gap_layers if v.split(":")[0] == "integrated_gradients" else gap  # what its total estimates
        per.append({"method": v, "seconds": secs[v],
                    "spearman": rank_corr(scipy.stats.spearmanr, s[si], d[si]) if sample else None,
                    "kendall": rank_corr(scipy.stats.kendalltau, s[si], d[si]) if sample else None,
                    "spearman_union": rank_corr(scipy.stats.spearmanr, s[ci], d[ci]),
                    "kendall_union": rank_corr(scipy.stats.kendalltau, s[ci], d[ci]),
                    "precision": precision_at_k(ranking[v], cands, d[ci], precision_k), "auc": curve_area(rel),
                    "completeness": abs(totals[v] - g) / abs(g) if g != 0 else None,
                    "total": totals[v], "gap": g, "n_candidates": len(cands), "n_sampled": len(sampled),
                    "y_clean": gt["y_clean"], "p_clean": gt["p_clean"]})
    return cand, per, curve


def compare_images(captions: pl.DataFrame, load_image: Callable[[int], Image.Image], plm: ImagePrefixLM,
                   *, methods: Sequence[str] = METHODS, candidates: int, precision_k: int,
                   ks: Sequence[int], ig_steps: int, rows: int, layers: Sequence[int] | None = None,
                   max_images: int | None = None, progress: bool = True, sample: int = 0, seed: int = 0,
                   aggregates: Sequence[str] = AGGREGATES) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Every image with a target (the first ``max_images`` by id): ``(candidates, per image ×
    variant, curves)`` tables (:data:`CANDIDATE_SCHEMA`, :data:`IMAGE_SCHEMA`, :data:`CURVE_SCHEMA`).
    Each image's uniform sample is drawn with ``default_rng([seed, image_id])``.

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
                                 precision_k=precision_k, ks=ks, ig_steps=ig_steps, rows=rows, sample=sample,
                                 rng=np.random.default_rng([seed, int(r["image_id"])]), aggregates=aggregates)
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
METRICS = ("spearman", "kendall", "spearman_union", "kendall_union", "precision", "auc")  # seconds: not deterministic
COMPLETENESS = {  # per-image (error, gap) -> one number: a mean of ratios is dominated by tiny gaps
    "completeness_median": lambda e, g, axis=-1: np.median(e / g, axis=axis),
    "completeness_ratio": lambda e, g, axis=-1: e.sum(axis=axis) / g.sum(axis=axis),
}
CURVE_TABLE_SCHEMA = {"method": pl.Utf8, "k": pl.Int64, "n": pl.Int64, "rel_drop": pl.Float64,
                      "rel_drop_lo": pl.Float64, "rel_drop_hi": pl.Float64, "drop_of_mean": pl.Float64}


def _paired_frame(per: pl.DataFrame, metric: str, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-image values of ``metric`` for methods a and b on the images where both are defined."""
    wide = (per.filter(pl.col("method").is_in([a, b])).pivot(on="method", index="image_id", values=metric)
            .drop_nulls().sort("image_id"))
    if wide.height == 0 or a not in wide.columns or b not in wide.columns:
        return np.zeros(0), np.zeros(0)
    return wide[a].to_numpy(), wide[b].to_numpy()


def _variants(per: pl.DataFrame) -> list[str]:
    present = set(per["method"])
    return [v for v in VARIANTS if v in present]


def method_summary(per: pl.DataFrame, seed: int = 0) -> pl.DataFrame:
    """One row per (variant, metric): mean over images with its bootstrap CI (for
    ``completeness_median`` / ``completeness_ratio`` the median of the per-image relative
    errors and Σ|error| / Σ|gap|, with bootstrap CIs over images); and one row per (variant,
    metric, other variant): the paired test over images (``vs``, ``diff*``, ``p``)."""
    from mmn.metrics.stats import bootstrap_ci, bootstrap_statistic, paired_test

    methods = _variants(per)
    rows = []
    for m in methods:
        g = per.filter(pl.col("method") == m)
        for metric in METRICS:
            x = g[metric].drop_nulls().to_numpy()
            if x.size:
                rows.append({"method": m, "metric": metric} | bootstrap_ci(x, seed=seed))
        eg = g.filter(pl.col("gap") != 0).select((pl.col("total") - pl.col("gap")).abs().alias("e"),
                                                 pl.col("gap").abs().alias("g"))
        if eg.height:
            for metric, stat in COMPLETENESS.items():
                b = bootstrap_statistic((eg["e"].to_numpy(), eg["g"].to_numpy()), stat, seed=seed)
                rows.append({"method": m, "metric": metric, "mean": b["value"], "lo": b["lo"], "hi": b["hi"],
                             "n": b["n"]})
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
            for m in _variants(per) if m in METHODS}  # one pass per method gives both aggregates


def method_curves(curve: pl.DataFrame, seed: int = 0) -> pl.DataFrame:
    """Per (method, k): mean per-image relative drop of p(c) with its CI, and the drop of the mean."""
    from mmn.experiments.ablation import drop_of_mean
    from mmn.metrics.stats import bootstrap_ci

    rows = []
    for (m, k), g in sorted(curve.group_by(["method", "k"]), key=lambda t: (VARIANTS.index(t[0][0]), t[0][1])):
        ci = bootstrap_ci(g["rel_drop"].to_numpy(), seed=seed)
        rows.append({"method": m, "k": k, "n": ci["n"], "rel_drop": ci["mean"], "rel_drop_lo": ci["lo"],
                     "rel_drop_hi": ci["hi"],
                     "drop_of_mean": drop_of_mean(g["p_target"].to_numpy(), g["p_clean"].to_numpy())})
    return pl.DataFrame(rows, schema=CURVE_TABLE_SCHEMA)


def methods_metrics(summary: pl.DataFrame, n_images: int) -> dict:
    """Numbers-only summary/methods.json (headline: metrics/methods.json): per variant Spearman
    over the uniform sample as ``{"mean","lo","hi","n"}``, Kendall, the selected union's
    Spearman, precision@k and curve area as means (their CIs: data/compare_methods.csv); the
    completeness median and ratio of sums with CIs; per pair of the paper's (max) methods and
    per method's max vs sum the paired test's p-value on the sample's Spearman."""
    out: dict = {"n_images": n_images}
    single = summary.filter(pl.col("vs").is_null())
    for r in single.iter_rows(named=True):
        d = out.setdefault(r["method"], {})
        if r["metric"] == "spearman":
            d[r["metric"]] = {"mean": r["mean"], "lo": r["lo"], "hi": r["hi"], "n": r["n"]}
        elif r["metric"].startswith("completeness"):  # one pass gives both aggregates the same total
            if r["method"] in METHODS:
                d[r["metric"]] = {"value": r["mean"], "lo": r["lo"], "hi": r["hi"]}
        elif r["metric"] != "kendall_union":
            d[r["metric"]] = r["mean"]
    pairs = {(a, b) for i, a in enumerate(METHODS) for b in METHODS[i + 1:]} | {
        (m, variant(m, "sum")) for m in METHODS}
    for r in summary.filter(pl.col("vs").is_not_null(), pl.col("metric") == "spearman").iter_rows(named=True):
        if (r["method"], r["vs"]) in pairs:
            out[f"{r['method']}_vs_{r['vs']}_spearman_p"] = r["p"]
    return out


def methods_info(precision_k: int, layers: Sequence[int], n_images: int, seconds: dict | None = None) -> dict:
    """The compare_methods stage's description (data/info/compare_methods.json): definitions
    (strings allowed) and the measured ``seconds_per_image`` per method (:func:`timing_summary`;
    wall time, not reproducible)."""
    return {
        "methods": list(METHODS), "variants": list(VARIANTS), "layers": list(layers), "images": n_images,
        "seconds_per_image": seconds or {},
        "definitions": {
            "score": "per unit: max (the method's name) or sum (<method>:sum) over image positions of A*M; "
                     "M = dy/dA (grad_x_act), W_U[c].W_out^k (direct_logit), path-averaged dy/dA_l from 0 to A_l "
                     "with only layer l scaled and the later layers computing (integrated_gradients)",
            "candidates": "union over variants of each variant's top `candidates` units of the image",
            "sample": "compare.sample units drawn uniformly (seeded per image) from the attributed layers, "
                      "without looking at any score",
            "dy": "exact effect: y^c clean minus y^c with the unit alone zeroed at the image positions",
            "spearman": "Spearman correlation of the variant's score with dy over the uniform sample, per image; "
                        "mean with 95% percentile bootstrap CI over images",
            "kendall": "Kendall tau-b of score vs dy over the uniform sample, per image; mean over images",
            "spearman_union": "Spearman over the candidates (the union of top units: a selected set, where "
                              "Berkson's paradox can make a correlation with no relation behind it)",
            "completeness_median": "median over images of |sum of A*M over every attributed unit and image "
                                   "position - gap| / |gap|, gap = y(A) - y(0) (y(0) = all of them zeroed at the "
                                   "image positions), for integrated_gradients sum over layers l of "
                                   "y(A) - y(A_l = 0); 95% bootstrap CI over images",
            "completeness_ratio": "sum over images of |sum A*M - gap| / sum over images of |gap|: not dominated "
                                  "by images with a tiny gap; 95% bootstrap CI",
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
