"""What a control run reports about its planted unit (stage ``controls``).

Images are split by ground truth, not by what the planted LM says: *concept images* are the
evaluated images whose reference captions name the word (:func:`mmn.controls.plant.split_by_concept`),
*other images* the rest. On the concept images whose caption target c IS the word's token:

* the planted unit's rank among the attributed units by the attribute stage's score
  (``attribute.aggregate`` over the image positions; 1 = top): top-1 rate (CI over images)
  and median rank;
* its exact effect: p(c) with the unit alone zeroed at the image positions vs clean, a
  paired test over those images;
* its receptive field's IoU with the concept's COCO masks (when the word is a COCO category)
  against a random unit of the same layer on the same image (paired).

Once per unit: whether its decoded top tokens contain the word and whether the filter keeps
it. On the other images with a target: the false-positive rate, the share where it is among
the image's attributed units (data/attributions.parquet).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import polars as pl
import torch
from PIL import Image

from mmn.controls.plant import split_by_concept
from mmn.models.planted import Plant
from mmn.models.prefix_lm import ImagePrefixLM
from mmn.neurons.ablation import single_unit_effects
from mmn.neurons.attribution import attribution_maps
from mmn.neurons.scoring import Aggregate, unit_scores

PLANT_IMAGE_SCHEMA = {"image_id": pl.Int64, "rank": pl.Int64, "score": pl.Float64, "p_clean": pl.Float64,
                      "p_ablated": pl.Float64, "iou": pl.Float64, "iou_random": pl.Float64}


def unit_rank(scores: torch.Tensor, allowed: torch.Tensor, layer: int, unit: int) -> int:
    """1 + the number of allowed units scoring strictly higher than (layer, unit)
    (``scores``, ``allowed``: ``[layers, d_mlp]``); ties rank the unit first."""
    s = scores[layer, unit]
    return 1 + int(((scores > s) & allowed).sum())


def plant_images(plm: ImagePrefixLM, plant: Plant, captions: pl.DataFrame, concept_ids: Sequence[int],
                 load_image: Callable[[int], Image.Image], allowed: torch.Tensor, *, aggregate: Aggregate,
                 preactivation: bool, masks: dict[int, np.ndarray] | None = None, quantile: float = 0.95,
                 seed: int = 0) -> pl.DataFrame:
    """One row per concept image whose target is the plant's token (schema :data:`PLANT_IMAGE_SCHEMA`).
    ``masks``: image id -> the concept's mask (224×224 bool) for the IoU columns (null without)."""
    from mmn.metrics.iou import iou, receptive_field, threshold_map
    from mmn.neurons.activations import image_activations

    rows = []
    recs = captions.filter(pl.col("has_noun"), pl.col("image_id").is_in(list(concept_ids)),
                           pl.col("target_token_id") == plant.token_id).sort("image_id")
    for r in recs.iter_rows(named=True):
        soft = plm.image_soft_tokens([load_image(r["image_id"])])
        text, target = list(r["caption_token_ids"][: r["target_pos"]]), int(r["target_token_id"])
        _, a, g = attribution_maps(plm, soft, [text], [target], preactivation=preactivation)
        scores = unit_scores(a[0], g[0], aggregate)
        eff = single_unit_effects(plm, soft, text, target, [(plant.layer, plant.unit)])
        row = {"image_id": r["image_id"], "rank": unit_rank(scores, allowed, plant.layer, plant.unit),
               "score": float(scores[plant.layer, plant.unit]), "p_clean": eff["p_clean"],
               "p_ablated": eff["p_clean"] - float(eff["dp"][0]), "iou": None, "iou_random": None}
        if masks and r["image_id"] in masks:
            acts = image_activations(plm, soft)[plant.layer]  # [P, d_mlp]
            other = [u for u in range(acts.shape[1]) if u != plant.unit]
            rnd = int(np.random.default_rng([seed, int(r["image_id"])]).choice(other))
            m = masks[r["image_id"]]
            row["iou"] = iou(threshold_map(receptive_field(acts[:, plant.unit], size=m.shape), quantile), m)
            row["iou_random"] = iou(threshold_map(receptive_field(acts[:, rnd], size=m.shape), quantile), m)
        rows.append(row)
    return pl.DataFrame(rows, schema=PLANT_IMAGE_SCHEMA)


def false_positive_rate(attributions: pl.DataFrame, captions: pl.DataFrame, other_ids: Sequence[int],
                        plant: Plant) -> dict:
    """Share of the other images (with a target) where the planted unit is attributed; ``{"rate", "n", "hits"}``."""
    ids = set(captions.filter(pl.col("has_noun"), pl.col("image_id").is_in(list(other_ids)))["image_id"].to_list())
    hit = set(attributions.filter(pl.col("layer") == plant.layer, pl.col("unit") == plant.unit,
                                  pl.col("image_id").is_in(list(ids)))["image_id"].to_list())
    return {"rate": len(hit) / len(ids) if ids else None, "n": len(ids), "hits": len(hit)}


def plant_summary(per: pl.DataFrame, decoded: dict, fp: dict, n_concept: int, seed: int = 0) -> dict:
    """Full results of a control run's plant (data/results/controls.json's ``plant``)."""
    from mmn.metrics.stats import bootstrap_ci, paired_test

    out: dict = {"concept_images": n_concept, "target_images": per.height, "decoded": decoded,
                 "false_positive": fp}
    if per.height == 0:
        return out | {"top1": None, "median_rank": None, "ablation": None, "iou": None}
    out["top1"] = bootstrap_ci((per["rank"] == 1).cast(pl.Float64).to_numpy(), seed=seed)
    out["median_rank"] = float(np.median(per["rank"].to_numpy()))
    out["ablation"] = paired_test(per["p_clean"].to_numpy(), per["p_ablated"].to_numpy(), seed=seed)
    out["ablation"]["rel_drop"] = float(1 - per["p_ablated"].mean() / per["p_clean"].mean())
    io = per.drop_nulls(["iou", "iou_random"])
    out["iou"] = (paired_test(io["iou"].to_numpy(), io["iou_random"].to_numpy(), seed=seed)
                  | {"mean": float(io["iou"].mean()), "random": float(io["iou_random"].mean())}) if io.height else None
    return out


def decoded_plant(adapter, tokenizer, plant: Plant, words: frozenset[str], decode_params, filter_params) -> dict:
    """The planted unit decoded as the decode stage does, and the filter's decision on it."""
    from mmn.neurons.decode import decode_units
    from mmn.neurons.filter import apply_filter

    df = decode_units(adapter, tokenizer, pl.DataFrame({"layer": [plant.layer], "unit": [plant.unit]}),
                      top_n=decode_params.top_n, lens=decode_params.lens)
    df = apply_filter(df, words, min_words=filter_params.min_words, top_n=filter_params.top_n,
                      min_letters=filter_params.min_letters)
    toks = [t.strip().lower() for t in df["tokens"][0]]
    return {"tokens": df["tokens"][0].to_list(), "has_word": plant.word in toks[:10],
            "interpretable": bool(df["interpretable"][0])}
