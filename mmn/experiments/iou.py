"""Fig. 5 (receptive-field IoU) and category selectivity (paper supplement).

The paper (§3.2): "we select 12 COCO categories with single object annotations, and show
that across all categories, the receptive fields of multimodal neurons better segment the
object in each image than randomly sampled neurons from the same layers."

Our reading (parameters in brackets, defaults first):

* Images [``iou.single``]: ``only_object`` = images whose ONLY instance annotation is one
  object of the category; ``one_instance`` = one instance of the category, other objects
  allowed. Only images whose caption has a target (so they have multimodal units) count.
* Units: the image's own multimodal units, i.e. its top units by g from ``attribute``
  (the paper's "100 u_k with highest g" per image) [``iou.top_units``: null = all of
  them, an int keeps the first n by rank], each scored against that image's mask.
* Random baseline: ``iou.random_draws`` draws per image; draw d holds, for every layer,
  as many units as the image has multimodal units in that layer, sampled WITHOUT
  replacement from that layer's units other than the image's multimodal units.
* Receptive field of unit (l, k) on an image: A_k of layer l at the image positions,
  reshaped to the encoder grid, bilinearly upsampled to ``mask_size``², kept strictly
  above a threshold [``iou.threshold``]: ``image`` = the ``iou.quantile`` of this map
  (the paper's "threshold activations above the 0.95 percentile"), ``dataset`` =
  NetDissect's per-unit ``iou.quantile`` of the unit's raw activations over all evaluated
  images. IoU against the (equally squashed) COCO mask of the image's category.
* Statistics over IMAGES: one value per image and kind (the mean IoU over its multimodal
  units; the mean over all its random units and draws), bootstrap CIs overall and per
  category, and a paired test multimodal vs random over images
  (:func:`mmn.metrics.stats.bootstrap_ci`, :func:`mmn.metrics.stats.paired_test`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from PIL import Image
from tqdm import tqdm

from mmn.metrics.iou import (category_images, coco_mask, dataset_threshold, iou, receptive_field, threshold_at,
                             threshold_map)
from mmn.metrics.stats import bootstrap_ci, paired_test
from mmn.models.prefix_lm import ImagePrefixLM
from mmn.neurons.activations import activations_of_image

KINDS = ("multimodal", "random")
THRESHOLDS = ("image", "dataset")

PLAN_SCHEMA = {
    "image_id": pl.Int64,
    "category": pl.Utf8,
    "kind": pl.Utf8,
    "draw": pl.Int64,
    "layer": pl.Int64,
    "unit": pl.Int64,
}
IOU_SCHEMA = {**PLAN_SCHEMA, "iou": pl.Float64}
# acts: Array(Float32, P) of the raw activations at the P image positions (List when empty)
GRIDS_SCHEMA = {"image_id": pl.Int64, "layer": pl.Int64, "unit": pl.Int64, "acts": pl.List(pl.Float32)}
MEANS_SCHEMA = {"image_id": pl.Int64, "layer": pl.Int64, "unit": pl.Int64, "mean_activation": pl.Float64}
IOU_SORT = ["category", "image_id", "kind", "layer", "unit", "draw"]

Unit = tuple[int, int]  # (layer, unit)


# ----------------------------------------------------------------------------- plan


def image_units(attributions: pl.DataFrame, image_id: int, top_units: int | None = None) -> list[Unit]:
    """The image's multimodal units: its distinct (layer, unit) in rank order (best first),
    the first ``top_units`` of them (all when None)."""
    top = (attributions.filter(pl.col("image_id") == image_id).sort("rank")
           .unique(subset=["layer", "unit"], keep="first", maintain_order=True))
    if top_units is not None:
        top = top.head(top_units)
    return [(int(l), int(u)) for l, u in top.select("layer", "unit").iter_rows()]


def random_units(units: list[Unit], d_mlp: int, draws: int, rng: np.random.Generator) -> list[list[Unit]]:
    """``draws`` random counterparts of ``units`` (an image's multimodal units).

    Draw d is a list aligned with ``units``: the i-th entry is a unit of the same layer as
    ``units[i]``. Within a draw the units of a layer are sampled without replacement, and
    never one of ``units`` (so no random unit repeats within a draw or equals a multimodal
    unit of the image). Layers are visited in sorted order; deterministic given ``rng``.
    """
    by_layer: dict[int, list[int]] = {}
    for i, (layer, _) in enumerate(units):
        by_layer.setdefault(layer, []).append(i)
    taken = {layer: {u for l, u in units if l == layer} for layer in by_layer}
    out: list[list[Unit]] = []
    for _ in range(draws):
        draw: list[Unit | None] = [None] * len(units)
        for layer in sorted(by_layer):
            idx = by_layer[layer]
            pool = np.setdiff1d(np.arange(d_mlp), np.fromiter(taken[layer], dtype=np.int64))
            if pool.size < len(idx):
                raise ValueError(f"layer {layer}: {len(idx)} random units needed but only {pool.size} of "
                                 f"{d_mlp} units are not multimodal units of the image")
            for i, u in zip(idx, rng.choice(pool, size=len(idx), replace=False)):
                draw[i] = (layer, int(u))
        out.append(draw)  # type: ignore[arg-type]
    return out


def iou_images(coco, captions: pl.DataFrame, attributions: pl.DataFrame, categories: list[str],
               single: str = "only_object") -> dict[str, list[int]]:
    """``{category: sorted image ids}`` scored for Fig. 5: :func:`mmn.metrics.iou.category_images`
    (``single``) restricted to images whose caption has a target and that have attributions."""
    per_cat = category_images(coco, categories, single)
    ok = set(captions.filter(pl.col("has_noun"))["image_id"].to_list()) & set(attributions["image_id"].to_list())
    return {c: [i for i in per_cat[c] if i in ok] for c in categories}


def iou_plan(images: dict[str, list[int]], attributions: pl.DataFrame, *, top_units: int | None,
             random_draws: int, d_mlp: int, seed: int) -> pl.DataFrame:
    """Rows to score (:data:`PLAN_SCHEMA`): per (category, image) the image's multimodal
    units (``draw`` 0) and ``random_draws`` draws of :func:`random_units` (seeded by
    ``[seed, image_id]``, so the same for every category of an image and every shard)."""
    rows = []
    per_image: dict[int, tuple[list[Unit], list[list[Unit]]]] = {}
    for cat, imgs in images.items():
        for img in imgs:
            if img not in per_image:
                units = image_units(attributions, img, top_units)
                per_image[img] = (units, random_units(units, d_mlp, random_draws, np.random.default_rng([seed, img])))
            units, draws = per_image[img]
            rows += [(img, cat, "multimodal", 0, l, u) for l, u in units]
            rows += [(img, cat, "random", d, l, u) for d, draw in enumerate(draws) for l, u in draw]
    return pl.DataFrame(rows, schema=PLAN_SCHEMA, orient="row").sort(IOU_SORT)


# ----------------------------------------------------------------------------- scoring


def needed_units(plan: pl.DataFrame, threshold: str, evaluated: Sequence[int] = ()) -> dict[int, list[Unit]]:
    """Units whose activations each image must provide: its own plan units (``image``), or
    every unit of the plan on every plan image and every ``evaluated`` image (``dataset``: as in
    NetDissect, a unit's threshold is its quantile over the whole evaluated set, not only over
    the few single-object IoU images)."""
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
    if threshold == "dataset":
        allu = sorted(set(plan.select("layer", "unit").iter_rows()))
        return {int(i): allu for i in sorted(set(plan["image_id"].to_list()) | set(evaluated))}
    out: dict[int, list[Unit]] = {}
    for (img,), g in plan.group_by(["image_id"], maintain_order=True):
        out[int(img)] = sorted(set(g.select("layer", "unit").iter_rows()))
    return out


def unit_thresholds(grids: dict[tuple[int, int, int], np.ndarray], quantile: float) -> dict[Unit, float]:
    """Per unit, :func:`mmn.metrics.iou.dataset_threshold` over all images in ``grids``
    (``{(image_id, layer, unit): Float[ndarray, "P"]}``)."""
    per_unit: dict[Unit, list[np.ndarray]] = {}
    for (_, l, u), a in sorted(grids.items()):
        per_unit.setdefault((l, u), []).append(a)
    return {k: dataset_threshold(np.concatenate(v), quantile) for k, v in per_unit.items()}


def score_iou(plan: pl.DataFrame, grids: dict[tuple[int, int, int], np.ndarray],
              masks: dict[tuple[int, str], np.ndarray], *, grid: int, threshold: str = "image",
              quantile: float = 0.95) -> pl.DataFrame:
    """IoU of every plan row (:data:`IOU_SCHEMA`): the unit's receptive field on the image
    (``grids[(image_id, layer, unit)]``, ``[grid*grid]`` raw activations) upsampled to the
    mask's size and thresholded (``image``: the map's own ``quantile``; ``dataset``: the
    unit's ``quantile`` over every image of ``grids``), vs ``masks[(image_id, category)]``."""
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
    thr = unit_thresholds(grids, quantile) if threshold == "dataset" else None
    fields: dict[tuple[int, int, int, tuple[int, int]], np.ndarray] = {}
    out = []
    for img, cat, kind, draw, layer, unit in plan.iter_rows():
        mask = masks[(img, cat)]
        key = (img, layer, unit, mask.shape)
        if key not in fields:
            m = receptive_field(grids[(img, layer, unit)].reshape(grid, grid), mask.shape)
            fields[key] = threshold_at(m, thr[(layer, unit)]) if thr is not None else threshold_map(m, quantile)
        out.append((img, cat, kind, draw, layer, unit, iou(fields[key], mask)))
    return pl.DataFrame(out, schema=IOU_SCHEMA, orient="row").sort(IOU_SORT)


def grids_dict(frame: pl.DataFrame) -> dict[tuple[int, int, int], np.ndarray]:
    """:data:`GRIDS_SCHEMA` frame → ``{(image_id, layer, unit): Float[ndarray, "P"]}``."""
    if frame.height == 0:
        return {}
    acts = np.asarray(frame["acts"].to_numpy(), dtype=np.float32)  # [n, P]
    keys = frame.select("image_id", "layer", "unit").iter_rows()
    return {(int(i), int(l), int(u)): acts[j] for j, (i, l, u) in enumerate(keys)}


# ----------------------------------------------------------------------------- selectivity


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


# ----------------------------------------------------------------------------- experiment


def collect_activations(
    units: dict[int, list[Unit]], sel_units: list[Unit], sel_images: set[int],
    load_image: Callable[[int], Image.Image], plm: ImagePrefixLM, *,
    progress: bool = True, shard: tuple[int, int] = (0, 1),
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One LM forward per image of this shard: ``(grids, means)``.

    ``grids`` (:data:`GRIDS_SCHEMA`): the raw activations at the image positions
    (``[grid*grid]``) of ``units[image]``; ``means`` (:data:`MEANS_SCHEMA`): the mean
    over image positions of each of ``sel_units`` on each of ``sel_images``. Each image's
    ``[L, P, d_mlp]`` activations are dropped once used. ``shard=(rank, world)`` keeps
    every ``world``-th image.
    """
    from mmn.distributed import shard_batches

    images = sorted(set(units) | (sel_images if sel_units else set()))
    mine = [images[b[0]] for b in shard_batches(len(images), 1, shard)]
    grids: list[pl.DataFrame] = []
    means = []
    for img in tqdm(mine, desc="iou", disable=not progress):
        acts = activations_of_image(plm, load_image(img))
        if units.get(img):
            ls = torch.tensor([l for l, _ in units[img]])
            us = torch.tensor([u for _, u in units[img]])
            g = acts[ls, :, us].numpy()  # [n, P]: advanced indices around a slice come first
            grids.append(pl.DataFrame({
                "image_id": np.full(len(ls), img, dtype=np.int64), "layer": ls.numpy().astype(np.int64),
                "unit": us.numpy().astype(np.int64),
                "acts": pl.Series(g, dtype=pl.Array(pl.Float32, g.shape[1]))}))
        if img in sel_images and sel_units:
            means += [(img, l, u, float(acts[l, :, u].mean())) for l, u in sel_units]
    return (pl.concat(grids, how="vertical") if grids else pl.DataFrame(schema=GRIDS_SCHEMA),
            pl.DataFrame(means, schema=MEANS_SCHEMA, orient="row").sort(["image_id", "layer", "unit"]))


def iou_masks(coco, plan: pl.DataFrame, mask_size: int) -> dict[tuple[int, str], np.ndarray]:
    """``{(image_id, category): mask}`` (:func:`mmn.metrics.iou.coco_mask`, ``mask_size``²) for the plan."""
    name_to_id = {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}
    pairs = sorted(set(plan.select("image_id", "category").iter_rows()))
    return {(i, c): coco_mask(coco, i, name_to_id[c], (mask_size, mask_size)) for i, c in pairs}


# ----------------------------------------------------------------------------- statistics


def per_image_iou(df: pl.DataFrame, by_category: bool = False) -> pl.DataFrame:
    """One value per image (and category when ``by_category``) and kind: the mean IoU over
    the image's rows of that kind (its multimodal units; all its random units and draws).
    Overall (``by_category=False``) an image scored for several categories
    (``iou.single: one_instance``) gets the mean over its categories.
    Wide: ``[category,] image_id, multimodal, random``; images lacking a kind are dropped.
    Gotcha: rows are sorted by :data:`IOU_SORT` first and groups keep that order, so every mean
    sums in one fixed order, whatever the table's row order."""
    df = df.sort([c for c in IOU_SORT if c in df.columns])
    per = df.group_by(["category", "image_id", "kind"], maintain_order=True).agg(pl.col("iou").mean())
    key = ["category", "image_id"] if by_category else ["image_id"]
    if not by_category:
        # groups keep their first-seen order and their rows the category order of ``df``'s sort
        per = per.group_by(["image_id", "kind"], maintain_order=True).agg(pl.col("iou").mean())
    if per.height == 0:
        return pl.DataFrame(schema={**{k: PLAN_SCHEMA[k] for k in key}, "multimodal": pl.Float64,
                                    "random": pl.Float64})
    wide = per.pivot(on="kind", index=key, values="iou")
    for k in KINDS:
        if k not in wide.columns:
            wide = wide.with_columns(pl.lit(None, dtype=pl.Float64).alias(k))
    return wide.select(*key, *KINDS).drop_nulls().sort(key)


def _stats(per_image: pl.DataFrame) -> dict:
    mm, rnd = per_image["multimodal"].to_numpy(), per_image["random"].to_numpy()
    return {"multimodal": bootstrap_ci(mm), "random": bootstrap_ci(rnd), "test": paired_test(mm, rnd)}


CATEGORY_TABLE_SCHEMA = {
    "category": pl.Utf8, "n_images": pl.Int64,
    "multimodal": pl.Float64, "multimodal_lo": pl.Float64, "multimodal_hi": pl.Float64,
    "random": pl.Float64, "random_lo": pl.Float64, "random_hi": pl.Float64,
    "diff": pl.Float64, "diff_lo": pl.Float64, "diff_hi": pl.Float64, "p": pl.Float64,
}


def category_table(df: pl.DataFrame, categories: list[str]) -> pl.DataFrame:
    """Per category with images (in ``categories`` order; :data:`CATEGORY_TABLE_SCHEMA`): the
    bootstrap CI over its images of each kind's per-image IoU, and the paired test
    multimodal − random (``diff``, its CI, ``p``)."""
    per = per_image_iou(df, by_category=True)
    rows = []
    for cat in categories:
        sub = per.filter(pl.col("category") == cat)
        if sub.height == 0:
            continue
        s = _stats(sub)
        m, r, t = s["multimodal"], s["random"], s["test"]
        rows.append((cat, sub.height, m["mean"], m["lo"], m["hi"], r["mean"], r["lo"], r["hi"],
                     t["diff"], t["lo"], t["hi"], t["p"]))
    return pl.DataFrame(rows, schema=CATEGORY_TABLE_SCHEMA, orient="row")


def iou_summary(df: pl.DataFrame, categories: list[str]) -> dict:
    """summary/iou.json (numbers only; headline: metrics/iou.json, mmn/headline.py): ``overall.{multimodal,random}`` = bootstrap CI
    ``{mean, lo, hi, n}`` over images of the per-image IoU (:func:`per_image_iou`),
    ``multimodal_vs_random`` = paired test over images ``{diff, lo, hi, p, n}``,
    ``n_images``, ``n_categories`` (categories with at least one image) and
    ``per_category`` = images scored per configured category (0 = not used)."""
    per = per_image_iou(df)
    counts = {c: int(df.filter(pl.col("category") == c)["image_id"].n_unique()) for c in categories}
    out: dict = {"n_images": per.height, "n_categories": sum(n > 0 for n in counts.values()),
                 "per_category": counts}
    if per.height == 0:
        out["overall"] = {k: None for k in KINDS}
        out["multimodal_vs_random"] = None
        return out
    s = _stats(per)
    out["overall"] = {"multimodal": s["multimodal"], "random": s["random"]}
    out["multimodal_vs_random"] = s["test"]
    return out


def selectivity_table(
    plan: pl.DataFrame, images: dict[str, list[int]], means: pl.DataFrame, categories: list[str]
) -> pl.DataFrame:
    """Category selectivity (paper supplement: "Results in the Supplement show preferential
    activation on particular categories of images") from :func:`selectivity_plan` and the
    unit means of :func:`collect_activations`: each planned unit's mean activation (over
    image positions, then over each category's images).

    ``normalised`` = mean / max over categories of |mean|: a positive scale per unit, so
    the ordering of categories is that of the raw means whatever their signs (GELU means
    can be negative; dividing by the signed max inverts the order when that max is
    negative), the sign is kept and values lie in [-1, 1] with ±1 at the largest |mean|.
    None when every mean is 0 or missing."""
    m = {(i, l, u): v for i, l, u, v in means.iter_rows()}
    rows = []
    for src, layer, unit, n in plan.iter_rows():
        vals = {c: float(np.mean([m[(i, layer, unit)] for i in images[c]])) if images[c] else float("nan")
                for c in categories}
        scale = max((abs(v) for v in vals.values() if np.isfinite(v)), default=0.0)
        for c, v in vals.items():
            rows.append({"source_category": src, "layer": layer, "unit": unit, "frequency": n, "category": c,
                         "mean_activation": v, "normalised": v / scale if scale > 0 and np.isfinite(v) else None})
    schema = {"source_category": pl.Utf8, "layer": pl.Int64, "unit": pl.Int64, "frequency": pl.Int64,
              "category": pl.Utf8, "mean_activation": pl.Float64, "normalised": pl.Float64}
    return pl.DataFrame(rows, schema=schema)


def iou_info(ip, cats: list[str], used: list[str], images_per_category: dict[str, int]) -> dict:
    """Non-metric description of the iou stage's choices (``data/info/iou.json``); ``ip``: params.iou."""
    return {
        "categories_configured": list(cats),
        "categories_used": used,
        "categories_without_images": [c for c in cats if c not in used],
        "images_per_category": images_per_category,
        "single": ip.single,
        "threshold": ip.threshold,
        "threshold_rule": ("each map above its own iou.quantile" if ip.threshold == "image" else
                           "above the unit's iou.quantile of its raw activations over every evaluated image "
                           "(NetDissect), not only the IoU images"),
        "quantile": ip.quantile,
        "units": ("all of each image's top units by g" if ip.top_units is None
                  else f"each image's first {ip.top_units} top units by g"),
        "random": f"{ip.random_draws} draws per image: per layer, as many units as the image's multimodal units "
                  "there, without replacement, excluding the image's multimodal units",
        "statistics": "one value per image and kind (mean IoU over its units); 95% percentile bootstrap CI over "
                      "images; multimodal vs random: paired sign-flip permutation test over images",
        "selectivity_normalisation": "mean activation / max over categories of |mean activation| (order and "
                                     "sign kept)",
    }


# ----------------------------------------------------------------------------- the stage's three steps


@dataclass(frozen=True)
class IouPlan:
    """What the iou stage scores: Fig. 5 images per category and the selectivity plan."""

    images: dict[str, list[int]]  # category -> single-object images with a target and attributions
    selectivity: pl.DataFrame  # :func:`selectivity_plan`'s units
    selectivity_images: dict[str, list[int]]
    evaluated: list[int]  # every evaluated image (the captions table): the dataset threshold's images

    @property
    def unused(self) -> list[str]:
        return [c for c, imgs in self.images.items() if not imgs]


def plan_iou(coco, captions: pl.DataFrame, attributions: pl.DataFrame, interpretable: pl.DataFrame,
             categories: list[str], ip) -> IouPlan:
    """Step 1 (no model): the images and units to score; ``ip`` = params.iou. Raises
    ValueError when no configured category has an image."""
    images = iou_images(coco, captions, attributions, categories, ip.single)
    if not any(images.values()):
        raise ValueError(f"no single-instance image of {categories} (iou.single={ip.single}, with a caption target)")
    sel, sel_imgs = selectivity_plan(coco, attributions, interpretable, categories, ip.selectivity_units)
    return IouPlan(images, sel, sel_imgs, sorted(captions["image_id"].to_list()))


def iou_activations(plan: IouPlan, attributions: pl.DataFrame, ip, plm: ImagePrefixLM,
                    load_image: Callable[[int], Image.Image], seed: int, info) -> tuple[pl.DataFrame,
                                                                                         pl.DataFrame | None,
                                                                                         pl.DataFrame | None]:
    """Step 2 (the LM, sharded over ``info``'s ranks): ``(rows, grids, means)``, the last two
    gathered on the main rank (None elsewhere); see :func:`iou_plan`, :func:`collect_activations`."""
    from mmn.distributed import gather_frames

    rows = iou_plan(plan.images, attributions, top_units=ip.top_units, random_draws=ip.random_draws,
                    d_mlp=plm.adapter.d_mlp, seed=seed)
    sel_units = sorted(set(plan.selectivity.select("layer", "unit").iter_rows()))
    sel_images = {i for v in plan.selectivity_images.values() for i in v}
    grids, means = collect_activations(needed_units(rows, ip.threshold, plan.evaluated), sel_units, sel_images, load_image, plm,
                                       progress=info.is_main, shard=info.shard)
    return rows, gather_frames(grids, info), gather_frames(means, info)


def iou_results(plan: IouPlan, rows: pl.DataFrame, grids: pl.DataFrame, means: pl.DataFrame, coco, ip,
                categories: list[str], grid: int) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, dict, dict]:
    """Step 3 (no model): ``(iou rows, per-category table, selectivity table, metrics, info)``."""
    df = score_iou(rows, grids_dict(grids), iou_masks(coco, rows, ip.mask_size), grid=grid,
                   threshold=ip.threshold, quantile=ip.quantile)
    sel = selectivity_table(plan.selectivity, plan.selectivity_images, means.sort(["image_id", "layer", "unit"]),
                            categories)
    metrics = iou_summary(df, categories)
    metrics["selectivity_rows"] = sel.height
    per_cat = category_table(df, categories)
    info = iou_info(ip, categories, per_cat["category"].to_list(), {c: len(plan.images[c]) for c in categories})
    return df, per_cat, sel, metrics, info
