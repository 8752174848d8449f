"""The paper's published values (Schwettmann et al. 2023; docs/design.md), keyed by the
dotted path of the matching entry in our full results JSON, summary/*.json (``<file>.<key>.<key>...``).

Numbers are as printed in the paper (CLIPScore on its 0–100 scale, BERTScore F1 on 0–1);
entries the paper gives only as a figure or in words are strings.
"""

from __future__ import annotations

PAPER: dict[str, float | str] = {
    # Table 1: decoded multimodal neurons vs images (1000 COCO val images). The paper's BERTScores
    # are baseline-rescaled (roberta-large), its CLIPScores 100 * cos (w = 1): compare only on that scale.
    "scores.bertscore.table1.random_pairing.mean": 0.3627,
    "scores.clipscore.table1.random_pairing.mean": 21.74,
    "scores.bertscore.table1.multimodal_all.mean": 0.3848,
    "scores.clipscore.table1.multimodal_all.mean": 23.43,
    "scores.bertscore.table1.captions.mean": 0.5251,
    "scores.clipscore.table1.captions.mean": 23.62,
    "scores.bertscore.table1.coco_nouns.mean": 0.4470,   # Table 2's COCO-nouns row
    "scores.clipscore.table1.coco_nouns.mean": 27.89,
    "scores.bertscore.paired.multimodal_vs_random.p": "not reported",
    # Table 2: decoded image prompts (mean over prompts)
    "scores.clipscore.table2.random_prompts.mean": 19.22,
    "scores.bertscore.table2.random_prompts.mean": 0.3286,
    "scores.clipscore.table2.prompts.mean": 19.17,
    "scores.bertscore.table2.prompts.mean": 0.3291,
    # KS tests (Fig. 3), per image, ~1000 vs 1000
    "scores.clipscore.ks.prompts_vs_random_mean.D": 0.037,
    "scores.clipscore.ks.prompts_vs_random_mean.p": "> .5",
    "scores.clipscore.ks.prompts_vs_coco_nouns_mean.D": "> .9",
    "scores.clipscore.ks.prompts_vs_coco_nouns_mean.p": "< .001",
    # Fig. 5: IoU (given only as a figure)
    "iou.overall.multimodal.mean": "higher than random in all 12 categories (Fig. 5)",
    "iou.overall.random.mean": "lower than multimodal (Fig. 5)",
    "iou.multimodal_vs_random.diff": "> 0 in all 12 categories (Fig. 5; no test reported)",
    "iou.n_categories": 12,
    # Fig. 6: ablation
    # "decreases token probability by 80% on average": either summary of the drop may be meant
    "ablation.unfiltered.k6400.rel_drop.mean": "≈ 0.8 (p(c) down 80% on average)",
    "ablation.unfiltered.k6400.drop_of_mean": "≈ 0.8 (p(c) down 80% on average)",
    "ablation.random.k6400.rel_drop.mean": "≈ 0 (p(c) largely unaffected)",
    "ablation.random.k6400.drop_of_mean": "≈ 0 (p(c) largely unaffected)",
    # Neurons
    "neurons.kept_fraction": "≈ 0.5 (SCOWL, 7 of 10 words)",
    "neurons.modal_layer": "early-middle: layers 5–10 of 28",
}

NOTES: dict[str, str] = {
    "scores": "Table 1 / Table 2 of the paper: 1000 COCO val images, GPT-J 6B + BEiT-large + LiMBeR; "
              "CLIP ViT-B/32 (100·cos), BERTScore with roberta-large (baseline-rescaled). Ours: per row the "
              "mean over images of the per-image value (Table 1: max over all the image's top units; Table 2: "
              "mean over patches) with a 95% bootstrap CI over images; paired = permutation test over images; "
              "ks = KS test on per-image values, n = images per side. Models: data/info/score.json.",
    "iou": "Fig. 5: 12 COCO categories with single-object images, receptive fields thresholded at the "
           "0.95 quantile. Ours: per-image mean IoU of the image's multimodal units vs random units of the "
           "same layers, 95% bootstrap CIs over images and a paired test over images; per_category = images "
           "used per configured category (0 = not used; the categories used are listed under Fig. 5 and in "
           "data/info/iou.json).",
    "ablation": "Fig. 6: all COCO val images; k up to 6400 top units by g. Ours: rel_drop = mean over images "
                "of 1 - p_k/p_clean with a 95% bootstrap CI over images; drop_of_mean = 1 - mean p_k / mean "
                "p_clean; vs_random_p = paired permutation test over images against random units of the same "
                "layers (nested across k). Every k: data/ablation_curve.csv.",
    "neurons": "About half of the high-g units pass the 7-of-10 dictionary-word test in GPT-J.",
    "methods": "Not in the paper, which calls g 'a rough heuristic'. Per attribution method: Spearman / Kendall "
               "correlation of its unit score with the exact effect of ablating that unit alone (mean over "
               "images, 95% bootstrap CI), precision@k of the exact top k, area of its ablation curve; "
               "a_vs_b_spearman_p = paired permutation test over images. Definitions: "
               "data/info/compare_methods.json; all CIs and paired differences: data/compare_methods.csv.",
    "controls": "Not in the paper. plant: a multimodal neuron written into the LM (controls.plant; null = none): "
                "on the evaluated images whose references name its word, its attribution rank (top-1 rate with a "
                "95% bootstrap CI over images, median rank), the drop of p(c) when it alone is ablated (paired "
                "test over images), its IoU with the word's masks vs a random unit of its layer, whether it "
                "decodes to the word and passes the filter; false_positive = other images where it is attributed. "
                "cascade: kN = the top N MLP layers re-initialised; top-k overlap and Spearman correlation of g "
                "with the trained model's (mean over images, 95% bootstrap CI). Per image: data/controls_plant.csv, "
                "data/controls_cascade.csv.",
}


def score_scale_note(scale: dict | None, clip_computed: bool = True) -> str:
    """The scale line every score table/figure carries, from summary/scores.json's ``scale``."""
    if not scale:
        return "Scale unknown (summary/scores.json has no 'scale')."
    if not clip_computed:
        scale = {**scale, "clip_w": None}
    w = scale.get("clip_w")
    clip = (f"CLIPScore = 100·w·max(cos, 0) with w = {w:g}"
            + (" (the paper's scale)." if w == 1 else " (NOT the paper's scale, which is w = 1).")) if w else ""
    bert = ("BERTScore F1 baseline-rescaled (the paper's scale)." if scale.get("bertscore_rescaled")
            else "BERTScore F1 raw, NOT baseline-rescaled (no baseline for this model): not comparable with the "
                 "paper's values.")
    if not clip_computed:
        clip = "CLIPScore not computed (reason: data/info/score.json)."
    return f"{bert} {clip}".strip()
