"""The paper's figures, one function each, returning a matplotlib ``Figure``.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot: no global state,
nothing to close, Agg canvas), and saved by :func:`save_png` without a timestamp so
the same inputs give the same bytes. Text from the model (decoded tokens, captions) goes
through :func:`esc`: a ``$`` in a token is a dollar sign, not the start of mathtext.
"""

from __future__ import annotations

import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.patches  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from mmn.plots.heatmap import UNIT_COLORS  # noqa: E402
from mmn.plots.tables import ABLATION_KINDS, unit_key  # noqa: E402

RC = {"font.size": 9, "axes.titlesize": 10, "axes.spines.top": False,
      "axes.spines.right": False, "svg.hashsalt": "mmn"}
KIND_COLORS = {"unfiltered": "#d62728", "filtered": "#1f77b4", "random": "#7f7f7f", "random_filtered": "#9ecae1",
               "multimodal": "#d62728", "prompts": "#1f77b4", "random_prompts": "#7f7f7f",
               "coco_nouns": "#2ca02c", "captions": "#ff7f0e"}


def show_token(t: str) -> str:
    """A decoded token as a readable label (whitespace and control characters made visible)."""
    s = t.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if not s.strip():
        return repr(t)
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in s)


def esc(s: str) -> str:
    """Model text for a matplotlib label: ``$`` escaped so it never starts mathtext."""
    return s.replace("$", r"\$")


def _figure(w: float, h: float) -> Figure:
    with matplotlib.rc_context(RC):
        return Figure(figsize=(w, h), layout="constrained")


def save_png(fig: Figure, path: Path | str, dpi: int = 100) -> Path:
    """Write ``fig`` as PNG (no Software/date metadata: same figure, same bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(RC), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs of exotic tokens
        fig.savefig(path, format="png", dpi=dpi, metadata={"Software": None})
    return path


def _rc(fn):
    """Run a figure function under the module's rc settings (parse_math off, sizes)."""
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(RC):
            return fn(*args, **kwargs)
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def _image_ax(ax, picture: np.ndarray, title: str | None = None) -> None:
    ax.imshow(picture, interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)
    if title:
        ax.set_title(esc(title), fontsize=8)


def _marked_caption(ax, parts: tuple[str, str, str], y: float = 0.5, fontsize: float = 9) -> None:
    """Draw ``before + WORD + after`` on one line, the target word bold red (rainbow text)."""
    before, word, after = parts
    t = ax.text(0.0, y, esc(before), transform=ax.transAxes, fontsize=fontsize, va="center", ha="left")
    if word:
        t = ax.annotate(esc(word), xycoords=t, xy=(1, 0), va="bottom", ha="left", fontsize=fontsize,
                        color="#c00000", fontweight="bold")
        ax.annotate(esc(after), xycoords=t, xy=(1, 0), va="bottom", ha="left", fontsize=fontsize)
    ax.axis("off")


@_rc
def neuron_card(picture: np.ndarray, layer: int, unit: int, tokens: Sequence[str], logits: Sequence[float],
                *, interpretable: bool | None, n_words: int | None, max_g: float, image_label: str) -> Figure:
    """Fig. 1: one unit — its heatmap over its best image and its top decoded tokens."""
    fig = _figure(6.4, 3.0)
    ax_img, ax_tok = fig.subplots(1, 2, width_ratios=[1, 1.15])
    _image_ax(ax_img, picture, image_label)
    n = len(tokens)
    y = np.arange(n)[::-1]
    color = "#2ca02c" if interpretable else "#7f7f7f"
    ax_tok.barh(y, list(logits), color=color, alpha=0.8)
    ax_tok.set_yticks(y, [esc(show_token(t)) for t in tokens], fontsize=8)
    ax_tok.set_xlabel("logit of W_out[:, k] (decoded)")
    flag = "interpretable" if interpretable else "not interpretable"
    words = f", {n_words}/{n} words" if n_words is not None else ""
    ax_tok.set_title(f"{unit_key(layer, unit)}  ({flag}{words})")
    fig.suptitle(f"Layer {layer}, unit {unit} — max g = {max_g:.3g}", fontsize=10)
    return fig


