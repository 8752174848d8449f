"""Stage iou: receptive fields of multimodal units vs COCO masks (Fig. 5) and
category selectivity (supplement).

Writes data/iou.parquet (per category, image, kind, draw, unit), data/iou_categories.csv
(per category: bootstrap CIs over images and the paired test multimodal vs random),
data/selectivity.parquet, metrics/iou.json (numbers only: overall CIs, paired test,
image and category counts) and data/info/iou.json (categories used, definitions).
"""

from __future__ import annotations

from pathlib import Path

import click

from mmn.cli import StageError, log, stage_main
from mmn.io import atomic_file, read_parquet, write_json, write_parquet
from mmn.params import load_params

NAME = "iou"


@click.command(help=__doc__)
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path())
@click.option("--coco", "coco_dir", default="data/coco", show_default=True, type=click.Path())
@click.option("--projection", "proj_dir", default="data/projection", show_default=True, type=click.Path())
@click.option("--captions", default="data/captions.parquet", show_default=True, type=click.Path())
@click.option("--attributions", default="data/attributions.parquet", show_default=True, type=click.Path())
@click.option("--neurons", default="data/interpretable.parquet", show_default=True, type=click.Path())
@click.option("--out", default="data/iou.parquet", show_default=True, type=click.Path())
@click.option("--categories-out", default="data/iou_categories.csv", show_default=True, type=click.Path())
@click.option("--selectivity-out", default="data/selectivity.parquet", show_default=True, type=click.Path())
@click.option("--metrics", "metrics_out", default="metrics/iou.json", show_default=True, type=click.Path())
@click.option("--info", "info_out", default="data/info/iou.json", show_default=True, type=click.Path())
@stage_main(NAME)
def main(params_path, coco_dir, proj_dir, captions, attributions, neurons, out, categories_out, selectivity_out,
         metrics_out, info_out) -> None:
    from pycocotools.coco import COCO

    from mmn.data.layout import CocoLayout
    from mmn.distributed import distributed, gather_frames
    from mmn.experiments.iou import (category_table, collect_activations, grids_dict, iou_images, iou_masks,
                                     iou_info, iou_plan, iou_summary, needed_units, score_iou, selectivity_plan,
                                     selectivity_table)
    from mmn.pipeline import build_prefix_lm, seed_everything
    from mmn.quality import check_iou

    params = load_params(params_path)
    seed_everything(params.seed)
    ip, cats = params.iou, params.model.iou_categories
    layout = CocoLayout(Path(coco_dir))
    coco = COCO(str(layout.instances_path))
    caps, att = read_parquet(captions), read_parquet(attributions)
    where = f"{params_path}: profiles.{params.profile}.iou_categories"
    try:
        images = iou_images(coco, caps, att, cats, ip.single)
    except ValueError as err:
        raise StageError(f"{where}: {err}") from None
    unused = [c for c in cats if not images[c]]
    if len(unused) == len(cats):
        raise StageError(f"{where}: no single-instance image of {cats} (iou.single={ip.single}, with a caption "
                         f"target) in {layout.instances_path}")
    plan, plan_imgs = selectivity_plan(coco, att, read_parquet(neurons), cats, ip.selectivity_units)
    with distributed() as info:
        plm = build_prefix_lm(params, Path(proj_dir))
        rows = iou_plan(images, att, top_units=ip.top_units, random_draws=ip.random_draws,
                        d_mlp=plm.adapter.d_mlp, seed=params.seed)
        sel_units = sorted(set(plan.select("layer", "unit").iter_rows()))
        sel_images = {i for v in plan_imgs.values() for i in v}
        part, part_means = collect_activations(
            needed_units(rows, ip.threshold), sel_units, sel_images, layout.load_image, plm,
            progress=info.is_main, shard=info.shard)
        grids, means = gather_frames(part, info), gather_frames(part_means, info)
    if not info.is_main:
        return
    if info.world > 1:
        log(NAME, f"merged {info.world} shards")
    if unused:
        log(NAME, f"no image for {unused} (iou.single={ip.single}, with a caption target): not used")
    df = score_iou(rows, grids_dict(grids), iou_masks(coco, rows, ip.mask_size), grid=plm.encoder.grid,
                   threshold=ip.threshold, quantile=ip.quantile)
    means = means.sort(["image_id", "layer", "unit"])
    sel = selectivity_table(plan, plan_imgs, means, cats)
    check_iou(df)
    metrics = iou_summary(df, cats)
    metrics["selectivity_rows"] = sel.height
    per_cat = category_table(df, cats)
    used = per_cat["category"].to_list()
    write_parquet(df, out)
    with atomic_file(categories_out) as tmp:
        per_cat.write_csv(tmp, float_precision=6)
    write_parquet(sel, selectivity_out)
    write_json(metrics, metrics_out)
    write_json(iou_info(ip, cats, used, {c: len(images[c]) for c in cats}), info_out)
    o = metrics["overall"]
    log(NAME, f"IoU multimodal {o['multimodal']} vs random {o['random']} over {metrics['n_images']} images of "
              f"{used}; wrote {out}, {categories_out}, {selectivity_out}, {metrics_out}, {info_out}")


if __name__ == "__main__":
    main()
