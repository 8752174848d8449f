"""Stage iou: receptive fields of multimodal units vs COCO masks (Fig. 5) and
category selectivity (supplement).

Writes data/iou.parquet (per image, unit, kind), data/selectivity.parquet and
metrics/iou.json (per category and overall, multimodal vs random units).
"""

from __future__ import annotations

from pathlib import Path

import click

from mmn.cli import StageError, log, stage_main
from mmn.io import write_json, write_parquet
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
@click.option("--selectivity-out", default="data/selectivity.parquet", show_default=True, type=click.Path())
@click.option("--metrics", "metrics_out", default="metrics/iou.json", show_default=True, type=click.Path())
@stage_main(NAME)
def main(params_path, coco_dir, proj_dir, captions, attributions, neurons, out, selectivity_out,
         metrics_out) -> None:
    import polars as pl
    from pycocotools.coco import COCO

    from mmn.data.layout import CocoLayout
    from mmn.distributed import distributed, gather_frames
    from mmn.experiments.iou import iou_experiment, iou_summary, selectivity_plan, selectivity_table
    from mmn.metrics.iou import single_instance_images
    from mmn.pipeline import build_prefix_lm, seed_everything
    from mmn.quality import check_iou

    params = load_params(params_path)
    seed_everything(params.seed)
    ip, cats = params.iou, params.model.iou_categories
    layout = CocoLayout(Path(coco_dir))
    coco = COCO(str(layout.instances_path))
    try:
        per_cat = single_instance_images(coco, cats)
    except ValueError as err:
        raise StageError(f"{params_path}: profiles.{params.profile}.iou_categories: {err}") from None
    empty = [c for c in cats if not per_cat[c]]
    if empty:
        raise StageError(f"{params_path}: profiles.{params.profile}.iou_categories: no single-instance image of "
                         f"{empty} in {layout.instances_path}")
    caps, att = pl.read_parquet(captions), pl.read_parquet(attributions)
    plan, plan_imgs = selectivity_plan(coco, att, pl.read_parquet(neurons), cats, ip.selectivity_units)
    with distributed() as info:
        plm, enc = build_prefix_lm(params, Path(proj_dir))
        part, part_means = iou_experiment(
            coco, caps, att, plan, plan_imgs, layout.load_image, plm, enc, cats, top_units=ip.top_units,
            random_draws=ip.random_draws, quantile=ip.quantile, mask_size=ip.mask_size, seed=params.seed,
            progress=info.is_main, shard=info.shard)
        df, means = gather_frames(part, info), gather_frames(part_means, info)
    if not info.is_main:
        return
    if info.world > 1:
        log(NAME, f"merged {info.world} shards")
    df = df.sort(["category", "image_id", "kind", "layer", "unit", "draw"])
    sel = selectivity_table(plan, plan_imgs, means, cats)
    check_iou(df)
    metrics = iou_summary(df, cats)
    metrics["selectivity_rows"] = sel.height
    write_parquet(df, out)
    write_parquet(sel, selectivity_out)
    write_json(metrics, metrics_out)
    log(NAME, f"IoU multimodal {metrics['overall']['multimodal']} vs random {metrics['overall']['random']}; "
              f"wrote {out}, {selectivity_out}, {metrics_out}")


if __name__ == "__main__":
    main()
