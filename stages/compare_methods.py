"""Stage compare_methods: which attribution method finds the units that matter?

For every image with a target (the first compare.max_images by id), each attribution
method (grad_x_act, direct_logit, integrated_gradients with attribute.ig_steps) ranks the
units of the attributed layers; the union of their top compare.candidates units is
ablated one unit at a time at the image positions (exact Δy^c and Δp(c), many ablations
as the rows of one forward). Per method: Spearman / Kendall correlation of the score with
the exact Δy, precision@k of the exact top k, the ablation curve (relative drop of p(c)
for k in ablate.ks) and its area; bootstrap CIs over images and paired tests between
methods. Seconds per image (wall time) go to the info file only, so that the metrics and
tables are byte-identical on a rerun.

Writes metrics/methods.json (numbers only), data/compare_methods.csv (per method and
metric: mean, CI, paired tests), data/compare_methods_curve.csv (per method and k),
data/compare_methods.parquet (per candidate unit: Δy, Δp and every method's score) and
data/info/compare_methods.json (settings, definitions, seconds per image).
"""

from __future__ import annotations

from pathlib import Path

import click

from mmn.cli import log, stage_main
from mmn.io import atomic_file, read_parquet, write_json, write_parquet
from mmn.params import load_params

NAME = "compare_methods"


@click.command(help=__doc__)
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path())
@click.option("--coco", "coco_dir", default="data/coco", show_default=True, type=click.Path())
@click.option("--projection", "proj_dir", default="data/projection", show_default=True, type=click.Path())
@click.option("--captions", default="data/captions.parquet", show_default=True, type=click.Path())
@click.option("--out", default="data/compare_methods.parquet", show_default=True, type=click.Path())
@click.option("--summary", "summary_out", default="data/compare_methods.csv", show_default=True, type=click.Path())
@click.option("--curve", "curve_out", default="data/compare_methods_curve.csv", show_default=True,
              type=click.Path())
@click.option("--metrics", "metrics_out", default="metrics/methods.json", show_default=True, type=click.Path())
@click.option("--info", "info_out", default="data/info/compare_methods.json", show_default=True,
              type=click.Path())
@stage_main(NAME)
def main(params_path, coco_dir, proj_dir, captions, out, summary_out, curve_out, metrics_out, info_out) -> None:
    import polars as pl

    from mmn.cli import StageError
    from mmn.data.layout import CocoLayout
    from mmn.experiments.compare_methods import (
        compare_images,
        method_curves,
        method_summary,
        methods_info,
        methods_metrics,
        timing_summary,
    )
    from mmn.pipeline import attributed_layers, build_prefix_lm, seed_everything
    from mmn.quality import check_methods

    params = load_params(params_path)
    seed_everything(params.seed)
    cp = params.compare
    caps = read_parquet(captions)
    if int(caps["has_noun"].sum()) == 0:
        raise StageError(f"{captions}: no caption has a target noun (has_noun); nothing to compare")
    layout = CocoLayout(Path(coco_dir))
    plm = build_prefix_lm(params, Path(proj_dir))
    layers = attributed_layers(params, plm.adapter.n_layers)
    cand, per, curve = compare_images(caps, layout.load_image, plm, candidates=cp.candidates,
                                      precision_k=cp.precision_k, ks=params.ablate.ks,
                                      ig_steps=params.attribute.ig_steps, rows=cp.batch_size, layers=layers,
                                      max_images=cp.max_images)
    check_methods(cand)
    n_images = per["image_id"].n_unique()
    summary = method_summary(per, seed=params.seed)
    curves = method_curves(curve, seed=params.seed)
    write_parquet(cand, out)
    with atomic_file(summary_out) as tmp:
        summary.write_csv(tmp, float_precision=6)
    with atomic_file(curve_out) as tmp:
        curves.write_csv(tmp, float_precision=6)
    write_json(methods_metrics(summary, n_images), metrics_out)
    seconds = timing_summary(per, seed=params.seed)
    write_json(methods_info(params, layers, n_images, seconds), info_out)
    for r in summary.filter(pl.col("vs").is_null(), pl.col("metric").is_in(["spearman", "auc"])
                            ).iter_rows(named=True):
        ci = "" if r["lo"] is None else f" [95% CI {r['lo']:.3f}, {r['hi']:.3f}]"
        log(NAME, f"{r['method']}: {r['metric']} {r['mean']:.3f}{ci} (n={r['n']})")
    for m, t in seconds.items():
        log(NAME, f"{m}: {t['mean']:.2f} s per image (wall time, in data/info only)")
    log(NAME, f"{n_images} images, {cand.height} candidate units ablated one at a time; wrote {out}, "
              f"{summary_out}, {curve_out}, {metrics_out}, {info_out}")


if __name__ == "__main__":
    main()
