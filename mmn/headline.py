"""Which numbers go to ``metrics/`` (what ``dvc metrics show`` / ``dvc exp show`` print as columns).

Each stage that reports numbers computes one full nested dict (means with their CI bounds and
``n``, per-k and per-category detail, every p-value). The full dict goes to
``data/results/<name>.json`` (DVC-cached; the ``summary`` stage copies it to git-tracked
``summary/<name>.json``, which the docs and scripts/compare_runs.py read);
``metrics/<name>.json`` holds only the headline numbers selected here, one column each:
means, differences, p-values and one ``n`` per file.

:data:`HEADLINE` is the one declaration: for each metrics file, headline key -> dotted path in
the full dict. A dotted headline key (``table1.multimodal_all``) becomes a nested key, which
DVC shows as the column ``table1.multimodal_all``. Path rules:

* a missing key raises :class:`HeadlineError` naming the file and the path;
* a null met on the way (``clipscore`` when CLIPScore was not computed) gives null;
* the segment ``{k_large}`` / ``{k_small}`` picks the sibling key ``k<int>`` with the largest /
  smallest int (the ablation's headline ks: 100, when run, and the largest of ``ablate.ks``),
  so the columns stay the same whatever ``ablate.ks`` is.
"""

from __future__ import annotations

import re
from pathlib import Path

from mmn.errors import DataError

HEADLINE: dict[str, dict[str, str]] = {
    "projection": {
        "initial_val_loss": "initial_val_loss",
        "best_val_loss": "best_val_loss",
        "held_out": "held_out",
        "n_train_images": "n_train_images",
    },
    "captions": {
        "bertscore_own": "bertscore_own.mean",
        "bertscore_shuffled": "bertscore_shuffled.mean",
        "own_vs_shuffled": "own_vs_shuffled.diff",
        "own_vs_shuffled_p": "own_vs_shuffled.p",
        "noun_in_refs": "noun_in_refs.mean",
        "n_images": "n_images",
    },
    "neurons": {
        "kept_fraction": "kept_fraction.mean",
        "median_layer": "median_layer",
        "n_images": "n_images",
    },
    "scores": {
        "table1.multimodal_all": "bertscore.table1.multimodal_all.mean",
        "table1.random_pairing": "bertscore.table1.random_pairing.mean",
        "table1.multimodal_vs_random": "bertscore.paired.multimodal_vs_random.diff",
        "table1.multimodal_vs_random_p": "bertscore.paired.multimodal_vs_random.p",
        "table2.prompts": "bertscore.table2.prompts.mean",
        "table2.random_prompts": "bertscore.table2.random_prompts.mean",
        "table2.ks_D": "bertscore.ks.prompts_vs_random_mean.D",
        "table2.ks_p": "bertscore.ks.prompts_vs_random_mean.p",
        "clipscore.multimodal_vs_random": "clipscore.paired.multimodal_vs_random.diff",
        "clipscore.multimodal_vs_random_p": "clipscore.paired.multimodal_vs_random.p",
        "n_images": "bertscore.table2.prompts.n",
    },
    "iou": {
        "multimodal": "overall.multimodal.mean",
        "random": "overall.random.mean",
        "multimodal_vs_random": "multimodal_vs_random.diff",
        "multimodal_vs_random_p": "multimodal_vs_random.p",
        "n_images": "n_images",
    },
    "ablation": {
        "k_small.unfiltered": "unfiltered.{k_small}.rel_drop.mean",
        "k_small.filtered": "filtered.{k_small}.rel_drop.mean",
        "k_small.random": "random.{k_small}.rel_drop.mean",
        "k_small.unfiltered_vs_random_p": "unfiltered.{k_small}.vs_random_p",
        "k_small.filtered_vs_random_p": "filtered.{k_small}.vs_random_p",
        "k_large.unfiltered": "unfiltered.{k_large}.rel_drop.mean",
        "k_large.filtered": "filtered.{k_large}.rel_drop.mean",
        "k_large.random": "random.{k_large}.rel_drop.mean",
        "k_large.unfiltered_vs_random_p": "unfiltered.{k_large}.vs_random_p",
        "k_large.filtered_vs_random_p": "filtered.{k_large}.vs_random_p",
        "n_images": "n_images",
    },
    "controls": {
        # median rank, the ablation's size, every cascade step: summary/controls.json
        "plant.top1": "plant.top1.mean",
        "plant.ablation_p": "plant.ablation.p",
        "plant.false_positive": "plant.false_positive.rate",
        "cascade.last.overlap": "cascade.{k_large}.overlap.mean",
        "cascade.last.spearman": "cascade.{k_large}.spearman.mean",
        "n_images": "n_images",
    },
    "methods": {
        "spearman.grad_x_act": "grad_x_act.spearman.mean",
        "spearman.direct_logit": "direct_logit.spearman.mean",
        "spearman.integrated_gradients": "integrated_gradients.spearman.mean",
        "grad_x_act_vs_direct_logit_p": "grad_x_act_vs_direct_logit_spearman_p",
        "grad_x_act_vs_integrated_gradients_p": "grad_x_act_vs_integrated_gradients_spearman_p",
        "n_images": "n_images",
    },
}

_K = re.compile(r"k(\d+)")
_SELECT = {"{k_large}": max, "{k_small}": min}


class HeadlineError(DataError):
    """A headline path that the full dict lacks (names the metrics file and the path)."""


def lookup(name: str, full: object, path: str) -> object:
    """The value at dotted ``path`` of ``full`` (rules: module docstring)."""
    node, done = full, []
    for part in path.split("."):
        if node is None:
            return None
        where = ".".join(done) or "the top level"
        if not isinstance(node, dict):
            raise HeadlineError(f"metrics/{name}.json: headline path {path!r}: {where} is not an object")
        if part in _SELECT:
            ks = [k for k in node if _K.fullmatch(k)]
            if not ks:
                raise HeadlineError(f"metrics/{name}.json: headline path {path!r}: no k<int> key at {where}")
            part = _SELECT[part](ks, key=lambda k: int(k[1:]))
        if part not in node:
            raise HeadlineError(f"metrics/{name}.json: headline path {path!r} is missing in the full "
                                f"results (no {part!r} at {where})")
        node = node[part]
        done.append(part)
    if node is not None and (isinstance(node, bool) or not isinstance(node, (int, float))):
        raise HeadlineError(f"metrics/{name}.json: headline path {path!r} is not a number or null: {node!r}")
    return node


def headline(name: str, full: dict) -> dict:
    """``metrics/<name>.json``: the :data:`HEADLINE` numbers of ``full`` (dotted keys nested)."""
    if name not in HEADLINE:
        raise HeadlineError(f"metrics/{name}.json: no headline declared in mmn/headline.py (known: "
                            f"{', '.join(sorted(HEADLINE))})")
    out: dict = {}
    for key, path in HEADLINE[name].items():
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = lookup(name, full, path)
    return out

