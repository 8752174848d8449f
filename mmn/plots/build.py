"""The ``plot`` stage's work: figures under ``plots/``, plot-ready CSV under ``plots/data/``
(declared in dvc.yaml for ``dvc plots``) and the static report under ``report/``.

Layout written (``<key>`` is a unit id like ``L3-U1207``)::

    plots/cards/<key>.png          Fig. 1 neuron cards (top ``cards`` units by max g)
    plots/images/<image_id>.png    Fig. 2 superimposed receptive fields + marked caption
    plots/units/<key>.png          Fig. 4 top-activating images of each card unit
    plots/fig3_scores.png  fig5_iou.png  fig6_ablation.png  layers.png  selectivity.png
    plots/data/ablation.csv  iou.csv  scores.csv
    report/index.html  units.html  figures.html  tables.html  images/<id>.html  units/<key>.html
    report/img/...                 every picture the pages show (copied: the folder is self-contained)

The number of files is bounded by the ``plot`` params, whatever the number of images.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from mmn.params import PlotParams
from mmn.plots import figures as F
from mmn.plots import tables as T
from mmn.plots.activations import MapProvider, top_activating
from mmn.plots.heatmap import overlay_heatmap, overlay_masks, square_image
from mmn.report.build import (ImagePage, ImageRow, QualityBox, Report, UnitPage, UnitRow, metric_tables,
                              render_report)
from mmn.report.paper import score_scale_note

HEAT_SIZE = 160  # report thumbnails
FIG_SIZE = 224   # pictures inside the figures


#: the ``plot`` section of params.yaml: the params model itself, one definition of its fields
PlotSettings = PlotParams


@dataclass
class PlotInputs:
    captions: pl.DataFrame
    attributions: pl.DataFrame
    interpretable: pl.DataFrame
    scores: pl.DataFrame
    iou: pl.DataFrame
    selectivity: pl.DataFrame
    ablation: pl.DataFrame
    layers: pl.DataFrame
    metrics: dict[str, dict]                      # {"scores": {...}, "iou": ..., "ablation": ..., "neurons": ...}
    refs: dict[int, list[str]]                    # COCO reference captions
    file_names: dict[int, str]
    load_image: Callable[[int], Image.Image]
    categories: list[str] = field(default_factory=list)
    title: str = "mmn — multimodal neurons"
    subtitle: str = ""
    projection_loss: pl.DataFrame | None = None   # step, train_loss, val_loss (mmn.training_log.read_curves)
    projection_meta: dict = field(default_factory=dict)  # data/projection/meta.json
    caption_info: dict = field(default_factory=dict)     # {"bert_model", optional "warning"} for the first page
    methods_curve: pl.DataFrame | None = None     # data/compare_methods_curve.csv (stage compare_methods)
    methods_summary: pl.DataFrame | None = None   # data/compare_methods.csv


@dataclass
class Written:
    figures: list[Path]
    data: list[Path]
    report_pages: list[Path]

    def summary(self) -> str:
        return (f"{len(self.figures)} figures, {len(self.data)} plot tables, "
                f"{len(self.report_pages)} report pages")


def _save_jpg(pic: np.ndarray, path: Path, size: int | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(pic)
    if size:
        im = im.resize((size, size), Image.LANCZOS)
    im.save(path, format="JPEG", quality=85, optimize=True)
    return path.as_posix()


def _write_csv(df: pl.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_csv(path, float_precision=6)
    return path


def _iou_categories_note(inp: PlotInputs) -> str:
    """Fig. 5 caption: the categories actually used (images per category) and those without images."""
    n = dict(inp.iou.group_by("category").agg(pl.col("image_id").n_unique()).iter_rows())
    used = [c for c in (inp.categories or sorted(n)) if n.get(c)]
    note = "Categories used: " + (", ".join(f"{c} ({n[c]} images)" for c in used) or "none") + "."
    missing = [c for c in inp.categories if not n.get(c)]
    return note + (f" Configured without images: {', '.join(missing)}." if missing else "")


def plot_tables(inp: PlotInputs, bins: int, curves: pl.DataFrame | None = None) -> dict[str, pl.DataFrame]:
    """The plot-ready tables (``plots/data/<name>.csv``) declared in dvc.yaml; ``curves``: the
    :func:`T.ablation_curves` already computed by the caller (its bootstraps are not cheap)."""
    curves = T.ablation_curves(inp.ablation) if curves is None else curves
    bars = T.iou_bars(inp.iou, inp.categories or None)
    return {
        "ablation": T.wide(curves, "k", "kind", "rel_drop", T.ABLATION_KINDS),
        "iou": T.wide(bars, "category", "kind", "iou", ("multimodal", "random")),
        "scores": T.score_histogram(T.score_series(inp.scores, "bertscore"), bins),
    } | ({} if inp.methods_curve is None else {
        "methods": T.wide(inp.methods_curve, "k", "method", "rel_drop", tuple(F.METHOD_COLORS))})


@dataclass
class _Shown:
    """The selected images and units (:func:`T.select`) with their activation maps and photos."""

    inp: PlotInputs
    sel: T.Selection
    act: dict[int, np.ndarray]  # {image_id: Float[ndarray, "n_units P"]}, rows in ``sel.units`` order
    photos: dict[int, np.ndarray]
    info: dict[tuple[int, int], dict] = field(init=False)  # per unit: its row of ``sel.summary``
    caps: dict[int, dict] = field(init=False)  # per image: its captions.parquet row
    _row: dict[tuple[int, int], int] = field(init=False)

    def __post_init__(self) -> None:
        self._row = {u: j for j, u in enumerate(self.sel.units)}
        self.info = {(r["layer"], r["unit"]): r for r in self.sel.summary.iter_rows(named=True)}
        self.caps = {r["image_id"]: r for r in self.inp.captions.iter_rows(named=True)}

    def tokens(self, u: tuple[int, int]) -> list[str]:
        return list(self.info[u]["tokens"] or [])

    def map(self, img: int, u: tuple[int, int]) -> np.ndarray:
        """Unit ``u``'s activations at the image positions of ``img``."""
        return self.act[img][self._row[u]]

    def marked_caption(self, img: int) -> list:
        c = self.caps.get(img, {})
        return T.mark_target(c.get("caption") or "", c.get("noun"), c.get("target_token"))