@_rc
def image_units(picture: np.ndarray, units: Sequence[tuple[int, int]], labels: Sequence[str],
                caption: tuple[str, str, str], title: str) -> Figure:
    """Fig. 2: an image with its top units' receptive fields (0.95 quantile) superimposed,
    one colour per unit, and its caption with the target word marked."""
    fig = _figure(6.4, 3.7)
    gs = fig.add_gridspec(2, 2, height_ratios=[1, 0.06], width_ratios=[1, 1.05])
    ax = fig.add_subplot(gs[0, 0])
    _image_ax(ax, picture, title)
    leg = fig.add_subplot(gs[0, 1])
    leg.axis("off")
    for i, ((layer, unit), lab) in enumerate(zip(units, labels)):
        col = np.asarray(UNIT_COLORS[i % len(UNIT_COLORS)]) / 255
        yy = 0.95 - i * 0.19
        leg.add_patch(matplotlib.patches.Rectangle((0.0, yy - 0.045), 0.07, 0.09, color=col,
                                                   transform=leg.transAxes))
        leg.text(0.1, yy + 0.02, unit_key(layer, unit), transform=leg.transAxes, fontsize=9, fontweight="bold",
                 va="center")
        leg.text(0.1, yy - 0.05, esc(lab), transform=leg.transAxes, fontsize=7.5, va="center", wrap=True)
    cap = fig.add_subplot(gs[1, :])
    _marked_caption(cap, caption)
    return fig


@_rc
def unit_top_images(layer: int, unit: int, tokens: Sequence[str], panels: Sequence[tuple[np.ndarray, str]]) -> Figure:
    """Fig. 4: a unit's top-activating images with their heatmaps (0.95 quantile)."""
    n = max(len(panels), 1)
    fig = _figure(1.9 * n + 0.4, 2.6)
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax, (pic, label) in zip(axes, panels):
        _image_ax(ax, pic, label)
    for ax in axes[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{unit_key(layer, unit)}: " + esc(", ".join(show_token(t) for t in tokens[:6])), fontsize=9)
    return fig


SCORE_PANELS = (("mean over patches", ("prompts", "random_prompts", "coco_nouns", "captions")),
                ("max over patches", ("prompts_max", "random_prompts_max", "coco_nouns", "captions")))


@_rc
def score_distributions(bert: dict[str, np.ndarray], clip: dict[str, np.ndarray], bins: int,
                        clip_note: str | None = None, scale_note: str | None = None,
                        cis: dict[str, dict[str, dict]] | None = None) -> Figure:
    """Fig. 3: per-image score distributions of decoded image prompts (left: mean over an
    image's patches; right: max over them) vs random vectors, COCO nouns and the model's
    captions (one value per image each; :func:`mmn.plots.tables.score_series`). One row per
    computed metric (BERTScore; CLIPScore when computed, else ``clip_note``). ``cis``:
    ``{metric: {label: {"mean","lo","hi"}}}`` drawn as a 95% CI bar over each histogram;
    ``scale_note`` (the scales used) goes under the figure."""
    rows = [("bertscore", "BERTScore F1", bert)] + ([("clipscore", "CLIPScore", clip)] if clip else [])
    fig = _figure(7.6, 2.9 * len(rows) + 0.7)
    axes = np.atleast_2d(fig.subplots(len(rows), 2))
    for (metric, name, series), row in zip(rows, axes):
        for ax, (stat, labels) in zip(row, SCORE_PANELS):
            have = {lb: series[lb] for lb in labels if lb in series}
            if not have:
                ax.axis("off")
                continue
            allv = np.concatenate(list(have.values()))
            lo, hi = float(allv.min()), float(allv.max())
            edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
            top = 0.0
            for label, v in have.items():
                c = KIND_COLORS.get(label.removesuffix("_max"))
                h = ax.hist(v, bins=edges, density=True, histtype="stepfilled", alpha=0.3, color=c)[0]
                ax.hist(v, bins=edges, density=True, histtype="step", color=c,
                        label=f"{label.removesuffix('_max')} (n={v.size} images)")
                top = max(top, float(np.max(h)) if len(h) else 0.0)
            for j, label in enumerate(have):  # mean with its 95% bootstrap CI over images
                ci = (cis or {}).get(metric, {}).get(label)
                if not ci:
                    continue
                c = KIND_COLORS.get(label.removesuffix("_max"))
                y = top * (1.08 + 0.07 * j)
                lo_c = ci["mean"] if ci.get("lo") is None else ci["lo"]
                hi_c = ci["mean"] if ci.get("hi") is None else ci["hi"]
                ax.errorbar([ci["mean"]], [y], xerr=[[ci["mean"] - lo_c], [hi_c - ci["mean"]]], fmt="o", ms=3,
                            color=c, capsize=2, lw=1)
            ax.set_ylim(0, top * (1.15 + 0.07 * len(have)))
            ax.set_xlabel(f"{name}, per image ({stat})", fontsize=8), ax.set_ylabel("density")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=7, frameon=False)
    foot = " ".join(x for x in (scale_note, None if clip or not clip_note else f"CLIPScore: {clip_note}") if x)
    fig.suptitle("\n".join(["Decoded image prompts vs baselines (Fig. 3; bars: mean with 95% bootstrap CI over "
                            "images)", *textwrap.wrap(foot, 115)]), fontsize=8)
    return fig


