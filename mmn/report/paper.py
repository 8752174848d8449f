"""The paper's published values (Schwettmann et al. 2023; DESIGN.md §1), keyed by the
dotted path of the matching entry in our metrics JSON (``<file>.<key>.<key>...``).

Numbers are as printed in the paper (CLIPScore on its 0–100 scale, BERTScore F1 on 0–1);
entries the paper gives only as a figure or in words are strings.
"""

from __future__ import annotations

PAPER: dict[str, float | str] = {
    # Table 1: decoded multimodal neurons vs images (1000 COCO val images)
    "scores.table1.random_pairing.bertscore": 0.3627,
    "scores.table1.random_pairing.clipscore": 21.74,
    "scores.table1.multimodal_all.bertscore": 0.3848,
    "scores.table1.multimodal_all.clipscore": 23.43,
    "scores.table1.captions.bertscore": 0.5251,
    "scores.table1.captions.clipscore": 23.62,
    # Table 2: decoded image prompts
    "scores.table2.random_prompts.clipscore": 19.22,
    "scores.table2.random_prompts.bertscore": 0.3286,
    "scores.table2.prompts.clipscore": 19.17,
    "scores.table2.prompts.bertscore": 0.3291,
    "scores.table2.captions.clipscore": 23.62,
    "scores.table2.captions.bertscore": 0.5251,
    "scores.table2.coco_nouns.clipscore": 27.89,
    "scores.table2.coco_nouns.bertscore": 0.4470,
    # KS tests (Fig. 3)
    "scores.ks.prompts_vs_random_clipscore.D": 0.037,
    "scores.ks.prompts_vs_random_clipscore.p": "> .5",
    "scores.ks.prompts_vs_coco_nouns_clipscore.D": "> .9",
    "scores.ks.prompts_vs_coco_nouns_clipscore.p": "< .001",
    # Fig. 5: IoU (given only as a figure)
    "iou.overall.multimodal": "higher than random in all 12 categories (Fig. 5)",
    "iou.overall.random": "lower than multimodal (Fig. 5)",
    # Fig. 6: ablation
    "ablation.unfiltered.k6400.rel_drop": "≈ 0.8 (p(c) down 80% on average)",
    "ablation.random.k6400.rel_drop": "≈ 0 (p(c) largely unaffected)",
    # Neurons
    "neurons.kept_fraction": "≈ 0.5 (SCOWL, 7 of 10 words)",
    "neurons.modal_layer": "early-middle: layers 5–10 of 28",
}

NOTES: dict[str, str] = {
    "scores": "Table 1 / Table 2 of the paper: 1000 COCO val images, GPT-J 6B + BEiT-large + LiMBeR; "
              "CLIP ViT-B/32, BERTScore with roberta-large.",
    "iou": "Fig. 5: 12 COCO categories with single-object images, receptive fields thresholded at the "
           "0.95 quantile.",
    "ablation": "Fig. 6: all COCO val images; k up to 6400 top units by g.",
    "neurons": "About half of the high-g units pass the 7-of-10 dictionary-word test in GPT-J.",
}