def build(inp: PlotInputs, maps: MapProvider, s: PlotSettings, plots_dir: Path, report_dir: Path) -> Written:
    """Write every figure, plot table and report page (into the given, empty, folders)."""
    sel = T.select(inp.captions, inp.attributions, inp.interpretable, images=s.images,
                   units_per_image=s.units_per_image, cards=s.cards)
    act = maps(sel.images, sel.units)
    shown = _Shown(inp, sel, act, {i: square_image(inp.load_image(i), FIG_SIZE) for i in sel.images})
    figs = _neuron_cards(shown, s, plots_dir)
    image_units = {img: sel.per_image.filter(pl.col("image_id") == img).sort("order").to_dicts()
                   for img in sel.images}
    figs += _image_figures(shown, image_units, s, plots_dir)
    top = top_activating(act, sel.units, s.top_images)
    figs += _top_image_figures(shown, top, s, plots_dir)
    curves = T.ablation_curves(inp.ablation)
    summary_figs = _summary_figures(inp, s, curves)
    for name, _, _, fig in summary_figs:
        figs.append(F.save_png(fig, plots_dir / name, s.dpi))
    data = [_write_csv(df, plots_dir / "data" / f"{name}.csv") for name, df in plot_tables(inp, s.bins, curves).items()]
    pages = _write_report(shown, image_units, top, summary_figs, s.quantile, plots_dir, report_dir)
    return Written(figs, data, pages)


