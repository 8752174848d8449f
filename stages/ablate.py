"""Stage ablate: zero (or mean-fill) the top-k units by attribution at the image
positions and measure p(c) and the regenerated caption (Fig. 6), for unfiltered,
filtered (interpretable) and random units from the same layers.

Interpretability of every unit (the ``filtered`` kind) is decided on an fp32 CPU copy of
the LM, exactly as the decode + filter stages decide it, whatever the profile's dtype.

Writes data/ablation.parquet (one row per image, kind, k), data/ablation_curve.csv (one
row per kind and k: means with bootstrap CIs over images, the drop of the mean p(c) and
the paired test against random units), summary/ablation.json (numbers only: headline ks;
its headline: metrics/ablation.json) and data/info/ablate.json (settings and definitions).
"""

from __future__ import annotations

from mmn.runner import Run, stage


@stage("ablate")
def main(run: Run) -> None:
    import polars as pl

    from mmn.data.layout import CocoLayout
    from mmn.distributed import all_reduce_sum, distributed, gather_frames, share_mask_from_main
    from mmn.experiments import ablation as A
    from mmn.headline import headline
    from mmn.metrics.bertscore import BertScorer
    from mmn.pipeline import attributed_layers, build_prefix_lm
    from mmn.quality import check_ablation

    params, ap = run.params, run.params.ablate
    caps = run.read_parquet("captions")
    layout = CocoLayout(run.path("coco"))
    with distributed() as info:
        plm = build_prefix_lm(params, run.path("projection"), plant=run.path("plant"))
        ad = plm.adapter
        # fp32 decode on the main rank only (one CPU copy of the LM), shared with the others
        interpretable = share_mask_from_main(lambda: A.interpretable_fp32(params, run.path("wordlist"), plm,
                                                                                  run.path("plant")),
                                             (ad.n_layers, ad.d_mlp), info)
        layers = attributed_layers(params, ad.n_layers)
        part = A.ablate_images(caps, layout.load_image, plm, interpretable, ks=ap.ks, mode=ap.mode,
                               max_new_tokens=params.caption.max_new_tokens,
                               stop_at_newline=params.caption.stop_at_newline, regenerate=ap.regenerate,
                               seed=params.seed, layers=layers, preactivation=params.attribute.preactivation,
                               aggregate=params.attribute.aggregate,
                               progress=info.is_main, shard=info.shard,
                               reduce_sum=lambda t: all_reduce_sum(t, info))
        df = gather_frames(part, info)
    if not info.is_main:
        return
    if info.world > 1:
        run.log(f"merged {info.world} shards")
    df = df.sort(["image_id", "kind", "k"])
    if ap.regenerate:
        bert = BertScorer.from_profile(params, ad.device, ad.dtype)
        orig = dict(zip(caps["image_id"].to_list(), caps["caption"].to_list()))
        f1 = bert.f1(df["caption"].to_list(), [orig[i] for i in df["image_id"].to_list()])
        df = df.with_columns(pl.Series("bertscore_f1", f1, dtype=pl.Float64))
    check_ablation(df)
    curve = A.ablation_curve(df)  # fixed resampling seed: plot recomputes the same numbers
    run.write_parquet("out", df)
    run.write_csv("curve", curve, float_precision=6)
    run.write_metrics(A.ablation_metrics(curve, ap.ks), headline)
    run.write_info(A.ablation_info(ap.ks, int(interpretable.sum()), int(interpretable.numel()), layers))
    run.log(f"{int(interpretable.sum())} of {interpretable.numel()} units interpretable (fp32 decode)")
    for line in A.curve_lines(curve, max(ap.ks)):
        run.log(line)
    run.log(f"wrote {run.wrote()}")


if __name__ == "__main__":
    main()
