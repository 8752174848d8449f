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


def test_profile_switch_resolves_paper_models(tmp_path):
    """`dvc exp run -S profile=paper` writes this into params.yaml; every stage then sees the
    paper's models through ``params.model``."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_with("profile", "paper"), sort_keys=False))
    p = load_params(path)
    m = p.model
    assert m is p.profiles["paper"]
    assert m.data_source == "coco"
    assert (m.lm, m.lm_revision) == ("EleutherAI/gpt-j-6B", "float16")
    assert m.encoder == "hf:microsoft/beit-large-patch16-224-pt22k" and m.encoder_grid == 14 and m.image_size == 224
    assert m.projection == "limber" and m.limber_url.endswith("/limber_weights/beit_linear/proj.ckpt")
    assert (m.dtype, m.device) == ("float16", "auto")
    assert m.iou_categories == ["person", "cat", "dog", "horse", "giraffe", "zebra", "elephant", "bus", "train",
                                "airplane", "pizza", "teddy bear"]
    assert m.clip_pretrained == "openai" and m.bert_model == "roberta-large"


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        ("attribute.k", 0, "attribute.k"),
        ("attribute.k", -5, "attribute.k"),
        ("attribute.k", "many", "attribute.k"),
        ("attribute.k", 2.5, "attribute.k"),
        ("caption.batch_size", 0, "caption.batch_size"),
        ("caption.max_new_tokens", "16", "caption.max_new_tokens"),
        ("profile", "desktop", "profile"),
        ("profiles.embedded.dtype", "float8", "profiles.embedded.dtype"),
        ("profiles.embedded.encoder_grid", 0, "profiles.embedded.encoder_grid"),
        ("projection.train.lr", -1.0, "projection.train.lr"),
        ("data.coco.subset", -1, "data.coco.subset"),
        ("filter.min_words", 11, "filter"),
        ("decode.lens", "yes", "decode.lens"),
        ("attribute.rank_by", "patch", "attribute.rank_by"),
        ("iou.quantile", 1.5, "iou.quantile"),
        ("iou.quantile", 0.0, "iou.quantile"),
        ("ablate.ks", [0, -5], "ablate.ks"),
        ("attribute.layers", [], "attribute.layers"),
        ("attribute.layers", [0, -1], "attribute.layers"),
        ("attribute.layers", "all", "attribute.layers"),
        ("data.on_bad_image", "ignore", "data.on_bad_image"),
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


def test_layers_are_sorted_and_deduplicated():
    assert parse_params(_with("attribute.layers", [3, 1, 3])).attribute.layers == [1, 3]
    assert parse_params(_with("attribute.layers", None)).attribute.layers is None
