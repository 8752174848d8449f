"""Figures, plot-ready tables, the HTML report and the `plot` stage's DVC wiring.

Everything here runs on synthetic tables and synthetic activation maps (no models):
helpers.report's :func:`make_inputs` builds a small but complete set of stage outputs,
its :func:`fake_maps` stands in for the LM (tests/test_report_browser.py uses both too).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from PIL import Image

from conftest import REPO
from helpers.pipeline import copy_repo, run
from helpers.report import (GRID, KS, SETTINGS, build_synthetic, build_template, check_internal_links, make_inputs,
                            report_refs)
from mmn.plots import tables as T
from mmn.plots.heatmap import UNIT_COLORS, overlay_heatmap, overlay_masks

NOT_COMPUTED = "not computed: no CLIP weights configured for profile 'embedded'"


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
    assert abl["k"].to_list() == KS and abl.columns == ["k", "unfiltered", "filtered", "random", "random_filtered"]
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


def test_report_tables_show_the_controls(built):
    """The controls section: the plant as one row per figure (hand-computed from
    synthetic_controls' three concept images) and the cascade as one row per step."""
    from mmn.report.controls import controls_view

    _, report, _ = built
    html = (report / "tables.html").read_text()
    sec = html[html.index("controls / plant"):]
    cell = {k: re.search(rf"<th>{k}</th><td>([^<]*)</td>", sec).group(1)
            for k in ("top1_rate", "median_rank", "ablation_rel_drop", "iou", "iou_random", "decoded")}
    assert cell == {"top1_rate": f"{2 / 3:.4g}", "median_rank": "1",
                    "ablation_rel_drop": f"{1 - (0.1 + 0.2 + 0.25) / (0.5 + 0.4 + 0.3):.4g}",
                    "iou": "0.35", "iou_random": "0.075", "decoded": "cat, cats, kitten"}
    rows = re.findall(r"<tr><th>(k\d+)</th><td>([^<]*)</td>", sec)
    assert rows == [("k1", "0.55"), ("k2", "0.45"), ("k4", "0.25")]  # mean overlap of images 1 and 2
    assert controls_view({"plant": None, "cascade": None}) == {
        "plant": {"plant": "none (controls.plant: null)"}, "cascade": {"cascade": "not run (controls.cascade: [])"}}


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
                "data/layer_distribution.csv", "data/results/scores.json", "data/results/iou.json",
                "data/results/ablation.json", "data/results/neurons.json", "mmn/plots", "mmn/report", "stages/plot.py"):
        assert dep in st["deps"], dep
    assert "plot" in st["params"] and set(st["outs"]) == {"plots", "report"}
    from mmn.params import load_params

    assert load_params(REPO / "params.yaml").plot.quantile == 0.95


def _dvc(args, cwd):
    return run([str(Path(sys.executable).parent / "dvc"), *args], cwd)


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
    (d / "projection_live" / "plots" / "metrics").mkdir(parents=True)  # DVCLive curves: none (untrained)
    for name, df in (("captions", inp.captions), ("attributions", inp.attributions),
                     ("interpretable", inp.interpretable), ("scores", inp.scores), ("iou", inp.iou),
                     ("selectivity", inp.selectivity), ("ablation", inp.ablation)):
        df.write_parquet(d / f"{name}.parquet")
    inp.layers.write_csv(d / "layer_distribution.csv")
    inp.methods_curve.write_csv(d / "compare_methods_curve.csv")
    inp.methods_summary.write_csv(d / "compare_methods.csv")
    (d / "results").mkdir(exist_ok=True)
    for k, v in inp.metrics.items():
        (d / "results" / f"{k}.json").write_text(json.dumps(v))
    from mmn.models.planted import save_plant

    save_plant(d / "plant", None)
    build_synthetic(repo)


def test_dvc_status_reports_the_plot_stage_changed_when_an_input_table_changes(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    for p in ("data", "summary", "plots", "report"):
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


def test_report_cells_show_a_floor_p_value_as_a_bound():
    """Report tables: a p-value (key p or *_p) at the paired test's Monte Carlo floor reads
    "≤ 0.0002" with the reason on hover; the same number under another key, or another p, reads
    as a number."""
    from mmn.metrics.stats import MC_FLOOR
    from mmn.report.build import _fmt, _tables

    assert _fmt(MC_FLOOR, "vs_random_p").value == "≤ 0.0002" and "Monte Carlo" in _fmt(MC_FLOOR, "p").title
    assert _fmt(MC_FLOOR, "mean").value == "0.0002" and _fmt(0.031, "p").value == "0.031"
    t = _tables({"k100": {"rel_drop": 0.5, "vs_random_p": MC_FLOOR}, "k6400": {"rel_drop": 0.9, "vs_random_p": 0.5}},
                "ablation.unfiltered", "t")[0]
    assert [[c.value for c in cells] for _, cells in t.rows] == [["0.5", "≤ 0.0002"], ["0.9", "0.5"]]