@_rc
def iou_figure(bars: pl.DataFrame) -> Figure:
    """Fig. 5: per category, mean over images of the per-image IoU, multimodal vs random
    units (error bars: 95% bootstrap CI over images; none when n < 2); n images under each label."""
    cats = list(dict.fromkeys(bars["category"].to_list()))
    fig = _figure(max(4.0, 0.8 * len(cats) + 1.5), 3.0)
    ax = fig.subplots()
    x = np.arange(len(cats))
    n = {r["category"]: r["n"] for r in bars.iter_rows(named=True)}
    for off, kind in ((-0.2, "multimodal"), (0.2, "random")):
        sub = {r["category"]: r for r in bars.filter(pl.col("kind") == kind).iter_rows(named=True)}
        vals = np.array([sub[c]["iou"] if c in sub else np.nan for c in cats], dtype=float)
        lo = np.array([sub[c]["lo"] if c in sub and sub[c]["lo"] is not None else np.nan for c in cats], dtype=float)
        hi = np.array([sub[c]["hi"] if c in sub and sub[c]["hi"] is not None else np.nan for c in cats], dtype=float)
        err = np.nan_to_num(np.vstack([vals - lo, hi - vals]), nan=0.0)
        ax.bar(x + off, vals, 0.4, yerr=err, capsize=3, color=KIND_COLORS[kind], label=kind, alpha=0.85)
    ax.set_xticks(x, [f"{c}\n(n={n.get(c, 0)})" for c in cats], rotation=30 if len(cats) > 6 else 0)
    ax.set_ylabel("IoU with COCO mask")
    ax.set_title("Fig. 5: receptive fields vs masks (95% bootstrap CIs over images)", fontsize=9)
    ax.legend(frameon=False)
    return fig


def _floats(s: pl.Series) -> np.ndarray:
    """A column as float64 numbers, null -> NaN (matplotlib leaves a gap)."""
    return s.cast(pl.Float64).fill_null(float("nan")).to_numpy()