def _neuron_cards(shown: _Shown, s: PlotSettings, plots_dir: Path) -> list[Path]:
    """Fig. 1: a card per card unit, on its best image."""
    figs = []
    for u in shown.sel.card_units:
        r = shown.info[u]
        img = int(r["best_image"])
        pic = overlay_heatmap(shown.photos[img], shown.map(img, u), size=FIG_SIZE)
        fig = F.neuron_card(pic, *u, shown.tokens(u), list(r["logits"] or []), interpretable=r["interpretable"],
                            n_words=r["n_words"], max_g=r["max_g"], image_label=f"image {img} (its max g)")
        figs.append(F.save_png(fig, plots_dir / "cards" / f"{T.unit_key(*u)}.png", s.dpi))
    return figs


def _image_figures(shown: _Shown, image_units: dict[int, list[dict]], s: PlotSettings, plots_dir: Path
                   ) -> list[Path]:
    """Fig. 2: per image, its top units superimposed + the caption with the target marked."""
    figs = []
    for img, rows in image_units.items():
        units = [(r["layer"], r["unit"]) for r in rows]
        pic, _ = overlay_masks(shown.photos[img], [shown.map(img, u) for u in units], size=FIG_SIZE,
                               quantile=s.quantile)
        labels = [", ".join(F.show_token(t) for t in shown.tokens(u)[:4]) for u in units]
        fig = F.image_units(pic, units, labels, shown.marked_caption(img),
                            f"image {img}: {shown.inp.file_names.get(img, '')}")
        figs.append(F.save_png(fig, plots_dir / "images" / f"{img}.png", s.dpi))
    return figs


def _top_image_figures(shown: _Shown, top: dict[tuple[int, int], list[tuple[int, float]]], s: PlotSettings,
                       plots_dir: Path) -> list[Path]:
    """Fig. 4: top-activating images of the card units."""
    figs = []
    for u in shown.sel.card_units:
        panels = [(overlay_heatmap(shown.photos[i], shown.map(i, u), size=FIG_SIZE, quantile=s.quantile),
                   f"image {i}\nmax A = {a:.3g}") for i, a in top[u]]
        fig = F.unit_top_images(*u, shown.tokens(u), panels)
        figs.append(F.save_png(fig, plots_dir / "units" / f"{T.unit_key(*u)}.png", s.dpi))
    return figs


def _summary_figures(inp: PlotInputs, s: PlotSettings, curves: pl.DataFrame) -> list[tuple[str, str, str, object]]:
    """Fig. 3, 5, 6 and the supplement: ``(file name, title, caption, figure)``."""
    bert, clip = T.score_series(inp.scores, "bertscore"), T.score_series(inp.scores, "clipscore")
    score_m = inp.metrics.get("scores") or {}
    clip_note = None  # the scale note says when (and where why) CLIPScore was not computed
    scale_note = score_scale_note(score_m.get("scale"), bool(clip))
    summary_figs = [
        ("fig3_scores.png", "Fig. 3 — score distributions",
         "Per-image BERTScore (and CLIPScore when computed) of decoded image prompts — mean (left) and max "
         "(right) over an image's patches — vs one set of matched random vectors per image, five COCO nouns "
         "and the model's caption; bars: mean with 95% bootstrap CI over images; KS tests on these per-image "
         "values are in summary/scores.json. " + scale_note,
         F.score_distributions(bert, clip, s.bins, clip_note, scale_note,
                               {"bertscore": T.score_cis(bert), "clipscore": T.score_cis(clip)})),
        ("fig5_iou.png", "Fig. 5 — IoU per category",
         "Receptive fields of each image's multimodal units vs random units from the same layers against the "
         "COCO instance mask of the image's category; bars: mean over images of the per-image mean IoU, error "
         "bars: 95% bootstrap CIs over images. " + _iou_categories_note(inp),
         F.iou_figure(T.iou_bars(inp.iou, inp.categories or None))),
        ("fig6_ablation.png", "Fig. 6 — ablation",
         "Relative drop of p(c) when the top-k units by g (unfiltered, interpretable only) or as many random "
         "units of the same layers (nested across k) are ablated: solid, mean of per-image relative drops "
         "with 95% bootstrap CIs over images (bands); dashed, relative drop of the mean p(c).",
         F.ablation_figure(curves, T.ablation_example(inp.ablation))),
        ("layers.png", "Layer histogram", "Where the top attributed (layer, unit, patch) triples sit.",
         F.layer_histogram(inp.layers)),
        ("selectivity.png", "Category selectivity",
         "Mean activation of each category's most frequent interpretable units on every category, "
         "divided by the unit's max |mean| over categories (order and sign of the means kept).",
         F.selectivity_figure(*T.selectivity_matrix(inp.selectivity))),
    ]
    if inp.methods_curve is not None and inp.methods_summary is not None:
        summary_figs.append((
            "methods.png", "Attribution methods vs exact ablation",
            "Stage compare_methods: each attribution method (grad_x_act = the paper's g, direct_logit = "
            "MM_Neurons' A·W_U[c]·W_out^k, integrated_gradients) ranks units; left, relative drop of p(c) when "
            "its top-k units are ablated (mean of per-image drops, band: 95% bootstrap CI over images); right, "
            "rank correlation of its per-unit score with the exact effect of ablating that unit alone (over "
            "the union of the methods' top candidates; mean over images, 95% CIs). Precision@k, curve areas "
            "and paired tests: summary/methods.json and data/compare_methods.csv; seconds per image: "
            "data/info/compare_methods.json.",
            F.methods_figure(inp.methods_curve, inp.methods_summary)))
    if inp.projection_loss is not None and inp.projection_loss.height:
        summary_figs.append((
            "projection_loss.png", "Projection training",
            "Caption cross-entropy of the projection: training (the batch loss of each step) "
            "and validation (training images held out from fitting); the dashed line is the kept checkpoint "
            "(lowest validation loss). Data: data/projection_live/ (DVCLive; dvc plots show).",
            F.projection_loss_figure(inp.projection_loss, inp.projection_meta.get("best_step"))))
    return summary_figs


