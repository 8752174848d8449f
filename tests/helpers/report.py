"""The HTML report from synthetic stage outputs, and checks of its links (no models).

:func:`make_inputs` builds a small but complete set of stage outputs, :func:`fake_maps`
stands in for the LM's activation maps, :func:`build_synthetic` builds figures and report
from them; :func:`check_internal_links` checks every link of a built report and
:func:`build_template` provides the offline ``dvc plots`` template. Used by
tests/test_plots.py, tests/test_report_browser.py and tests/test_projection_training.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import polars as pl
import pytest
from PIL import Image

from mmn.experiments.scores import per_image_scores, summarise
from mmn.plots.build import PlotInputs, PlotSettings, build

REPO = Path(__file__).resolve().parents[2]

GRID = 7
CATS = ["cat", "dog"]
KS = [0, 10, 100]


# --------------------------------------------------------------------------- synthetic inputs

def _photo(i: int) -> Image.Image:
    h, w = 60 + 10 * i, 80
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 3 + 40 * i) % 256, (y * 4) % 256, np.full_like(x, 90 + 20 * i)], -1).astype(np.uint8)
    return Image.fromarray(arr)


def fake_maps(images, units):
    """One hot patch per (image, unit) on a 7×7 grid, over a little seeded noise."""
    out = {}
    for i in images:
        a = np.random.default_rng(i).random((len(units), GRID * GRID)).astype(np.float32) * 0.2
        for j, (l, u) in enumerate(units):
            a[j, (3 * l + u + i) % (GRID * GRID)] = 1.0
        out[i] = a
    return out


def _tokens(layer: int, unit: int) -> list[str]:
    odd = ["$5", "\n", "<script>", "a&b"]  # must be escaped in HTML, not mathtext in figures
    return [f"w{layer}x{unit}t{j}" if j % 3 else odd[(unit + j) % len(odd)] for j in range(10)]


def make_inputs(seed: int = 0, iou_shift: float = 0.0) -> PlotInputs:
    """Every input of the plot stage for 5 images (4 with a noun), seeded; ``iou_shift`` moves the IoU table."""
    rng = np.random.default_rng(seed)
    ids = [1, 2, 3, 4, 5]
    nouns = {1: "cat", 2: "dog", 3: "cat", 4: "dog"}
    captions = pl.DataFrame({
        "image_id": ids,
        "file_name": [f"img{i}.png" for i in ids],
        "caption": [f"a {nouns[i]} on a mat with another {nouns[i]}" if i in nouns else "something $odd$ here"
                    for i in ids],
        "has_noun": [i in nouns for i in ids],
        "noun": [nouns.get(i) for i in ids],
        "target_token": [f" {nouns[i]}" if i in nouns else None for i in ids],
        "p_target": [0.1 * i if i in nouns else None for i in ids],
    })
    rows = []
    for img in nouns:
        for r in range(10):
            layer, unit = r % 3, (img * 7 + r * 5) % 40
            rows.append({"image_id": img, "rank": r, "layer": layer, "unit": unit, "patch": (img + r) % 49,
                         "g": round(1.0 / (1 + r) * (1 + img / 10), 6)})
    att = pl.DataFrame(rows)
    units = att.select("layer", "unit").unique().sort(["layer", "unit"])
    interp = units.with_columns(
        pl.struct("layer", "unit").map_elements(lambda s: _tokens(s["layer"], s["unit"]),
                                                return_dtype=pl.List(pl.Utf8)).alias("tokens"),
        pl.lit([float(10 - j) for j in range(10)]).alias("logits"),
        (pl.col("unit") % 7).alias("n_words"),
        (pl.col("unit") % 3 == 0).alias("interpretable"),
    ).with_columns(pl.col("tokens").list.join(", ").alias("decoded"))
    score_rows = []
    for table, item, n, mu in (("table2", "prompts", 60, 0.1), ("table2", "random_prompts", 60, 0.1),
                               ("table1", "coco_nouns", 4, 0.45), ("table1", "captions", 4, 0.5),
                               ("table1", "multimodal_all", 12, 0.15), ("table1", "random_pairing", 12, 0.14)):
        for j, v in enumerate(rng.normal(mu, 0.03, n)):
            score_rows.append({"table": table, "item": item, "image_id": 1 + j % 4, "draw": 0, "index": j,
                               "text": "x", "bertscore": float(v), "clipscore": None})
    scores = pl.DataFrame(score_rows, schema_overrides={"clipscore": pl.Float64})
    iou_rows = []
    for img, cat in ((1, "cat"), (3, "cat"), (2, "dog"), (4, "dog")):
        for kind, base in (("multimodal", 0.3 + iou_shift), ("random", 0.1)):
            for d in range(3):
                iou_rows.append({"image_id": img, "category": cat, "kind": kind, "draw": d, "layer": d, "unit": d,
                                 "iou": float(np.clip(base + rng.normal(0, 0.05), 0, 1))})
    iou = pl.DataFrame(iou_rows)
    sel = pl.DataFrame([{"source_category": s, "layer": 0, "unit": u, "frequency": 2, "category": c,
                         "mean_activation": 0.5, "normalised": 1.0 if s == c else 0.4}
                        for s, u in (("cat", 3), ("dog", 9)) for c in CATS])
    abl_rows = []
    for img in nouns:
        for kind, slope in (("unfiltered", 0.8), ("filtered", 0.4), ("random", 0.05), ("random_filtered", 0.04)):
            for k in KS:
                drop = 0.0 if k == 0 else min(1.0, slope * np.log10(k) / 2 + rng.normal(0, 0.02))
                abl_rows.append({"image_id": img, "kind": kind, "k": k, "k_effective": k, "p_target": 0.3 * (1 - drop),
                                 "p_clean": 0.3, "rel_drop": drop,
                                 "caption": f"a {nouns[img]} on a mat" if k == 0 else f"a thing number {k}",
                                 "caption_changed": k > 0, "bertscore_f1": 1.0 - drop / 2})
    ablation = pl.DataFrame(abl_rows)
    layers = pl.DataFrame({"layer": [0, 1, 2], "n_units": [14, 13, 13], "n_interpretable_units": [3, 2, 0],
                           "share": [0.35, 0.325, 0.325]})
    metrics = {
        "scores": summarise(per_image_scores(scores), bert_rescaled=False, clip_w=1.0, clip_computed=False),
        "iou": {"overall": {"multimodal": 0.3, "random": 0.1},
                "per_category": {c: {"multimodal": 0.3, "random": 0.1, "n_images": 2} for c in CATS}},
        "ablation": {"n_images": 4,
                     **{kind: {f"k{k}": {"rel_drop": {"mean": 0.1, "lo": 0.05, "hi": 0.15, "n": 4},
                                         "drop_of_mean": 0.12,
                                         **({} if kind.startswith("random") else {"vs_random_p": 0.5})}
                               for k in KS[1:]}
                        for kind in ("unfiltered", "filtered", "random", "random_filtered")}},
        "neurons": {"kept_fraction": 0.3, "n_units": units.height, "wordlist": {"entries": 10}},
        "captions": {"bertscore_own": {"mean": 0.35, "lo": 0.3, "hi": 0.4, "n": 4},
                     "bertscore_shuffled": {"mean": 0.23, "lo": 0.2, "hi": 0.26, "n": 4},
                     "own_vs_shuffled": {"diff": 0.12, "lo": 0.05, "hi": 0.2, "p": 0.125, "n": 4},
                     "noun_in_refs": {"mean": 0.5, "lo": 0.0, "hi": 1.0, "n": 4}, "distinct_nouns": 3,
                     "n_images": 4, "n_with_noun": 4, "held_out": 0, "image_information": 0},
        "projection": {"n_train_images": 6, "n_val_images": 1, "steps_run": 30, "best_step": 20,
                       "best_val_loss": 2.0, "initial_val_loss": 4.0, "held_out": 0},
    }
    m_curve, m_summary, metrics["methods"] = _methods_tables(rng)
    metrics["controls"] = synthetic_controls(seed)[1]
    return PlotInputs(
        captions=captions, attributions=att, interpretable=interp, scores=scores, iou=iou, selectivity=sel,
        ablation=ablation, layers=layers, metrics=metrics, methods_curve=m_curve, methods_summary=m_summary,
        refs={i: [f"reference {j} for image {i}" for j in range(2)] for i in ids},
        file_names={i: f"img{i}.png" for i in ids}, load_image=_photo, categories=CATS, subtitle="synthetic test",
    )


def synthetic_controls(seed: int = 0) -> tuple[pl.DataFrame, dict]:
    """Stage controls' outputs for :func:`make_inputs`' images: the cascade table
    (data/controls_cascade.csv) and the full results (data/results/controls.json), with a
    planted unit L1.u3 'cat' ranked 1, 1, 2 on three concept images."""
    from mmn.controls.randomization import cascade_results, cascade_table
    from mmn.controls.report import PLANT_IMAGE_SCHEMA, plant_summary

    cascade = pl.DataFrame({"image_id": [1, 2] * 3, "layers_randomised": [1, 1, 2, 2, 4, 4],
                            "top_layer_randomised": [2, 2, 1, 1, 0, 0], "overlap": [0.6, 0.5, 0.5, 0.4, 0.3, 0.2],
                            "spearman": [0.9, 0.8, 0.8, 0.7, 0.5, 0.4]})
    table = cascade_table(cascade, seed)
    per = pl.DataFrame({"image_id": [1, 3, 5], "rank": [1, 1, 2], "score": [3.0, 2.5, 1.0],
                        "p_clean": [0.5, 0.4, 0.3], "p_ablated": [0.1, 0.2, 0.25], "iou": [0.4, 0.3, None],
                        "iou_random": [0.1, 0.05, None]}, schema=PLANT_IMAGE_SCHEMA)
    plant = plant_summary(per, {"tokens": [" cat", " cats", " kitten"], "has_word": True, "interpretable": True},
                          {"rate": 0.5, "n": 2, "hits": 1}, 3, seed)
    plant["unit"] = {"layer": 1, "unit": 3, "word": "cat", "strength": 20.0, "train_auc": 0.9}
    return table, {"plant": plant, "cascade": cascade_results(table), "n_images": int(table["n"][0])}


def _methods_tables(rng) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Stage compare_methods' curve and summary tables and metrics, from synthetic per-image rows."""
    from mmn.experiments.compare_methods import VARIANTS, method_curves, method_summary, methods_metrics

    ids = [1, 2, 3, 4]
    per = pl.DataFrame([{"image_id": i, "method": m, "seconds": 0.1 * (j + 1), "spearman": float(rng.uniform(-1, 1)),
                         "kendall": float(rng.uniform(-1, 1)), "spearman_union": float(rng.uniform(-1, 1)),
                         "kendall_union": float(rng.uniform(-1, 1)), "precision": 0.5, "auc": 0.2,
                         "completeness": 0.1, "total": 1.1, "gap": 1.0}
                        for i in ids for j, m in enumerate(VARIANTS)])
    curve = pl.DataFrame([{"image_id": i, "method": m, "k": k, "p_target": 0.5 / (1 + k), "p_clean": 0.5,
                           "rel_drop": 1 - 1 / (1 + k)} for i in ids for m in VARIANTS for k in KS])
    summary = method_summary(per)
    return method_curves(curve), summary, methods_metrics(summary, len(ids))


