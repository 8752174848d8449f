"""Stage iou: receptive fields of multimodal units vs COCO masks (Fig. 5) and
category selectivity (supplement).

Writes data/iou.parquet (per category, image, kind, draw, unit), data/iou_categories.csv
(per category: bootstrap CIs over images and the paired test multimodal vs random),
data/selectivity.parquet, summary/iou.json (numbers only: overall CIs, paired test,
image and category counts; headline: metrics/iou.json) and data/info/iou.json (categories
used, definitions).
"""

from __future__ import annotations

from mmn.runner import Run, stage


@stage("iou")
def main(run: Run) -> None:
    from pycocotools.coco import COCO

    from mmn.data.layout import CocoLayout
    from mmn.distributed import distributed
    from mmn.errors import ParamsError
    from mmn.experiments.iou import iou_activations, iou_results, plan_iou
    from mmn.headline import headline
    from mmn.pipeline import build_prefix_lm
    from mmn.quality import check_iou

    params, ip, cats = run.params, run.params.iou, run.params.model.iou_categories
    layout = CocoLayout(run.path("coco"))
    coco = COCO(str(layout.instances_path))
    att = run.read_parquet("attributions")
    try:
        plan = plan_iou(coco, run.read_parquet("captions"), att, run.read_parquet("neurons"), cats, ip)
    except ValueError as err:
        raise ParamsError(f"profiles.{params.profile}.iou_categories: {err} in {layout.instances_path}") from None
    with distributed() as info:
        plm = build_prefix_lm(params, run.path("projection"), plant=run.path("plant"))
        rows, grids, means = iou_activations(plan, att, ip, plm, layout.load_image, params.seed, info)
    if not info.is_main:
        return
    if info.world > 1:
        run.log(f"merged {info.world} shards")
    if plan.unused:
        run.log(f"no image for {plan.unused} (iou.single={ip.single}, with a caption target): not used")
    df, per_cat, sel, metrics, desc = iou_results(plan, rows, grids, means, coco, ip, cats, plm.encoder.grid)
    check_iou(df)
    run.write_parquet("out", df)
    run.write_csv("categories_out", per_cat, float_precision=6)
    run.write_parquet("selectivity_out", sel)
    run.write_metrics(metrics, headline)
    run.write_info(desc)
    o = metrics["overall"]
    run.log(f"IoU multimodal {o['multimodal']} vs random {o['random']} over {metrics['n_images']} images of "
            f"{desc['categories_used']}; wrote {run.wrote()}")


if __name__ == "__main__":
    main()
