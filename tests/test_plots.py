"""Figures, plot-ready tables, the HTML report and the `plot` stage's DVC wiring.

Everything here runs on synthetic tables and synthetic activation maps (no models):
:func:`make_inputs` builds a small but complete set of stage outputs, :func:`fake_maps`
stands in for the LM. tests/test_report_browser.py reuses both.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import polars as pl
import pytest
import yaml
from PIL import Image

from conftest import REPO
from mmn.experiments.scores import per_image_scores, summarise
from mmn.plots import tables as T
from mmn.plots.build import PlotInputs, PlotSettings, build
from mmn.plots.heatmap import UNIT_COLORS, overlay_heatmap, overlay_masks

GRID = 7
CATS = ["cat", "dog"]
KS = [0, 10, 100]
NOT_COMPUTED = "not computed: no CLIP weights configured for profile 'embedded'"


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
        for kind, slope in (("unfiltered", 0.8), ("filtered", 0.4), ("random", 0.05)):
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
                                         "drop_of_mean": 0.12, **({} if kind == "random" else {"vs_random_p": 0.5})}
                               for k in KS[1:]}
                        for kind in ("unfiltered", "filtered", "random")}},
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
    return PlotInputs(
        captions=captions, attributions=att, interpretable=interp, scores=scores, iou=iou, selectivity=sel,
        ablation=ablation, layers=layers, metrics=metrics, methods_curve=m_curve, methods_summary=m_summary,
        refs={i: [f"reference {j} for image {i}" for j in range(2)] for i in ids},
        file_names={i: f"img{i}.png" for i in ids}, load_image=_photo, categories=CATS, subtitle="synthetic test",
    )


def _methods_tables(rng) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Stage compare_methods' curve and summary tables and metrics, from synthetic per-image rows."""
    from mmn.experiments.compare_methods import method_curves, method_summary, methods_metrics
    from mmn.neurons.methods import METHODS

    ids = [1, 2, 3, 4]
    per = pl.DataFrame([{"image_id": i, "method": m, "seconds": 0.1 * (j + 1), "spearman": float(rng.uniform(-1, 1)),
                         "kendall": float(rng.uniform(-1, 1)), "precision": 0.5, "auc": 0.2, "completeness": 0.1}
                        for i in ids for j, m in enumerate(METHODS)])
    curve = pl.DataFrame([{"image_id": i, "method": m, "k": k, "p_target": 0.5 / (1 + k), "p_clean": 0.5,
                           "rel_drop": 1 - 1 / (1 + k)} for i in ids for m in METHODS for k in KS])
    summary = method_summary(per)
    return method_curves(curve), summary, methods_metrics(summary, len(ids))


SETTINGS = PlotSettings(cards=3, units_per_image=3, images=4, top_images=2, quantile=0.95, bins=8, dpi=60)


def build_synthetic(root: Path, inputs: PlotInputs | None = None, settings: PlotSettings = SETTINGS):
    plots, report = root / "plots", root / "report"
    w = build(inputs or make_inputs(), fake_maps, settings, plots, report)
    return plots, report, w


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_synthetic(tmp_path_factory.mktemp("plots"))


# --------------------------------------------------------------------------- heatmaps

def _hot_top_left() -> np.ndarray:
    acts = np.zeros((GRID, GRID))
    acts[0, 0] = 1.0
    return acts


