"""mmn.quality: Great Expectations gates for captions.parquet and the COCO layout."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pandas as pd
import polars as pl
import pytest

import mmn.quality as q
from mmn.quality import QualityError, check_captions, check_coco_layout, expect, run_suite

from conftest import COCO_MINI  # noqa: E402
from helpers.tables import good_captions  # noqa: E402
COCO_MINI = COCO_MINI.resolve()
needs_coco = pytest.mark.skipif(
    not (COCO_MINI / "annotations" / "instances.json").is_file(),
    reason=f"coco-mini test data not found at {COCO_MINI}",
)


# ------------------------------------------------------------------ captions


def _set(df: pl.DataFrame, col: str, values: list) -> pl.DataFrame:
    return df.with_columns(pl.Series(col, values, dtype=df.schema[col]))


def test_good_captions_pass_polars_pandas_and_parquet(tmp_path):
    df = good_captions()
    check_captions(df)
    check_captions(q.to_pandas(df))
    path = tmp_path / "captions.parquet"
    df.write_parquet(path)
    check_captions(path)  # read back with nullable dtypes
    check_captions(pl.read_parquet(path))


def test_polars_nullable_ints_stay_integer():
    pdf = q.to_pandas(good_captions())
    assert str(pdf["target_token_id"].dtype) == "Int64"
    assert str(pdf["image_id"].dtype) == "int64"


BROKEN = {
    # name: (transform, substrings the message must contain)
    "duplicate image_id": (
        lambda df: _set(df, "image_id", [7001, 7002, 7002, 7004]),
        ["'captions'", "expect_column_values_to_be_unique(column='image_id')",
         "unexpected values (first 2): [7002, 7002]", "b.jpg", "c.jpg"],
    ),
    "p_target out of range": (
        lambda df: _set(df, "p_target", [0.31, None, 1.5, 0.0]),
        ["expect_column_values_to_be_between(column='p_target', min_value=0.0, "
         "max_value=1.0)", "[1.5]", "7003"],
    ),
    "noun without target_token_id": (
        lambda df: _set(df, "target_token_id", [5325, None, None, 1976]),
        ["expect_column_values_to_not_be_null(column='target_token_id', "
         "row_condition='has_noun == True'", "1 of 3 rows unexpected", "7003"],
    ),
    "target set although no noun": (
        lambda df: _set(df, "noun", ["dog", "thing", "cat", "zebras"]),
        ["expect_column_values_to_be_null(column='noun', row_condition='has_noun == False'",
         "['thing']", "7002"],
    ),
    "missing column": (
        lambda df: df.drop("p_target"),
        ["expect_column_to_exist(column='p_target')", "column 'p_target' is missing"],
    ),
    "negative n_caption_tokens": (
        lambda df: _set(df, "n_caption_tokens", [4, -1, 5, 3]),
        ["column='n_caption_tokens', min_value=0", "[-1]", "7002"],
    ),
    "null caption": (
        lambda df: _set(df, "caption", ["a dog on grass", None, "x", "y"]),
        ["expect_column_values_to_not_be_null(column='caption')", "7002"],
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_captions_fail_with_readable_message(case):
    transform, needles = BROKEN[case]
    with pytest.raises(QualityError) as info:
        check_captions(transform(good_captions()))
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in:\n{msg}"
    assert info.value.suite == "captions"
    assert info.value.failures, "failures must be listed"


def test_missing_column_folds_dependent_expectations():
    with pytest.raises(QualityError) as info:
        check_captions(good_captions().drop("target_pos"))
    err = info.value
    assert [f.type for f in err.failures] == ["expect_column_to_exist"]
    assert "more expectations on it were not evaluated" in str(err)
    assert "does not exist" not in str(err)  # GX's traceback text is folded away


def test_float_token_ids_from_plain_pandas_fail_the_type_check():
    # pd.read_parquet without dtype_backend turns int-with-nulls into float64
    pdf = good_captions().to_pandas()
    assert pdf["target_token_id"].dtype == "float64"
    with pytest.raises(QualityError, match=r"(?s)target_token_id.*observed: 'float64'"):
        check_captions(pdf)


def test_wrong_type_is_reported():
    df = good_captions().with_columns(pl.col("image_id").cast(pl.Utf8))
    with pytest.raises(QualityError) as info:
        check_captions(df)
    assert "expect_column_values_to_be_of_type(column='image_id', type_='int64')" in str(
        info.value
    )


def test_run_suite_accepts_gx_objects_and_registered_suites():
    import great_expectations.expectations as gxe

    df = pd.DataFrame({"id": [1, 2, 3], "score": [0.1, 0.2, 0.3]})
    run_suite(df, "mine", [gxe.ExpectColumnValuesToBeUnique(column="id"),
                           expect("expect_column_max_to_be_between", column="score",
                                  max_value=1)])
    q.register_suite("toy", lambda: [expect("expect_column_values_to_be_between",
                                            column="score", max_value=0.15)])
    try:
        with pytest.raises(QualityError, match=r"(?s)'toy'.*2 of 3 rows unexpected"):
            run_suite(df, "toy", q.SUITES["toy"]())
    finally:
        q.SUITES.pop("toy")
    assert "captions" in q.SUITES and "coco_instances" in q.SUITES


def test_sample_rows_are_capped_at_five():
    df = pd.DataFrame({"id": range(50), "x": [-1] * 50})
    with pytest.raises(QualityError) as info:
        run_suite(df, "cap", [expect("expect_column_values_to_be_between", column="x",
                                     min_value=0)])
    msg = str(info.value)
    assert "50 of 50 rows unexpected" in msg
    rows = msg.split("sample offending rows:")[1].strip().splitlines()
    assert len(rows) == 1 + 5  # header + 5 rows


def test_offline_and_quiet_in_a_fresh_interpreter():
    code = r"""