def _write_report(shown: _Shown, image_units: dict[int, list[dict]], top: dict[tuple[int, int], list],
                  summary_figs: list[tuple[str, str, str, object]], quantile: float, plots_dir: Path, rd: Path
                  ) -> list[Path]:
    """The static report under ``rd`` (every picture copied into ``rd/img``): its pages."""
    from mmn.report.controls import controls_view

    inp = shown.inp
    pics = _ReportPictures(shown, quantile, rd)
    image_pages = [_image_page(shown, pics, img, rows, plots_dir) for img, rows in image_units.items()]
    att_best = (inp.attributions.sort("rank").unique(subset=["layer", "unit", "image_id"], keep="first",
                                                      maintain_order=True))
    unit_pages = [_unit_page(shown, pics, u, att_best, top[u], plots_dir) for u in shown.sel.units]
    unit_pages.sort(key=lambda p: (-p.max_g, p.layer, p.unit))
    report = Report(
        inp.title, inp.subtitle, image_pages, unit_pages,
        metric_tables({k: controls_view(inp.metrics[k]) if k == "controls" else inp.metrics[k]
                       for k in ("captions", "projection", "scores", "iou", "ablation", "neurons", "methods",
                                 "controls") if k in inp.metrics}),
        figures=[(title, pics.copy(plots_dir / name, f"img/fig/{name}"), cap) for name, title, cap, _ in summary_figs],
        cards=[(T.unit_key(*u), f"img/cards/{T.unit_key(*u)}.png") for u in shown.sel.card_units],
        quality=caption_quality_box(inp, "img/fig/projection_loss.png" if any(
            n == "projection_loss.png" for n, *_ in summary_figs) else None),
    )
    return render_report(report, rd)