def test_heatmap_overlay_puts_the_hot_region_where_the_map_is_hot():
    gray = Image.new("RGB", (300, 200), (128, 128, 128))  # non-square: squashed like the encoder does
    size, cell = 224, 224 // GRID
    for q in (None, 0.95):
        pic = overlay_heatmap(gray, _hot_top_left(), size=size, quantile=q).astype(int)
        assert pic.shape == (size, size, 3)
        hot = pic[cell // 2, cell // 2]              # centre of the top-left patch
        assert hot[0] - hot[2] > 60, (q, hot)        # jet's hot end: red, not blue
        for y, x in ((size - 10, size - 10), (10, size - 10), (size - 10, 10), (size // 2, size // 2)):
            far = pic[y, x]
            assert abs(far[0] - far[2]) < 4, (q, far)  # untouched grey (or dimmed grey)
    # the continuous heatmap leaves cold pixels exactly as they were
    assert (overlay_heatmap(gray, _hot_top_left(), size=size)[-20:, -20:] == 128).all()


def test_superimposed_masks_keep_each_unit_in_its_own_place_and_colour():
    gray = Image.new("RGB", (224, 224), (128, 128, 128))
    bottom_right = np.zeros((GRID, GRID))
    bottom_right[-1, -1] = 1.0
    pic, masks = overlay_masks(gray, [_hot_top_left(), bottom_right], size=224, quantile=0.95)
    assert masks[0][5, 5] and not masks[0][-6, -6] and masks[1][-6, -6] and not masks[1][5, 5]
    c0, c1 = np.asarray(UNIT_COLORS[0]), np.asarray(UNIT_COLORS[1])
    tl, br = pic[5, 5].astype(int), pic[-6, -6].astype(int)
    assert np.abs(tl - c0).sum() < np.abs(tl - c1).sum()
    assert np.abs(br - c1).sum() < np.abs(br - c0).sum()
    mid = pic[112, 112].astype(int)
    assert abs(mid[0] - mid[2]) < 3 and mid[0] < 128  # dimmed grey outside every receptive field


def test_heatmap_accepts_flat_row_major_activations():
    flat = _hot_top_left().reshape(-1)
    gray = Image.new("RGB", (224, 224), (128, 128, 128))
    assert (overlay_heatmap(gray, flat) == overlay_heatmap(gray, _hot_top_left())).all()


# --------------------------------------------------------------------------- tables

@pytest.mark.parametrize("caption,noun,token,expected", [
    ("a cat with a cat's ears.", "cat", " cat", ("a ", "cat", " with a cat's ears.")),
    ("Two Dogs run", "dogs", None, ("Two ", "Dogs", " run")),
    ("a concatenation of cats", "cat", " cat", ("a concatenation of ", "cats", "")),
    ("the skateboarder jumps", "skate", " skate", ("the ", "skateboarder", " jumps")),
    ("nothing here", None, None, ("nothing here", "", "")),
    ("a (weird) [noun]", "[noun]", None, ("a (weird) ", "[noun]", "")),
])
def test_mark_target(caption, noun, token, expected):
    assert T.mark_target(caption, noun, token) == expected


def test_selection_is_bounded_and_consistent():
    inp = make_inputs()
    sel = T.select(inp.captions, inp.attributions, inp.interpretable, images=2, units_per_image=3, cards=2)
    assert len(sel.card_units) == 2
    assert set(sel.images) >= {1, 2} and len(sel.images) <= 2 + 2
    assert set(sel.units) >= set(sel.card_units)
    assert len(sel.units) <= 2 + len(sel.images) * 3
    for img in sel.images:
        rows = sel.per_image.filter(pl.col("image_id") == img)
        assert rows.height == (3 if img in (1, 2, 3, 4) else 0)
        assert rows["rank"].is_sorted()
    top = sel.summary.row(0, named=True)
    assert top["max_g"] == inp.attributions["g"].max()


def test_ablation_curves_mean_and_bootstrap_ci():
    """Fig. 6 reads the mean per-image drop with its bootstrap CI over images and the drop of the mean."""
    drops = [0.2, 0.4, 0.1]
    df = pl.DataFrame({"image_id": [1, 2, 3] * 2, "kind": ["random"] * 6, "k": [0] * 3 + [10] * 3,
                       "k_effective": [0] * 3 + [10] * 3, "p_target": [0.2] * 3 + [0.2 * (1 - d) for d in drops],
                       "p_clean": [0.2] * 6, "rel_drop": [0.0] * 3 + drops})
    c = T.ablation_curves(df).filter(pl.col("k") == 10).row(0, named=True)
    assert c["rel_drop"] == pytest.approx(np.mean(drops)) and c["n"] == 3
    # with 3 images the bootstrap means can only take values of means of 3 draws from the drops
    assert min(drops) - 1e-12 <= c["rel_drop_lo"] < c["rel_drop"] < c["rel_drop_hi"] <= max(drops) + 1e-12
    assert c["drop_of_mean"] == pytest.approx(np.mean(drops))  # equal p_clean: both summaries agree


# --------------------------------------------------------------------------- the build

def _png_ok(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    assert 150 <= w <= 2500 and 100 <= h <= 2500, (path, w, h)
    assert 2_000 < len(data) < 1_500_000, (path, len(data))
    return w, h


def test_every_figure_is_a_valid_png_and_the_file_count_is_bounded(built):
    plots, report, w = built
    s = SETTINGS
    pngs = sorted(plots.rglob("*.png"))
    assert pngs and set(pngs) == set(w.figures)
    for p in pngs:
        _png_ok(p)
    assert len(list((plots / "cards").glob("*.png"))) == s.cards
    assert len(list((plots / "units").glob("*.png"))) == s.cards
    n_images = len(list((plots / "images").glob("*.png")))
    assert s.images <= n_images <= s.images + s.cards
    for name in ("fig3_scores", "fig5_iou", "fig6_ablation", "layers", "selectivity"):
        assert (plots / f"{name}.png").is_file()
    assert len(pngs) <= 2 * s.cards + s.images + s.cards + 5


def test_plot_tables_match_the_dvc_yaml_declarations(built):
    plots, _, _ = built
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    declared = {next(iter(d)): next(iter(d.values())) for d in dvc["plots"] if isinstance(d, dict)}
    ours = {k: v for k, v in declared.items() if k.startswith("plots/data/")}
    assert set(ours) == {f"plots/data/{p.name}" for p in (plots / "data").glob("*.csv")}
    for path, props in ours.items():
        df = pl.read_csv(plots.parent / path)
        ys = props["y"] if isinstance(props["y"], list) else [props["y"]]
        assert props["x"] in df.columns and set(ys) <= set(df.columns), (path, df.columns)
        assert df.height > 0
        tmpl = props.get("template")
        if tmpl and not (REPO / ".dvc" / "plots" / f"{tmpl}.json").is_file():
            from dvc_render.vega_templates import TEMPLATES

            assert tmpl in {t.DEFAULT_NAME for t in TEMPLATES}, tmpl
    abl = pl.read_csv(plots / "data" / "ablation.csv")
    assert abl["k"].to_list() == KS and abl.columns == ["k", "unfiltered", "filtered", "random"]
    assert (abl.filter(pl.col("k") == 100)["unfiltered"] > abl.filter(pl.col("k") == 100)["random"]).all()


def test_figures_are_deterministic_and_follow_their_input_table(tmp_path):
    a, _, _ = build_synthetic(tmp_path / "a")
    b, _, _ = build_synthetic(tmp_path / "b")
    c, _, _ = build_synthetic(tmp_path / "c", make_inputs(iou_shift=0.4))
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n  # same inputs, same bytes
    changed = {n.as_posix() for n in names if (a / n).read_bytes() != (c / n).read_bytes()}
    assert changed == {"fig5_iou.png", "data/iou.csv"}  # only what the IoU table feeds


# --------------------------------------------------------------------------- the report

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


def test_report_pages_link_both_ways_and_every_link_resolves(built):
    plots, report, w = built
    assert (report / "index.html").is_file() and (report / "tables.html").is_file()
    assert check_internal_links(report) > 50
    pages = report_refs(report)
    index_links = {r for _, r in pages[report / "index.html"].refs}
    images = sorted((report / "images").glob("*.html"))
    units = sorted((report / "units").glob("*.html"))
    assert images and units
    for img in images:
        assert f"images/{img.name}" in index_links
        unit_links = {r for _, r in pages[img].refs if r.startswith("../units/")}
        assert unit_links, img  # image -> units
        for link in unit_links:
            back = {r for _, r in pages[(img.parent / link).resolve()].refs}
            assert f"../images/{img.name}" in back, (img.name, link)  # unit -> image
    html = "\n".join(p.read_text() for p in report.rglob("*.html"))
    assert "<script" not in html.replace("&lt;script&gt;", "")  # tokens escaped, no scripts at all
    assert "&lt;script&gt;" in html and "a&amp;b" in html
    assert "http://" not in html and "https://" not in html


def test_report_tables_put_the_paper_values_beside_ours(built):
    _, report, _ = built
    html = (report / "tables.html").read_text()
    for v in ("0.3848", "0.3627", "23.43", "0.3291", "&gt; .5"):
        assert v in html, v
    assert "not computed" in html


def test_report_page_shows_the_target_word_marked(built):
    _, report, _ = built
    html = (report / "images" / "1.html").read_text()
    assert re.search(r"a <mark>cat</mark> on a mat with another cat", html)


# --------------------------------------------------------------------------- DVC wiring

def test_plot_stage_is_declared_with_its_tables_and_params():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    st = dvc["stages"]["plot"]
    assert st["cmd"] == "python -m stages.plot"
    for dep in ("data/captions.parquet", "data/attributions.parquet", "data/interpretable.parquet",
                "data/scores.parquet", "data/iou.parquet", "data/selectivity.parquet", "data/ablation.parquet",
                "data/layer_distribution.csv", "metrics/scores.json", "metrics/iou.json", "metrics/ablation.json",
                "metrics/neurons.json", "mmn/plots", "mmn/report", "stages/plot.py"):
        assert dep in st["deps"], dep
    assert "plot" in st["params"] and set(st["outs"]) == {"plots", "report"}
    from mmn.params import load_params

    assert load_params(REPO / "params.yaml").plot.quantile == 0.95


def _dvc(args, cwd):
    from test_pipeline_e2e import _run

    return _run([str(Path(sys.executable).parent / "dvc"), *args], cwd)


def _write_stage_inputs(repo: Path) -> None:
    """Synthetic versions of every dep of the plot stage (and its outs), so `dvc commit`
    can record them without running the pipeline."""
    inp = make_inputs()
    d = repo / "data"
    (d / "coco" / "images").mkdir(parents=True)
    (d / "coco" / "annotations").mkdir()
    (d / "coco" / "annotations" / "instances.json").write_text("{}")
    (d / "projection").mkdir()
    (d / "projection" / "meta.json").write_text("{}")
    for name, df in (("captions", inp.captions), ("attributions", inp.attributions),
                     ("interpretable", inp.interpretable), ("scores", inp.scores), ("iou", inp.iou),
                     ("selectivity", inp.selectivity), ("ablation", inp.ablation)):
        df.write_parquet(d / f"{name}.parquet")
    inp.layers.write_csv(d / "layer_distribution.csv")
    inp.methods_curve.write_csv(d / "compare_methods_curve.csv")
    inp.methods_summary.write_csv(d / "compare_methods.csv")
    (repo / "metrics").mkdir(exist_ok=True)
    for k, v in inp.metrics.items():
        (repo / "metrics" / f"{k}.json").write_text(json.dumps(v))
    build_synthetic(repo)


def test_dvc_status_reports_the_plot_stage_changed_when_an_input_table_changes(tmp_path):
    from test_pipeline_e2e import _copy_repo

    repo = _copy_repo(tmp_path / "repo")
    for p in ("data", "metrics", "plots", "report"):
        shutil.rmtree(repo / p, ignore_errors=True)
    _write_stage_inputs(repo)
    r = _dvc(["commit", "--force", "plot"], repo)
    assert r.returncode == 0, r.stdout + r.stderr
    r = _dvc(["status", "--json", "plot"], repo)
    assert r.returncode == 0, r.stderr
    assert "plot" not in json.loads(r.stdout or "{}"), r.stdout
    inp = make_inputs(iou_shift=0.3)
    inp.iou.write_parquet(repo / "data" / "iou.parquet")
    r = _dvc(["status", "--json", "plot"], repo)
    status = json.loads(r.stdout)
    assert {"changed deps": {"data/iou.parquet": "modified"}} in status["plot"], status
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["plot"]["bins"] = 9
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    r = _dvc(["status", "--json", "plot"], repo)
    changed = [e["changed deps"] for e in json.loads(r.stdout)["plot"] if "changed deps" in e]
    assert any("params.yaml" in c and "plot" in c["params.yaml"] for c in changed), r.stdout


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


def test_offline_template_inlines_vega_and_keeps_dvc_placeholders(tmp_path):
    html = build_template(tmp_path / "offline.html").read_text()
    assert html.count("{plot_divs}") == 1 and "{scripts}" not in html
    assert "cdn.jsdelivr" not in html and "<script src" not in html
    for lib in ("vega@5.", "vega-lite@5.", "vega-embed@6."):
        assert lib in html
    cfg = (REPO / ".dvc" / "config").read_text()
    assert re.search(r"html_template\s*=\s*\.\./\.cache/dvc-plots/offline\.html", cfg)


# --------------------------------------------------------------------------- activation maps from a model

def test_model_maps_slice_the_requested_units_from_one_forward_pass(tiny_adapters):
    import torch
    from torch import nn

    from mmn.models.prefix_lm import ImagePrefixLM
    from mmn.neurons.activations import image_activations
    from mmn.plots.activations import model_maps, top_activating

    ad, tok = tiny_adapters["llama"]
    torch.manual_seed(0)
    plm = ImagePrefixLM(ad, tok, nn.Linear(12, ad.d_model))
    feats = {i: torch.randn(1, 9, 12) * 2 for i in (1, 2)}

    class Enc:  # stands in for a PatchEncoder: "image" i -> its fixed features
        grid = 3

        def encode(self, images):
            return feats[images[0]]

    plm.encoder = Enc()
    units = [(0, 5), (2, 1), (1, 7)]
    maps = model_maps(plm, load_image=lambda i: i)([1, 2], units)
    for i in (1, 2):
        full = image_activations(plm, plm.soft_tokens(feats[i]))
        assert maps[i].shape == (3, 9)
        for j, (l, u) in enumerate(units):
            np.testing.assert_allclose(maps[i][j], full[l, :, u].numpy(), rtol=1e-5, atol=1e-6)
    top = top_activating(maps, units, 1)
    for j, u in enumerate(units):
        best = max((1, 2), key=lambda i: maps[i][j].max())
        assert top[u][0][0] == best


def test_report_self_check_finds_broken_and_external_links(tmp_path):
    from mmn.report.check import broken_links

    _, report, _ = build_synthetic(tmp_path)
    assert broken_links(report) == []
    (report / "extra.html").write_text('<a href="units/nope.html">x</a><img src="https://cdn.example/x.png">'
                                       '<a href="index.html#no-such-anchor">y</a>')
    problems = broken_links(report)
    assert len(problems) == 3 and all(p.startswith("extra.html") for p in problems), problems
