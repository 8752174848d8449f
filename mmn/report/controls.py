"""data/results/controls.json laid out for the report's tables page (stage ``plot``).

Kept apart from :mod:`mmn.controls.report` (which runs the LM): the plot stage reads only
this, so editing the controls' computation does not rerun the report.
"""

from __future__ import annotations


def controls_view(full: dict) -> dict:
    """data/results/controls.json laid out for the report's tables page: ``plant`` as one
    key/value table (None: no plant), ``cascade`` as one grid, a row per step."""
    out: dict = {}
    pl_ = full.get("plant")
    if pl_:
        u, top1, abl, iou, fp, dec = (pl_.get(k) or {}
                                      for k in ("unit", "top1", "ablation", "iou", "false_positive", "decoded"))
        out["plant"] = {
            "unit": f"L{u.get('layer')}.u{u.get('unit')} {u.get('word')!r}, strength {u.get('strength')}"
                    + (f", write mix {u['write_mix']:g} of the {u.get('gradient_of')} gradient (cosine {u.get('write_cos'):.3f})"
                       if u.get("write_mix") else ""),
            "train_auc": u.get("train_auc"),
            "concept_images": pl_.get("concept_images"), "target_images": pl_.get("target_images"),
            "top1_rate": top1.get("mean"), "top1_lo": top1.get("lo"), "top1_hi": top1.get("hi"),
            "median_rank": pl_.get("median_rank"),
            "ablation_rel_drop": abl.get("rel_drop"), "ablation_diff": abl.get("diff"),
            "ablation_diff_lo": abl.get("lo"), "ablation_diff_hi": abl.get("hi"), "ablation_p": abl.get("p"),
            "iou": iou.get("mean"), "iou_random": iou.get("random"), "iou_n": iou.get("n"), "iou_p": iou.get("p"),
            "decoded": ", ".join(t.strip() for t in dec.get("tokens", [])[:10]),
            "decodes_to_word": dec.get("has_word"), "kept_by_filter": dec.get("interpretable"),
            "false_positive_rate": fp.get("rate"), "false_positive_images": fp.get("n"),
        }
    else:
        out["plant"] = {"plant": "none (controls.plant: null)"}
    casc = full.get("cascade") or {}
    out["cascade"] = {k: {"overlap": v["overlap"]["mean"], "overlap_lo": v["overlap"]["lo"],
                          "overlap_hi": v["overlap"]["hi"], "spearman": v["spearman"]["mean"],
                          "spearman_lo": v["spearman"]["lo"], "spearman_hi": v["spearman"]["hi"],
                          "n": v["overlap"]["n"]} for k, v in casc.items()} or {"cascade": "not run (controls.cascade: [])"}
    return out
