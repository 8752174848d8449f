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

Writes summary/methods.json (numbers only; headline: metrics/methods.json), data/compare_methods.csv
(per method and metric: mean, CI, paired tests), data/compare_methods_curve.csv (per method and k),
data/compare_methods.parquet (per candidate unit: Δy, Δp and every method's score) and
data/info/compare_methods.json (settings, definitions, seconds per image).
"""

from __future__ import annotations

from mmn.runner import Run, stage


@stage("compare_methods")
def main(run: Run) -> None:
    from mmn.data.layout import CocoLayout
    from mmn.errors import DataError
    from mmn.experiments import compare_methods as C
    from mmn.headline import headline
    from mmn.pipeline import attributed_layers, build_prefix_lm
    from mmn.quality import check_methods

    params, cp = run.params, run.params.compare
    caps = run.read_parquet("captions")
    if int(caps["has_noun"].sum()) == 0:
        raise DataError(f"{run.path('captions')}: no caption has a target noun (has_noun); nothing to compare")
    plm = build_prefix_lm(params, run.path("projection"), plant=run.path("plant"))
    layers = attributed_layers(params, plm.adapter.n_layers)
    cand, per, curve = C.compare_images(caps, CocoLayout(run.path("coco")).load_image, plm, candidates=cp.candidates,
                                        precision_k=cp.precision_k, ks=params.ablate.ks,
                                        ig_steps=params.attribute.ig_steps, rows=cp.batch_size, layers=layers,
                                        max_images=cp.max_images, sample=cp.sample, seed=params.seed)
    check_methods(cand)
    n_images = per["image_id"].n_unique()
    summary, seconds = C.method_summary(per, seed=params.seed), C.timing_summary(per, seed=params.seed)
    run.write_parquet("out", cand)
    run.write_csv("table", summary, float_precision=6)
    run.write_csv("curve", C.method_curves(curve, seed=params.seed), float_precision=6)
    run.write_metrics(C.methods_metrics(summary, n_images), headline)
    run.write_info(C.methods_info(cp.precision_k, layers, n_images, seconds))
    for line in C.summary_lines(summary, seconds):
        run.log(line)
    run.log(f"{n_images} images, {cand.height} candidate units ablated one at a time; wrote {run.wrote()}")


if __name__ == "__main__":
    main()
