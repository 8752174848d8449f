"""Fig. 5 (receptive-field IoU) and category selectivity (paper supplement).

Receptive field of unit (l, k) on an image: A_k of layer l at the image positions,
reshaped to the encoder grid, bilinearly upsampled to ``mask_size``², thresholded at
its per-image ``quantile``; IoU against the (equally squashed) COCO mask of the
image's category. Images: those where the category has exactly one instance and
whose caption has a target. Random baseline: units drawn from the same layer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import polars as pl
import torch
from PIL import Image
from tqdm import tqdm

from mmn.hooks import TraceDict
from mmn.metrics.iou import coco_mask, iou, receptive_field, single_instance_images, threshold_map
from mmn.models.prefix_lm import ImagePrefixLM
from mmn.models.vision import PatchEncoder

IOU_SCHEMA = {
    "image_id": pl.Int64,
    "category": pl.Utf8,
    "kind": pl.Utf8,
    "draw": pl.Int64,
    "layer": pl.Int64,
    "unit": pl.Int64,
    "iou": pl.Float64,
}


@torch.no_grad()
def image_activations(plm: ImagePrefixLM, soft: torch.Tensor) -> torch.Tensor:
    """A of every unit of every layer at the image positions: ``Float[Tensor, "layers P d_mlp"]``."""
    ad = plm.adapter
    batch = plm.build(soft)
    with TraceDict(ad.act_modules(), retain_input=True, detach=True) as tr:
        plm.logits(batch)
    sl = batch.image_slice
    return torch.stack([tr[str(l)].input[0, sl].float().cpu() for l in range(ad.n_layers)])


def iou_table(
    coco, captions: pl.DataFrame, attributions: pl.DataFrame, load_image: Callable[[int], Image.Image],
    plm: ImagePrefixLM, enc: PatchEncoder, categories: list[str], *, top_units: int, random_draws: int,
    quantile: float, mask_size: int, seed: int, progress: bool = True,
) -> tuple[pl.DataFrame, dict[int, torch.Tensor]]:
    """Rows per (image, unit, kind, draw); also returns the activations computed, by image id."""
    per_cat = single_instance_images(coco, categories)
    with_target = set(captions.filter(pl.col("has_noun"))["image_id"].to_list())
    name_to_id = {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}
    grid = enc.grid
    acts_cache: dict[int, torch.Tensor] = {}
    rows = []
    jobs = [(cat, img) for cat in categories for img in per_cat[cat] if img in with_target]
    for cat, img in tqdm(jobs, desc="iou", disable=not progress):
        if img not in acts_cache:
            with torch.no_grad():
                acts_cache[img] = image_activations(plm, plm.soft_tokens(enc.encode([load_image(img)])))
        acts = acts_cache[img]
        mask = coco_mask(coco, img, name_to_id[cat], (mask_size, mask_size))
        units = (attributions.filter(pl.col("image_id") == img).sort("rank")
                 .unique(subset=["layer", "unit"], keep="first", maintain_order=True).head(top_units))
        rng = np.random.default_rng([seed, img])
        for layer, unit in units.select("layer", "unit").iter_rows():
            rf = threshold_map(receptive_field(acts[layer, :, unit].reshape(grid, grid), (mask_size, mask_size)),
                               quantile)
            rows.append({"image_id": img, "category": cat, "kind": "multimodal", "draw": 0, "layer": layer,
                         "unit": unit, "iou": iou(rf, mask)})
            for d, ru in enumerate(rng.choice(acts.shape[2], size=random_draws, replace=False)):
                rf = threshold_map(receptive_field(acts[layer, :, int(ru)].reshape(grid, grid),
                                                   (mask_size, mask_size)), quantile)
                rows.append({"image_id": img, "category": cat, "kind": "random", "draw": d, "layer": layer,
                             "unit": int(ru), "iou": iou(rf, mask)})
    return pl.DataFrame(rows, schema=IOU_SCHEMA).sort(["category", "image_id", "kind", "layer", "unit", "draw"]), \
        acts_cache


def iou_summary(df: pl.DataFrame, categories: list[str]) -> dict:
    out: dict = {"per_category": {}, "overall": {}}
    for kind in ("multimodal", "random"):
        sub = df.filter(pl.col("kind") == kind)
        out["overall"][kind] = round(float(sub["iou"].mean()), 6) if sub.height else None
    for cat in categories:
        sub = df.filter(pl.col("category") == cat)
        entry = {"n_images": int(sub["image_id"].n_unique())}
        for kind in ("multimodal", "random"):
            k = sub.filter(pl.col("kind") == kind)
            entry[kind] = round(float(k["iou"].mean()), 6) if k.height else None
            entry[f"{kind}_std"] = round(float(k["iou"].std()), 6) if k.height > 1 else None
        out["per_category"][cat] = entry
    return out


def selectivity_table(
    coco, attributions: pl.DataFrame, interpretable: pl.DataFrame, categories: list[str],
    activations: Callable[[int], torch.Tensor], n_units: int,
) -> pl.DataFrame:
    """Most frequent interpretable units per category (over images containing it), their
    mean activation (over image positions, then images) on each category's images,
    normalised by the max over categories."""
    name_to_id = {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}
    imgs = {c: sorted(set(coco.getImgIds(catIds=[name_to_id[c]])) & set(attributions["image_id"].to_list()))
            for c in categories}
    ok = interpretable.filter(pl.col("interpretable")).select("layer", "unit")
    rows = []
    for src in categories:
        freq = (attributions.filter(pl.col("image_id").is_in(imgs[src])).join(ok, on=["layer", "unit"])
                .group_by(["layer", "unit"]).agg(pl.col("image_id").n_unique().alias("n"))
                .sort(["n", "layer", "unit"], descending=[True, False, False]).head(n_units))
        for layer, unit, n in freq.iter_rows():
            means = {c: float(np.mean([float(activations(i)[layer, :, unit].mean()) for i in imgs[c]]))
                     if imgs[c] else float("nan") for c in categories}
            top = max((v for v in means.values() if np.isfinite(v)), default=float("nan"))
            for c, v in means.items():
                rows.append({"source_category": src, "layer": layer, "unit": unit, "frequency": n, "category": c,
                             "mean_activation": v, "normalised": v / top if top and np.isfinite(top) else None})
    schema = {"source_category": pl.Utf8, "layer": pl.Int64, "unit": pl.Int64, "frequency": pl.Int64,
              "category": pl.Utf8, "mean_activation": pl.Float64, "normalised": pl.Float64}
    return pl.DataFrame(rows, schema=schema)