@_rc
def ablation_figure(curves: pl.DataFrame, example: dict | None) -> Figure:
    """Fig. 6: relative drop of p(c) vs number of ablated units k, per kind: the mean of
    per-image drops (solid, band: 95% bootstrap CI over images) and the drop of the mean
    p(c) (dashed); BERTScore of the regenerated captions (band: CI) when present; one
    caption before/after. ``curves``: :func:`mmn.plots.tables.ablation_curves`."""
    has_b = "bertscore_f1" in curves.columns and curves["bertscore_f1"].null_count() < curves.height
    fig = _figure(10.0 if has_b else 7.0, 3.4)
    axes = fig.subplots(1, 3 if has_b else 2, width_ratios=[1, 1, 0.9] if has_b else [1, 0.9])
    panels = [("rel_drop", "relative drop of p(c)")]
    if has_b:
        panels.append(("bertscore_f1", "BERTScore F1 vs clean caption"))
    for ax, (col, ylabel) in zip(axes, panels):
        lo_c, hi_c = ("rel_drop_lo", "rel_drop_hi") if col == "rel_drop" else ("bertscore_lo", "bertscore_hi")
        for kind in ABLATION_KINDS:
            sub = curves.filter(pl.col("kind") == kind).sort("k")
            if sub.height == 0:
                continue
            k, m = sub["k"].to_numpy(), _floats(sub[col])
            lo, hi = _floats(sub[lo_c]), _floats(sub[hi_c])  # null (n < 2): no band there
            ax.plot(k, m, marker="o", ms=3, color=KIND_COLORS[kind], label=kind)
            ax.fill_between(k, lo, hi, color=KIND_COLORS[kind], alpha=0.2, lw=0)
            if col == "rel_drop":
                ax.plot(k, _floats(sub["drop_of_mean"]), ls="--", lw=1, color=KIND_COLORS[kind], label="_nolegend_")
        ks = sorted(set(curves["k"].to_list()))
        ax.set_xscale("symlog", linthresh=max(1, min([k for k in ks if k > 0], default=1)))
        ax.set_xticks(ks, [str(k) for k in ks], rotation=45, fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("k (ablated units)"), ax.set_ylabel(ylabel)
        if col == "rel_drop":  # line styles: one proxy entry each
            ax.plot([], [], color="0.4", label="mean of per-image drops (95% CI)")
            ax.plot([], [], color="0.4", ls="--", lw=1, label="drop of the mean p(c)")
        ax.legend(frameon=False, fontsize=7)
    axes[0].set_title("Ablating top units by g (Fig. 6)")
    ax = axes[-1]
    ax.axis("off")
    if example:
        ax.set_title(f"image {example['image_id']}, k = {example['k']}", fontsize=9)
        txt = (f"before:\n{example['before']}\n\nafter ablating the top {example['k']} units:\n{example['after']}"
               f"\n\np(c): {example['p_clean']:.3f} → {example['p_after']:.3f}")
        ax.text(0.0, 0.95, esc(txt), va="top", ha="left", fontsize=8, wrap=True, transform=ax.transAxes)
    else:
        ax.text(0.0, 0.9, "no caption changed under ablation", fontsize=8, transform=ax.transAxes)
    return fig


@_rc
def layer_histogram(dist: pl.DataFrame) -> Figure:
    """Supplement: where the top attributed units sit (images' top units per layer, i.e.
    (image, unit) pairs; interpretable stacked). ``dist``: the filter stage's
    ``layer_distribution.csv`` (``layer, n_units, n_interpretable_units, share``)."""
    fig = _figure(6.0, 2.8)
    ax = fig.subplots()
    x = dist["layer"].to_numpy()
    n, ni = dist["n_units"].to_numpy(), dist["n_interpretable_units"].to_numpy()
    ax.bar(x, n - ni, color="#7f7f7f", label="not interpretable")
    ax.bar(x, ni, bottom=n - ni, color="#2ca02c", label="interpretable")
    ax.set_xlabel("layer")
    ax.set_ylabel("images' top units")
    ax.set_title("Layer distribution of top attributed units")
    ax.legend(frameon=False)
    return fig


@_rc
def selectivity_figure(rows: Sequence[str], cats: Sequence[str], m: np.ndarray) -> Figure:
    """Supplement: category selectivity — mean activation of each category's most frequent
    interpretable units on every category, divided by its max |mean| over categories
    (in [-1, 1]; order and sign of the means kept)."""
    fig = _figure(max(4.0, 0.7 * len(cats) + 2.5), max(2.5, 0.22 * len(rows) + 1.2))
    ax = fig.subplots()
    if not rows:
        ax.axis("off")
        ax.text(0.5, 0.5, "no interpretable units for the selectivity categories", ha="center", va="center")
        return fig
    im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(cats)), cats, rotation=30)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("images of category")
    fig.colorbar(im, ax=ax, label="mean activation / max |mean|")
    ax.set_title("Category selectivity")
    return fig


