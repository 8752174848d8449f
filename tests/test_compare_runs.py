"""scripts/compare_runs.py on two hand-made runs: weight difference, identical captions and
metric differences computed by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
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
