"""The paper's figures, one function each, returning a matplotlib ``Figure``.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot: no global state,
nothing to close, Agg canvas), and saved by :func:`save_png` without a timestamp so
the same inputs give the same bytes. Text from the model (decoded tokens, captions) goes
through :func:`esc`: a ``$`` in a token is a dollar sign, not the start of mathtext.
"""

from __future__ import annotations

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
KIND_COLORS = {"unfiltered": "#d62728", "filtered": "#1f77b4", "random": "#7f7f7f",
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


@_rc
def score_distributions(bert: dict[str, np.ndarray], clip: dict[str, np.ndarray], bins: int,
                        clip_note: str | None = None) -> Figure:
    """Fig. 3: BERTScore (and CLIPScore when computed) distributions of decoded image
    prompts vs random vectors vs COCO nouns vs the model's captions."""
    fig = _figure(7.2, 3.0)
    ax_b, ax_c = fig.subplots(1, 2)
    for ax, series, name in ((ax_b, bert, "BERTScore F1"), (ax_c, clip, "CLIPScore")):
        if not series:
            ax.axis("off")
            ax.text(0.5, 0.5, f"{name}\n{clip_note or 'not computed'}", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8, wrap=True)
            continue
        allv = np.concatenate(list(series.values()))
        lo, hi = float(allv.min()), float(allv.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
        for label, v in series.items():
            c = KIND_COLORS.get(label)
            ax.hist(v, bins=edges, density=True, histtype="stepfilled", alpha=0.3, color=c)
            ax.hist(v, bins=edges, density=True, histtype="step", color=c, label=f"{label} (n={v.size})")
            ax.axvline(float(v.mean()), color=c, ls="--", lw=1)
        ax.set_xlabel(name), ax.set_ylabel("density")
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle("Decoded image prompts vs baselines (Fig. 3; dashed: means)", fontsize=10)
    return fig


@_rc
def iou_figure(bars: pl.DataFrame) -> Figure:
    """Fig. 5: mean IoU per category, multimodal vs random units (error bars: SEM)."""
    cats = list(dict.fromkeys(bars["category"].to_list()))
    fig = _figure(max(4.0, 0.8 * len(cats) + 1.5), 3.0)
    ax = fig.subplots()
    x = np.arange(len(cats))
    for off, kind in ((-0.2, "multimodal"), (0.2, "random")):
        sub = {r["category"]: r for r in bars.filter(pl.col("kind") == kind).iter_rows(named=True)}
        vals = [sub[c]["iou"] if c in sub else np.nan for c in cats]
        errs = [sub[c]["iou_sem"] if c in sub else 0 for c in cats]
        ax.bar(x + off, vals, 0.4, yerr=errs, capsize=3, color=KIND_COLORS[kind], label=kind, alpha=0.85)
    ax.set_xticks(x, cats, rotation=30 if len(cats) > 6 else 0)
    ax.set_ylabel("IoU with COCO mask")
    ax.set_title("Receptive fields vs instance masks (Fig. 5; error bars: SEM)")
    ax.legend(frameon=False)
    return fig


@_rc
def ablation_figure(curves: pl.DataFrame, example: dict | None) -> Figure:
    """Fig. 6: relative drop of p(c) vs number of ablated units k, per kind (bands: SEM),
    BERTScore of the regenerated captions when present, and one caption before/after."""
    has_b = "bertscore_f1" in curves.columns
    fig = _figure(10.0 if has_b else 7.0, 3.4)
    axes = fig.subplots(1, 3 if has_b else 2, width_ratios=[1, 1, 0.9] if has_b else [1, 0.9])
    panels = [("rel_drop", "rel_drop_sem", "relative drop of p(c)")]
    if has_b:
        panels.append(("bertscore_f1", "bertscore_sem", "BERTScore F1 vs clean caption"))
    for ax, (col, sem, ylabel) in zip(axes, panels):
        for kind in ABLATION_KINDS:
            sub = curves.filter(pl.col("kind") == kind).sort("k")
            if sub.height == 0:
                continue
            k, m, s = sub["k"].to_numpy(), sub[col].to_numpy(), sub[sem].to_numpy()
            ax.plot(k, m, marker="o", ms=3, color=KIND_COLORS[kind], label=kind)
            ax.fill_between(k, m - s, m + s, color=KIND_COLORS[kind], alpha=0.2, lw=0)
        ks = sorted(set(curves["k"].to_list()))
        ax.set_xscale("symlog", linthresh=max(1, min([k for k in ks if k > 0], default=1)))
        ax.set_xticks(ks, [str(k) for k in ks], rotation=45, fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("k (ablated units)"), ax.set_ylabel(ylabel)
        ax.legend(frameon=False, fontsize=8)
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
    """Supplement: where the top attributed units sit (triples per layer; interpretable stacked)."""
    fig = _figure(6.0, 2.8)
    ax = fig.subplots()
    x = dist["layer"].to_numpy()
    n = dist["n_triples"].to_numpy()
    ni = dist["n_interpretable_triples"].to_numpy() if "n_interpretable_triples" in dist.columns else np.zeros_like(n)
    ax.bar(x, n - ni, color="#7f7f7f", label="not interpretable")
    ax.bar(x, ni, bottom=n - ni, color="#2ca02c", label="interpretable")
    ax.set_xlabel("layer"), ax.set_ylabel("top-k (layer, unit, patch) triples")
    ax.set_title("Layer distribution of top attributed units")
    ax.legend(frameon=False)
    return fig


@_rc
def selectivity_figure(rows: Sequence[str], cats: Sequence[str], m: np.ndarray) -> Figure:
    """Supplement: category selectivity — mean activation of each category's most frequent
    interpretable units on every category, normalised by the max over categories."""
    fig = _figure(max(4.0, 0.7 * len(cats) + 2.5), max(2.5, 0.22 * len(rows) + 1.2))
    ax = fig.subplots()
    if not rows:
        ax.axis("off")
        ax.text(0.5, 0.5, "no interpretable units for the selectivity categories", ha="center", va="center")
        return fig
    im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", cmap="viridis", vmin=min(0.0, np.nanmin(m)), vmax=1)
    ax.set_xticks(range(len(cats)), cats, rotation=30)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("images of category")
    fig.colorbar(im, ax=ax, label="normalised mean activation")
    ax.set_title("Category selectivity")
    return fig
