"""params.yaml validation: bad keys, types and values fail with the key's name."""

from __future__ import annotations

import copy

import pytest
import yaml

from mmn.params import ParamsError, load_params, parse_params

from conftest import REPO

RAW = yaml.safe_load((REPO / "params.yaml").read_text())


def _with(path: str, value):
    raw = copy.deepcopy(RAW)
    node = raw
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return raw


def test_repo_params_are_valid():
    p = load_params(REPO / "params.yaml")
    assert p.profile == "embedded"
    assert p.model.lm == "embedded:smollm2-135m"
    assert p.attribute.k == 100 and p.filter.min_words == 7


def test_profile_switch_resolves_paper_models():
    p = parse_params(_with("profile", "paper"))
    assert p.model.lm == "EleutherAI/gpt-j-6B"
    assert p.model.encoder_grid == 14 and p.model.projection == "limber"


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        ("attribute.k", 0, "attribute.k"),
        ("attribute.k", -5, "attribute.k"),
        ("attribute.k", "many", "attribute.k"),
        ("attribute.k", 2.5, "attribute.k"),
        ("caption.batch_size", 0, "caption.batch_size"),
        ("caption.max_new_tokens", "16", "caption.max_new_tokens"),
        ("profile", "laptop", "profile"),
        ("profiles.embedded.dtype", "float8", "profiles.embedded.dtype"),
        ("profiles.embedded.encoder_grid", 0, "profiles.embedded.encoder_grid"),
        ("projection.train.lr", -1.0, "projection.train.lr"),
        ("data.coco.subset", -1, "data.coco.subset"),
        ("filter.min_words", 11, "filter"),
        ("decode.final_norm", "yes", "decode.final_norm"),
        ("iou.quantile", 1.5, "iou.quantile"),
        ("iou.quantile", 0.0, "iou.quantile"),
        ("ablate.ks", [0, -5], "ablate.ks"),
        ("profiles.embedded.iou_categories", [], "profiles.embedded.iou_categories"),
        ("profiles.embedded.iou_categories", ["person", "dgo"], "profiles.embedded.iou_categories"),
    ],
)
def test_bad_values_name_the_key(path, value, needle):
    with pytest.raises(ParamsError) as err:
        parse_params(_with(path, value))
    assert needle in str(err.value)


def test_unknown_key_is_named():
    raw = _with("caption.temperature", 0.7)
    with pytest.raises(ParamsError, match=r"caption\.temperature: unknown key"):
        parse_params(raw)
    raw = copy.deepcopy(RAW)
    raw["atribute"] = {"k": 3}
    with pytest.raises(ParamsError, match=r"atribute: unknown key"):
        parse_params(raw)


def test_missing_section_is_named():
    raw = copy.deepcopy(RAW)
    del raw["decode"]
    with pytest.raises(ParamsError, match=r"decode: Field required"):
        parse_params(raw)


def test_file_errors(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("profile: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