SETTINGS = PlotSettings(cards=3, units_per_image=3, images=4, top_images=2, quantile=0.95, bins=8, dpi=60)


def build_synthetic(root: Path, inputs: PlotInputs | None = None, settings: PlotSettings = SETTINGS):
    """Build figures (``root/plots``) and report (``root/report``) from ``inputs`` (default
    :func:`make_inputs`) with :func:`fake_maps`; returns (plots, report, what was written)."""
    plots, report = root / "plots", root / "report"
    w = build(inputs or make_inputs(), fake_maps, settings, plots, report)
    return plots, report, w


# --------------------------------------------------------------------------- the report's links

class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str]] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("href", "src"):
            if a.get(key) is not None:
                self.refs.append((tag, a[key]))


def report_refs(report: Path) -> dict[Path, _Refs]:
    """Each page of ``report`` with the links (``href``/``src``) and ids it holds."""
    out = {}
    for page in sorted(report.rglob("*.html")):
        p = _Refs()
        p.feed(page.read_text(encoding="utf-8"))
        out[page] = p
    return out


def check_internal_links(report: Path) -> int:
    """Every href/src of every page resolves to a file inside ``report`` (and its #fragment
    to an id there); nothing points outside or to the network. Returns the links checked."""
    pages = report_refs(report)
    n = 0
    for page, parsed in pages.items():
        for tag, ref in parsed.refs:
            u = urlparse(ref)
            assert not u.scheme and not u.netloc, f"{page}: external reference {ref}"
            target = (page.parent / unquote(u.path)).resolve() if u.path else page
            assert target.is_file(), f"{page.relative_to(report)}: broken {tag} {ref}"
            assert report.resolve() in target.parents, f"{page}: {ref} leaves the report folder"
            if u.fragment:
                assert u.fragment in pages[target].ids, f"{page}: missing anchor {ref}"
            n += 1
    return n


# --------------------------------------------------------------------------- offline dvc plots template

NPM = REPO / ".cache" / "npm"


def build_template(out: Path) -> Path:
    """The offline template: the set-up's build if present, else built from .cache/npm."""
    built = REPO / ".cache" / "dvc-plots" / "offline.html"
    if built.is_file():
        shutil.copy2(built, out)
        return out
    if not (NPM / "node_modules" / "vega-embed").is_dir():
        pytest.skip(f"vega npm packages not installed in {NPM} (scripts/setup.sh installs them)")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "build_vega_template.py"), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out
