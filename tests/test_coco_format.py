"""mmn.data.coco_format: the one COCO structure check, raising each caller's error type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmn.data.coco_format import check_coco_structure, read_coco_json, read_json_object
from mmn.data.layout import CocoLayout, LayoutError
from mmn.quality import QualityError


def _instances() -> dict:
    return {"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 3}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 2}],
            "categories": [{"id": 2, "name": "cat"}]}


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("categories"), "missing top-level key 'categories' (a COCO instances file needs"),
    (lambda d: d.update(annotations={}), "'annotations' is a dict, expected a list"),
    (lambda d: d["categories"].append(3), r"categories[1] is not an object"),
])
def test_structure_errors_name_the_label_and_key(edit, message):
    data = _instances()
    edit(data)
    with pytest.raises(LayoutError) as info:
        check_coco_structure(data, "f.json", "instances", error=LayoutError)
    assert str(info.value).startswith("f.json: ") and message in str(info.value)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["images"][0].update(width="4"), "images[0] lacks a valid ['width']"),
    (lambda d: d["images"][0].update(id=True), "images[0] lacks a valid ['id']"),
    (lambda d: d["images"][0].update(file_name="../x.jpg"), "images[0] (id 1) has unsafe file_name '../x.jpg'"),
    (lambda d: d["images"].append(dict(d["images"][0])), "duplicate image id 1"),
    (lambda d: d["annotations"][0].pop("category_id"), "annotations[0] lacks one of ['id', 'image_id', 'category_id']"),
])
def test_strict_record_checks_only_under_strict(edit, message):
    data = _instances()
    edit(data)
    check_coco_structure(data, "f.json", "instances", error=LayoutError)  # structure alone is fine
    with pytest.raises(LayoutError, match="^f.json: ") as info:
        check_coco_structure(data, "f.json", "instances", error=LayoutError, strict=True)
    assert message in str(info.value)


def test_captions_need_no_categories_and_annotations_need_no_category_id():
    data = _instances()
    del data["categories"], data["annotations"][0]["category_id"]
    check_coco_structure(data, "c.json", "captions", error=LayoutError, strict=True)


def test_file_errors_and_error_factories(tmp_path: Path):
    """Missing file, bad JSON, non-object; an error factory (callable) keeps its own type."""
    path = tmp_path / "x.json"
    made: list[str] = []

    def factory(msg: str) -> QualityError:
        made.append(msg)
        return QualityError(f"gate: {msg}", suite="s", path=path)

    with pytest.raises(QualityError, match=f"^gate: {path}: file not found$"):
        read_json_object(path, factory)
    path.write_text('{"images": [')
    with pytest.raises(QualityError, match="not valid JSON"):
        read_coco_json(path, "captions", factory)
    path.write_text("[1]")
    with pytest.raises(LayoutError, match="top level is a list, expected a JSON object"):
        read_json_object(path, LayoutError)
    assert len(made) == 2
    path.write_text(json.dumps(_instances()))
    assert read_coco_json(path, "instances", LayoutError, strict=True) == _instances()


def test_layout_reader_uses_the_shared_checks(tmp_path: Path):
    (tmp_path / "annotations").mkdir()
    data = _instances()
    data["images"][0] = "a.jpg"
    (tmp_path / "annotations" / "instances.json").write_text(json.dumps(data))
    with pytest.raises(LayoutError, match=r"instances\.json: images\[0\] is not an object"):
        CocoLayout(tmp_path).images  # noqa: B018