@_rc
def projection_loss_figure(loss: pl.DataFrame, best_step: int | None = None) -> Figure:
    """Projection training: the training-batch loss of every step and the validation loss
    (held-out training images) at every evaluation, each drawn over the steps where it has a
    value (``loss``: step, train_loss, val_loss, nulls elsewhere); the kept checkpoint marked."""
    fig = _figure(5.0, 2.8)
    ax = fig.subplots()
    x = loss["step"].to_numpy()
    for col, color, label in (("train_loss", "#1f77b4", "train"), ("val_loss", "#d62728", "validation")):
        if col in loss.columns:
            y = _floats(loss[col])
            ok = np.isfinite(y)
            if ok.any():
                ax.plot(x[ok], y[ok], marker="." if col == "val_loss" else None, color=color, label=label)
    if best_step is not None:
        ax.axvline(best_step, color="#7f7f7f", linestyle="--", label=f"kept (step {best_step})")
    ax.set_xlabel("step")
    ax.set_ylabel("caption cross-entropy")
    ax.set_title("Projection training")
    ax.legend(frameon=False)
    return fig


METHOD_COLORS = {"grad_x_act": "#1f77b4", "direct_logit": "#2ca02c", "integrated_gradients": "#9467bd"}


@_rc
def methods_figure(curves: pl.DataFrame, summary: pl.DataFrame) -> Figure:
    """Attribution methods vs the exact effect (stage compare_methods): left, the relative drop
    of p(c) when each method's top-k units are ablated (band: 95% CI over images; ``curves``:
    data/compare_methods_curve.csv); right, Spearman and Kendall correlation of each method's
    unit score with the exact single-unit Δy, mean over images with 95% CIs (``summary``:
    data/compare_methods.csv)."""
    fig = _figure(9.0, 3.4)
    ax, bx = fig.subplots(1, 2, width_ratios=[1.2, 1])
    methods = [m for m in METHOD_COLORS if m in set(curves["method"]) | set(summary["method"])]
    for m in methods:
        sub = curves.filter(pl.col("method") == m).sort("k")
        if sub.height:
            k = sub["k"].to_numpy()
            ax.plot(k, _floats(sub["rel_drop"]), marker="o", ms=3, color=METHOD_COLORS[m], label=m)
            ax.fill_between(k, _floats(sub["rel_drop_lo"]), _floats(sub["rel_drop_hi"]), color=METHOD_COLORS[m],
                            alpha=0.2, lw=0)
    ks = sorted(set(curves["k"].to_list()))
    if ks:
        ax.set_xscale("symlog", linthresh=max(1, min([k for k in ks if k > 0], default=1)))
        ax.set_xticks(ks, [str(k) for k in ks], rotation=45, fontsize=7)
        ax.minorticks_off()
    ax.set_xlabel("k (top units of the method ablated)"), ax.set_ylabel("relative drop of p(c)")
    ax.set_title("Ablation curve per method")
    ax.legend(frameon=False, fontsize=7)
    single = summary.filter(pl.col("vs").is_null())
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        vals = []
        for metric in ("spearman", "kendall"):
            r = single.filter(pl.col("method") == m, pl.col("metric") == metric)
            vals.append(r.row(0, named=True) if r.height else {"mean": None, "lo": None, "hi": None})
        mean = np.array([np.nan if v["mean"] is None else v["mean"] for v in vals])
        lo = np.array([np.nan if v["lo"] is None else v["lo"] for v in vals])
        hi = np.array([np.nan if v["hi"] is None else v["hi"] for v in vals])
        x = np.arange(2) + (j - (len(methods) - 1) / 2) * width
        bx.bar(x, mean, width, color=METHOD_COLORS[m], label=m)
        bx.errorbar(x, mean, yerr=np.abs(np.vstack([mean - lo, hi - mean])), fmt="none", ecolor="0.2", capsize=3)
    bx.axhline(0, color="0.5", lw=0.8)
    bx.set_xticks(range(2), ["Spearman", "Kendall τ-b"])
    bx.set_ylabel("correlation with exact Δy (per image)")
    bx.set_title("Score vs single-unit ablation")
    return fig
