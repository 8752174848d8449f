"""scripts/compare_runs.py on two hand-made runs: weight difference, identical captions and
metric differences computed by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO


def _run(root: Path, w: float, captions: list[str], kept: float, folder: str = "summary") -> Path:
    (root / "data/projection").mkdir(parents=True)
    (root / folder).mkdir()
    save_file({"weight": torch.full((2, 3), w), "bias": torch.zeros(2)},
              str(root / "data/projection/projection.safetensors"))
    (root / "data/projection/meta.json").write_text(json.dumps({"best_step": 10, "best_val_loss": 1.5}))
    pl.DataFrame({"image_id": [2, 1], "caption": captions, "noun": ["cat", None]}).write_parquet(
        root / "data/captions.parquet")
    kept_ci = {"mean": kept, "lo": 0.0, "hi": 1.0, "n": 2}
    (root / folder / "neurons.json").write_text(json.dumps({"kept_fraction": kept_ci}))
    if folder == "summary":  # the headline beside it is not what is compared
        (root / "metrics").mkdir()
        (root / "metrics/neurons.json").write_text(json.dumps({"kept_fraction": kept}))
    return root


def test_compare_runs_reports_hand_computed_differences(tmp_path):
    a = _run(tmp_path / "a", 0.5, ["a cat", "a dog"], 0.25)
    b = _run(tmp_path / "b", 0.75, ["a cat", "a bird"], 0.5)
    out = subprocess.run([sys.executable, str(REPO / "scripts/compare_runs.py"), str(a), str(b)],
                         capture_output=True, text=True, check=True).stdout
    assert "max |dW| 0.25 (max |W| 0.5)" in out
    assert "captions identical: 1/2; target nouns identical: 2/2" in out
    assert "'a dog'" in out and "'a bird'" in out
    assert "| neurons:kept_fraction.mean | 0.25 | 0.5 | +0.25 |" in out
    assert "kept_fraction.lo" not in out  # CI bounds only with --all
    assert "| neurons:kept_fraction |" not in out  # summary/, not the headline metrics/


def test_compare_runs_reads_metrics_of_runs_made_before_summary(tmp_path):
    a = _run(tmp_path / "a", 0.5, ["a cat", "a dog"], 0.25, folder="metrics")
    b = _run(tmp_path / "b", 0.75, ["a cat", "a bird"], 0.5, folder="metrics")
    out = subprocess.run([sys.executable, str(REPO / "scripts/compare_runs.py"), str(a), str(b), "--all"],
                         capture_output=True, text=True, check=True).stdout
    assert "| neurons:kept_fraction.mean | 0.25 | 0.5 | +0.25 |" in out
    assert "| neurons:kept_fraction.lo | 0 | 0 | +0 |" in out


def test_flatten_keeps_numeric_leaves_only():
    from mmn.run_metrics import flatten

    obj = {"a": {"b": 1, "c": None, "d": True, "e": {"f": 2.5}}, "g": "x", "h": 3}
    assert flatten(obj) == {"a.b": 1.0, "a.e.f": 2.5, "h": 3.0}
    assert flatten(obj["a"], "m") == {"m.b": 1.0, "m.e.f": 2.5}


def _captions(root: Path, ids: list[int], own: list[float], shuffled: list[float]) -> None:
    pl.DataFrame({"image_id": ids, "caption": ["a cat"] * len(ids), "noun": ["cat"] * len(ids),
                  "bertscore_own": own, "bertscore_shuffled": shuffled,
                  "noun_in_refs": [True] * len(ids)}).write_parquet(root / "data/captions.parquet")


def test_paired_comparison_of_two_runs_by_hand(tmp_path):
    """--paired: B − A over the images both runs evaluated (2 and 3 here), each run's mean over
    those images, a missing stage output named, projections of different widths tolerated."""
    a = _run(tmp_path / "a", 0.5, ["a cat", "a dog"], 0.25)
    b = _run(tmp_path / "b", 0.75, ["a cat", "a bird"], 0.5)
    save_file({"weight": torch.full((4, 3), 0.75), "bias": torch.zeros(4)},  # another LM width
              str(b / "data/projection/projection.safetensors"))
    _captions(a, [1, 2, 3], [0.9, 0.2, 0.4], [0.1, 0.1, 0.1])
    _captions(b, [2, 3, 4], [0.5, 0.3, 0.0], [0.2, 0.1, 0.0])
    pl.DataFrame({"image_id": [2, 3, 2], "kind": ["unfiltered", "unfiltered", "random"], "k": [50, 50, 50],
                  "rel_drop": [0.5, 0.1, -0.2]}).write_parquet(a / "data/ablation.parquet")
    for root, rows in ((a, [(2, 0, 1), (2, 2, 3), (2, 2, 3), (3, 1, 0)]), (b, [(2, 4, 0), (3, 0, 0)])):
        pl.DataFrame(rows, schema=["image_id", "layer", "unit"], orient="row").write_parquet(
            root / "data/attributions.parquet")  # a unit at several patches counts once
    out = subprocess.run([sys.executable, str(REPO / "scripts/compare_runs.py"), str(a), str(b), "--paired",
                          "--layers", "3", "5",
                          "--json", str(tmp_path / "p.json"), "--csv", str(tmp_path / "p.csv")],
                         capture_output=True, text=True, check=True).stdout
    assert "shapes differ ((2, 3) vs (4, 3)): no weight difference" in out
    got = json.loads((tmp_path / "p.json").read_text())
    own = got["caption_bertscore_own"]
    assert own["n"] == 2 and own["a"]["mean"] == pytest.approx(0.3) and own["b"]["mean"] == pytest.approx(0.4)
    assert own["b_minus_a"]["diff"] == pytest.approx(((0.5 - 0.2) + (0.3 - 0.4)) / 2)
    assert own["b_minus_a"]["p"] == 1.0  # exact: the 4 sign flips of (+0.3, −0.1) all reach |mean| ≥ 0.1
    shuf = got["caption_own_minus_shuffled"]["b_minus_a"]["diff"]
    assert shuf == pytest.approx(((0.5 - 0.2) - (0.2 - 0.1) + (0.3 - 0.1) - (0.4 - 0.1)) / 2)
    assert got["ablation_k50"]["not_computed"] == "a stage output is missing in B"
    depth = got["relative_depth"]  # A: image 2 layers {0, 2} -> 1/2, image 3 -> 1/2; B: 4/4, 0/4
    assert depth["a"]["mean"] == pytest.approx(0.5) and depth["b"]["mean"] == pytest.approx(0.5)
    assert depth["b_minus_a"]["diff"] == pytest.approx(0.0)
    assert got["kept_fraction"]["not_computed"] == "a stage output is missing in A and B"
    per = pl.read_csv(tmp_path / "p.csv").filter(pl.col("metric") == "caption_bertscore_own")
    assert per["image_id"].to_list() == [2, 3] and per["b"].to_list() == [0.5, 0.3]


def test_per_image_table_without_a_column_names_the_file(tmp_path):
    from mmn.per_image import captions

    (tmp_path / "data").mkdir()
    pl.DataFrame({"image_id": [1], "bertscore_own": [0.5]}).write_parquet(tmp_path / "data/captions.parquet")
    with pytest.raises(ValueError, match=r"captions\.parquet: no column 'bertscore_shuffled'"):
        captions(tmp_path, "bertscore_own")
    assert captions(tmp_path / "nothing", "bertscore_own") is None


@pytest.mark.slow
def test_per_image_values_average_to_the_stages_summaries(reproduced_pipeline):
    """Each per-image value is the one its stage averages: the mean over the run's images equals
    the stage's own summary number (the shared end-to-end run)."""
    from mmn import per_image as P

    src, _ = reproduced_pipeline
    res = {f: json.loads((src / "data/results" / f"{f}.json").read_text())
           for f in ("captions", "neurons", "scores", "iou", "ablation", "methods")}

    def mean(v):
        assert v, "no per-image values"
        return sum(v.values()) / len(v)

    approx = lambda x: pytest.approx(x, rel=1e-5, abs=1e-6)  # noqa: E731  (summaries keep 6 digits)
    assert mean(P.captions(src, "bertscore_own")) == approx(res["captions"]["bertscore_own"]["mean"])
    assert mean(P.captions(src, "own_minus_shuffled")) == approx(res["captions"]["own_vs_shuffled"]["diff"])
    assert mean(P.kept_fraction(src)) == approx(res["neurons"]["kept_fraction"]["mean"])
    paired = res["scores"]["bertscore"]["paired"]
    assert mean(P.score_minus_control(src, "multimodal_all", "random_pairing")) == approx(
        paired["multimodal_vs_random"]["diff"])
    if paired["interpretable_vs_random"] is not None:  # the small run may keep no interpretable unit
        assert mean(P.score_minus_control(src, "multimodal_interpretable", "random_pairing_interpretable")) == approx(
            paired["interpretable_vs_random"]["diff"])
    t2 = res["scores"]["bertscore"]["table2"]
    assert mean(P.score_minus_control(src, "prompts", "random_prompts")) == approx(
        t2["prompts"]["mean"] - t2["random_prompts"]["mean"])
    if res["iou"]["multimodal_vs_random"] is not None:
        assert mean(P.iou(src)) == approx(res["iou"]["multimodal_vs_random"]["diff"])
    assert mean(P.ablation(src, 100)) == approx(res["ablation"]["unfiltered"]["k100"]["rel_drop"]["mean"])
    assert mean(P.methods_spearman(src)) == approx(res["methods"]["grad_x_act"]["spearman"]["mean"])