import socket, sys
calls = []
def deny(*a, **k):
    calls.append(a); raise OSError("network disabled in test")
socket.socket.connect = deny
socket.create_connection = deny
import polars as pl
import mmn.quality as q
q.run_suite(pl.DataFrame({"a": [1, 2]}), "t",
            [q.expect("expect_column_values_to_be_unique", column="a")])
import os
print("ENV", os.environ.get("GX_ANALYTICS_ENABLED"), "CALLS", len(calls))
"""
    env = {k: v for k, v in os.environ.items() if k != "GX_ANALYTICS_ENABLED"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120, cwd=pathlib.Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "ENV false CALLS 0"
    # no progress bars / banners on stderr or stdout
    assert "Calculating Metrics" not in out.stderr + out.stdout
    assert out.stdout.strip() == "ENV false CALLS 0"


# ---------------------------------------------------------------------- COCO


@pytest.fixture
def coco(tmp_path) -> pathlib.Path:
    """A writable coco-mini copy: annotations copied, images symlinked."""
    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for img in (COCO_MINI / "images").iterdir():
        (root / "images" / img.name).symlink_to(img)
    for name in ("instances.json", "captions.json"):
        (root / "annotations" / name).write_bytes((COCO_MINI / "annotations" / name).read_bytes())
    return root


def _edit(path: pathlib.Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@needs_coco
def test_coco_mini_passes():
    check_coco_layout(COCO_MINI)
    frames = q.coco_frames(COCO_MINI)
    assert len(frames["images"]) == 100 and len(frames["instances"]) == 731
    assert (frames["instances"]["mask_pixels"] > 0).all()
    assert (frames["images"]["n_captions"] == 5).all()


@needs_coco
def test_coco_missing_image_file_is_named(coco):
    (coco / "images" / "000000000139.jpg").unlink()
    with pytest.raises(QualityError) as info:
        check_coco_layout(coco)
    msg = str(info.value)
    assert "'coco_images'" in msg and "column='file_exists'" in msg
    assert "000000000139.jpg" in msg


@needs_coco
@pytest.mark.parametrize(
    "segmentation, reason",
    [([[]], "input type is not supported"),  # empty polygon
     ([], "IndexError"),  # no polygon at all
     ([[5.0, 5.0, 5.0, 5.0, 5.0, 5.0]], "empty mask")],  # degenerate: zero area
)
def test_coco_empty_or_degenerate_polygon(coco, segmentation, reason):
    def breakit(d):
        d["annotations"][10]["segmentation"] = segmentation
    _edit(coco / "annotations" / "instances.json", breakit)
    ann_id = json.loads((coco / "annotations" / "instances.json").read_text())[
        "annotations"][10]["id"]
    with pytest.raises(QualityError) as info:
        check_coco_layout(coco)
    msg = str(info.value)
    assert "'coco_instances'" in msg
    assert "expect_column_values_to_be_between(column='mask_pixels', min_value=1" in msg
    assert str(ann_id) in msg and reason in msg
    assert [f.column for f in info.value.failures] == ["mask_pixels"]


@needs_coco
def test_coco_truncated_captions_json(coco):
    path = coco / "annotations" / "captions.json"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(QualityError, match="not valid JSON") as info:
        check_coco_layout(coco)
    assert str(path) in str(info.value) and info.value.path == path


@needs_coco
def test_coco_instances_without_categories(coco):
    path = coco / "annotations" / "instances.json"
    _edit(path, lambda d: d.pop("categories"))
    with pytest.raises(QualityError, match="missing top-level key 'categories'") as info:
        check_coco_layout(coco)
    assert str(path) in str(info.value)


@needs_coco
def test_coco_missing_annotation_file(coco):
    (coco / "annotations" / "instances.json").unlink()
    with pytest.raises(QualityError, match=r"instances\.json: file not found"):
        check_coco_layout(coco)


@needs_coco
def test_coco_dangling_references_and_uncaptioned_image(coco):
    def inst(d):
        d["annotations"][0]["category_id"] = 999
        d["annotations"][1]["image_id"] = 123456789
        d["images"][1]["id"] = d["images"][0]["id"]  # duplicate image id
    _edit(coco / "annotations" / "instances.json", inst)
    caps_path = coco / "annotations" / "captions.json"
    caps = json.loads(caps_path.read_text())
    first = caps["images"][2]["id"]
    caps["annotations"] = [a for a in caps["annotations"] if a["image_id"] != first]
    caps["annotations"][0]["image_id"] = 987654321
    caps_path.write_text(json.dumps(caps))

    with pytest.raises(QualityError) as info:
        check_coco_layout(coco)
    msg = str(info.value)
    assert "expect_column_values_to_be_unique(column='id')" in msg
    assert "column='n_captions', min_value=1" in msg
    assert "[999]" in msg and "column='category_id'" in msg
    assert "123456789" in msg and "987654321" in msg
    suites = {f.suite for f in info.value.failures}
    assert suites == {"coco_images", "coco_instances", "coco_captions"}
