"""tests/same_outputs.py on hand-made pairs: any byte difference fails, and the message tells float
noise (the VML race's signature) from a real difference."""

from __future__ import annotations

import json

import polars as pl
import pytest

from same_outputs import assert_byte_identical, output_diff


def _pq(path, p, caption="a dog"):
    pl.DataFrame({"image_id": [1, 2], "caption": [caption, "a cat"], "p_target": [p, 0.5]}).write_parquet(path)
    return path


def test_float_noise_fails_and_is_named_as_such(tmp_path):
    a, b = _pq(tmp_path / "a.parquet", 0.20860), _pq(tmp_path / "b.parquet", 0.20851)  # the CI case: 4e-4 rel
    assert output_diff(a, b) is None
    with pytest.raises(AssertionError, match="a.parquet: float low bits only"):
        assert_byte_identical({"a.parquet": (a, b)})


def test_identical_files_pass(tmp_path):
    a, b = _pq(tmp_path / "a.parquet", 0.2), _pq(tmp_path / "b.parquet", 0.2)
    assert_byte_identical({"x": (a, b)})


@pytest.mark.parametrize("p, caption", [(0.2086 * 1.01, "a dog"), (0.20860, "a cat")])
def test_real_differences_fail(tmp_path, p, caption):
    a, b = _pq(tmp_path / "a.parquet", 0.20860), _pq(tmp_path / "b.parquet", p, caption)
    assert output_diff(a, b) is not None
    with pytest.raises(AssertionError, match="x: column"):
        assert_byte_identical({"x": (a, b)})


def test_json_counts_must_match_floats_may_wobble(tmp_path):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps({"n": 7, "mean": 0.41, "ci": [0.3, 0.5]}))
    b.write_text(json.dumps({"n": 7, "mean": 0.41 + 1e-6, "ci": [0.3, 0.5]}))
    c.write_text(json.dumps({"n": 6, "mean": 0.41, "ci": [0.3, 0.5]}))
    assert output_diff(a, b) is None
    assert "$.n" in output_diff(a, c)
