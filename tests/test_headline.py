"""mmn/headline.py and the committed metrics/ vs summary/ split: metrics/ holds only the headline
numbers (DVC's columns), each equal to the number at its path in the full results summary/."""

from __future__ import annotations

import json

import pytest

from conftest import REPO
from mmn.headline import HEADLINE, HeadlineError, headline

MAX_LEAVES = 52  # the columns of `dvc metrics show` / `dvc exp show`, all files together (8 files: 52)


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, node


def _walk(full, path):
    """Independent of mmn.headline: follow ``path``; ``{k_small}``/``{k_large}`` by hand."""
    node = full
    for part in path.split("."):
        if node is None:
            return None
        if part in ("{k_small}", "{k_large}"):
            ks = sorted((int(k[1:]), k) for k in node if k[:1] == "k" and k[1:].isdigit())
            part = ks[0][1] if part == "{k_small}" else ks[-1][1]
        node = node[part]
    return node


def test_committed_metrics_are_few_numbers_or_null():
    files = sorted((REPO / "metrics").glob("*.json"))
    assert {f.stem for f in files} == set(HEADLINE)
    total = 0
    for f in files:
        leaves = dict(_leaves(json.loads(f.read_text())))
        for key, v in leaves.items():
            assert v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)), (f.name, key, v)
        counts = [k for k in leaves if k.rsplit(".", 1)[-1] == "n" or k.rsplit(".", 1)[-1].startswith("n_")]
        assert len(counts) == 1, (f.name, counts)  # n once per file
        total += len(leaves)
    assert total <= MAX_LEAVES, total


@pytest.mark.parametrize("name", sorted(HEADLINE))
def test_committed_headline_equals_its_path_in_summary(name):
    metrics = json.loads((REPO / "metrics" / f"{name}.json").read_text())
    full = json.loads((REPO / "summary" / f"{name}.json").read_text())
    flat = dict(_leaves(metrics))
    assert set(flat) == set(HEADLINE[name]), name
    for key, path in HEADLINE[name].items():
        assert flat[key] == _walk(full, path), (name, key, path)
    # the file is exactly what write_json makes of headline(): a rerun of the stage rewrites it byte for byte
    text = (REPO / "metrics" / f"{name}.json").read_text()
    assert text == json.dumps(headline(name, full), indent=2, sort_keys=True, allow_nan=False) + "\n"


def test_selectors_null_and_missing_paths():
    full = {"unfiltered": {"k10": {"rel_drop": {"mean": 0.1}, "vs_random_p": 0.5},
                           "k6400": {"rel_drop": {"mean": 0.9}, "vs_random_p": 0.01}},
            "filtered": {"k10": {"rel_drop": {"mean": 0.2}, "vs_random_p": 0.3},
                         "k6400": {"rel_drop": {"mean": None}, "vs_random_p": None}},
            "random": {"k10": {"rel_drop": {"mean": 0.0}}, "k6400": {"rel_drop": {"mean": 0.3}}},
            "n_images": 4}
    h = headline("ablation", full)
    assert h["k_small"]["unfiltered"] == 0.1 and h["k_large"]["unfiltered"] == 0.9  # numeric, not string, order
    assert h["k_large"]["filtered"] is None and h["n_images"] == 4
    scores = json.loads((REPO / "summary/scores.json").read_text())
    assert headline("scores", {**scores, "clipscore": None})["clipscore"] == {
        "multimodal_vs_random": None, "multimodal_vs_random_p": None}  # not computed: null, not an error
    del full["random"]["k10"]["rel_drop"]
    with pytest.raises(HeadlineError, match=r"metrics/ablation\.json: headline path 'random\.\{k_small\}\.rel_drop"
                                            r"\.mean' is missing .*'rel_drop' at random\.k10"):
        headline("ablation", full)
    with pytest.raises(HeadlineError, match=r"metrics/iou\.json: .*'overall\.multimodal\.mean'"):
        headline("iou", {"n_images": 3})
    with pytest.raises(HeadlineError, match="not a number"):
        headline("neurons", {"kept_fraction": {"mean": "x"}, "median_layer": 1, "n_images": 2})
    with pytest.raises(HeadlineError, match="no headline declared"):
        headline("nope", {})