class _ReportPictures:
    """The report's pictures under ``rd``: photos (written at once), heat maps (on first use) and copies."""

    def __init__(self, shown: _Shown, quantile: float, rd: Path) -> None:
        self.shown, self.quantile, self.rd = shown, quantile, rd
        self.photo: dict[int, str] = {}
        for i in shown.sel.images:
            _save_jpg(shown.photos[i], rd / "img" / "photos" / f"{i}.jpg")
            self.photo[i] = f"img/photos/{i}.jpg"
        self._heats: dict[tuple[tuple[int, int], int], str] = {}

    def heat(self, u: tuple[int, int], i: int) -> str:
        if (u, i) not in self._heats:
            pic = overlay_heatmap(self.shown.photos[i], self.shown.map(i, u), size=FIG_SIZE, quantile=self.quantile)
            rel = f"img/heat/{T.unit_key(*u)}_{i}.jpg"
            _save_jpg(pic, self.rd / rel, HEAT_SIZE)
            self._heats[(u, i)] = rel
        return self._heats[(u, i)]

    def copy(self, src: Path, rel: str) -> str:
        (self.rd / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, self.rd / rel)
        return rel


def _image_page(shown: _Shown, pics: _ReportPictures, img: int, rows: list[dict], plots_dir: Path) -> ImagePage:
    inp, c = shown.inp, shown.caps.get(img, {})
    units = [UnitRow(T.unit_key(r["layer"], r["unit"]), r["layer"], r["unit"],
                     shown.info[(r["layer"], r["unit"])]["interpretable"], shown.tokens((r["layer"], r["unit"])),
                     g=r["g"], rank=r["rank"], heat=pics.heat((r["layer"], r["unit"]), img))
             for r in rows]
    return ImagePage(
        img, inp.file_names.get(img, ""), shown.marked_caption(img),
        c.get("noun"), c.get("target_token"), c.get("p_target"), inp.refs.get(img, []), pics.photo[img],
        pics.copy(plots_dir / "images" / f"{img}.png", f"img/fig2/{img}.png"), units)


def _unit_page(shown: _Shown, pics: _ReportPictures, u: tuple[int, int], att_best: pl.DataFrame,
               top: list[tuple[int, float]], plots_dir: Path) -> UnitPage:
    r, key = shown.info[u], T.unit_key(*u)
    pages, card = set(shown.sel.images), u in set(shown.sel.card_units)
    attributed = [ImageRow(i, i in pages, g=g, rank=rk) for i, rk, g in
                  att_best.filter((pl.col("layer") == u[0]) & (pl.col("unit") == u[1]))
                  .sort(["rank", "image_id"]).select("image_id", "rank", "g").iter_rows()]
    top_rows = [ImageRow(i, i in pages, activation=a, heat=pics.heat(u, i)) for i, a in top]
    return UnitPage(
        key, u[0], u[1], r["interpretable"], r["n_words"], list(zip(shown.tokens(u), list(r["logits"] or []))),
        r["max_g"], r["n_images"],
        pics.copy(plots_dir / "cards" / f"{key}.png", f"img/cards/{key}.png") if card else None,
        pics.copy(plots_dir / "units" / f"{key}.png", f"img/fig4/{key}.png") if card else None,
        attributed, top_rows)


def caption_quality_box(inp: PlotInputs, loss_figure: str | None) -> QualityBox | None:
    """The report's first-page box: how the projection was trained and whether its captions carry
    image information (summary/captions.json, data/info/caption.json); None without those."""
    m = inp.metrics.get("captions")
    if not m:
        return None
    info, meta = inp.caption_info, inp.projection_meta
    held_out = bool(m.get("held_out", meta.get("held_out", False)))
    warning = info.get("warning") or (
        "the captions carry no detectable image information: BERTScore against the image's own references is "
        "not significantly above shuffled references" if not m.get("image_information", 1) else None)
    return QualityBox(
        held_out=held_out, train_data=str(info.get("train_data") or meta.get("train_data") or meta.get("source") or "?"),
        own=m["bertscore_own"], shuffled=m["bertscore_shuffled"], test=m["own_vs_shuffled"],
        noun=m["noun_in_refs"], distinct_nouns=m.get("distinct_nouns"), n_images=m.get("n_images"),
        bert_model=str(info.get("bert_model", "")), warning=warning, loss_figure=loss_figure,
        best_step=meta.get("best_step"), steps_run=meta.get("steps_run"),
    )
