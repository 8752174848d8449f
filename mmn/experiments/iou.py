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


def _iou_rows(acts: torch.Tensor, img: int, cat: str, mask: np.ndarray, units: list[tuple[int, int]], *,
              grid: int, random_draws: int, quantile: float, mask_size: int, seed: int) -> list[dict]:
    """IoU rows of one image and category: its top units, each with ``random_draws``
    random units of the same layer (seeded by image)."""
    rng = np.random.default_rng([seed, img])
    size = (mask_size, mask_size)

    def field(layer: int, unit: int) -> np.ndarray:
        return threshold_map(receptive_field(acts[layer, :, unit].reshape(grid, grid), size), quantile)

    rows = []
    for layer, unit in units:
        rows.append({"image_id": img, "category": cat, "kind": "multimodal", "draw": 0, "layer": layer,
                     "unit": unit, "iou": iou(field(layer, unit), mask)})
        for d, ru in enumerate(rng.choice(acts.shape[2], size=random_draws, replace=False)):
            rows.append({"image_id": img, "category": cat, "kind": "random", "draw": d, "layer": layer,
                         "unit": int(ru), "iou": iou(field(layer, int(ru)), mask)})
    return rows


def selectivity_plan(
    coco, attributions: pl.DataFrame, interpretable: pl.DataFrame, categories: list[str], n_units: int
) -> tuple[pl.DataFrame, dict[str, list[int]]]:
    """The units of the selectivity table and the images to average over.

    Returns ``(plan, images)``: ``plan`` has (source_category, layer, unit, frequency), the
    ``n_units`` interpretable units most often in the top-k of images containing the
    source category; ``images[c]`` = attributed images containing category c.
    """
    name_to_id = {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}
    attributed = set(attributions["image_id"].to_list())
    imgs = {c: sorted(set(coco.getImgIds(catIds=[name_to_id[c]])) & attributed) for c in categories}
    ok = interpretable.filter(pl.col("interpretable")).select("layer", "unit")
    parts = []
    for src in categories:
        freq = (attributions.filter(pl.col("image_id").is_in(imgs[src])).join(ok, on=["layer", "unit"])
                .group_by(["layer", "unit"]).agg(pl.col("image_id").n_unique().alias("frequency"))
                .sort(["frequency", "layer", "unit"], descending=[True, False, False]).head(n_units))
        parts.append(freq.select(pl.lit(src).alias("source_category"), "layer", "unit",
                                 pl.col("frequency").cast(pl.Int64)))
    schema = {"source_category": pl.Utf8, "layer": pl.Int64, "unit": pl.Int64, "frequency": pl.Int64}
    plan = pl.concat(parts, how="vertical") if parts else pl.DataFrame(schema=schema)
    return plan, imgs


MEANS_SCHEMA = {"image_id": pl.Int64, "layer": pl.Int64, "unit": pl.Int64, "mean_activation": pl.Float64}


def iou_experiment(
    coco, captions: pl.DataFrame, attributions: pl.DataFrame, plan: pl.DataFrame, plan_images: dict[str, list[int]],
    load_image: Callable[[int], Image.Image], plm: ImagePrefixLM, enc: PatchEncoder, categories: list[str], *,
    top_units: int, random_draws: int, quantile: float, mask_size: int, seed: int,
    progress: bool = True, shard: tuple[int, int] = (0, 1),
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(iou rows, unit means)`` for this shard's images, one LM forward per image.

    IoU rows (:data:`IOU_SCHEMA`) per (image, category, unit, kind, draw) for the
    single-instance images with a target; unit means (:data:`MEANS_SCHEMA`): the mean
    activation over image positions of every unit of ``plan`` on every image of
    ``plan_images`` (both from :func:`selectivity_plan`). Each image's activations
    (``[L, P, d_mlp]``) are dropped once used, so memory is flat in the image count.
    ``shard=(rank, world)`` keeps every ``world``-th image.
    """
    from mmn.distributed import shard_batches

    per_cat = single_instance_images(coco, categories)
    with_target = set(captions.filter(pl.col("has_noun"))["image_id"].to_list())
    name_to_id = {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}
    iou_cats: dict[int, list[str]] = {}
    for cat in categories:
        for img in per_cat[cat]:
            if img in with_target:
                iou_cats.setdefault(img, []).append(cat)
    sel_units = sorted(set(plan.select("layer", "unit").iter_rows()))
    sel_set = {i for v in plan_images.values() for i in v}
    images = sorted(set(iou_cats) | (sel_set if sel_units else set()))
    mine = [images[b[0]] for b in shard_batches(len(images), 1, shard)]
    rows, means = [], []
    for img in tqdm(mine, desc="iou", disable=not progress):
        with torch.no_grad():
            acts = image_activations(plm, plm.soft_tokens(enc.encode([load_image(img)])))
        if img in iou_cats:
            top = (attributions.filter(pl.col("image_id") == img).sort("rank")
                   .unique(subset=["layer", "unit"], keep="first", maintain_order=True).head(top_units))
            units = list(top.select("layer", "unit").iter_rows())
            for cat in iou_cats[img]:
                mask = coco_mask(coco, img, name_to_id[cat], (mask_size, mask_size))
                rows += _iou_rows(acts, img, cat, mask, units, grid=enc.grid, random_draws=random_draws,
                                  quantile=quantile, mask_size=mask_size, seed=seed)
        if img in sel_set:
            means += [{"image_id": img, "layer": l, "unit": u, "mean_activation": float(acts[l, :, u].mean())}
                      for l, u in sel_units]
    iou_df = pl.DataFrame(rows, schema=IOU_SCHEMA).sort(["category", "image_id", "kind", "layer", "unit", "draw"])
    return iou_df, pl.DataFrame(means, schema=MEANS_SCHEMA).sort(["image_id", "layer", "unit"])


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
    plan: pl.DataFrame, images: dict[str, list[int]], means: pl.DataFrame, categories: list[str]
) -> pl.DataFrame:
    """Category selectivity (paper supplement) from :func:`selectivity_plan` and the unit
    means of :func:`iou_experiment`: each planned unit's mean activation (over image
    positions, then over each category's images), normalised by its max over categories."""
    m = {(i, l, u): v for i, l, u, v in means.iter_rows()}
    rows = []
    for src, layer, unit, n in plan.iter_rows():
        vals = {c: float(np.mean([m[(i, layer, unit)] for i in images[c]])) if images[c] else float("nan")
                for c in categories}
        top = max((v for v in vals.values() if np.isfinite(v)), default=float("nan"))
        for c, v in vals.items():
            rows.append({"source_category": src, "layer": layer, "unit": unit, "frequency": n, "category": c,
                         "mean_activation": v, "normalised": v / top if top and np.isfinite(top) else None})
    schema = {"source_category": pl.Utf8, "layer": pl.Int64, "unit": pl.Int64, "frequency": pl.Int64,
              "category": pl.Utf8, "mean_activation": pl.Float64, "normalised": pl.Float64}
    return pl.DataFrame(rows, schema=schema)
