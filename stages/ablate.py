"""Stage ablate: zero (or mean-fill) the top-k units by attribution at the image
positions and measure p(c) and the regenerated caption (Fig. 6), for unfiltered,
filtered (interpretable) and random units from the same layers.

Interpretability of every unit (the ``filtered`` kind) is decided on an fp32 CPU copy of
the LM, exactly as the decode + filter stages decide it, whatever the profile's dtype.

Writes data/ablation.parquet (one row per image, kind, k), data/ablation_curve.csv (one
row per kind and k: means with bootstrap CIs over images, the drop of the mean p(c) and
the paired test against random units), metrics/ablation.json (numbers only: headline ks)
and data/info/ablate.json (settings and definitions).
"""

from __future__ import annotations

from pathlib import Path

import click

from mmn.cli import StageError, log, stage_main
from mmn.io import atomic_file, read_parquet, write_json, write_parquet
from mmn.params import load_params

NAME = "ablate"


def interpretable_fp32(params, plm=None) -> "torch.Tensor":  # noqa: F821
    """``Bool[Tensor, "layers d_mlp"]``: every unit's interpretability, decided on an fp32 CPU
    copy of the LM by the decode + filter rule (so both stages agree unit for unit). ``plm``'s
    LM is reused when it already is fp32 on the CPU (the embedded profile): no second load."""
    import torch

    from mmn.neurons.filter import interpretable_units, load_wordlist
    from mmn.pipeline import build_lm

    if plm is not None and plm.adapter.dtype == torch.float32 and plm.adapter.device.type == "cpu":
        adapter, tok = plm.adapter, plm.tokenizer
    else:
        adapter, tok = build_lm(params, dtype="float32", device="cpu")
    return interpretable_units(adapter, tok, load_wordlist(params.filter.wordlist), params.decode, params.filter)


@click.command(help=__doc__)
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path())
@click.option("--coco", "coco_dir", default="data/coco", show_default=True, type=click.Path())
@click.option("--projection", "proj_dir", default="data/projection", show_default=True, type=click.Path())
@click.option("--captions", default="data/captions.parquet", show_default=True, type=click.Path())
@click.option("--out", default="data/ablation.parquet", show_default=True, type=click.Path())
@click.option("--curve", "curve_out", default="data/ablation_curve.csv", show_default=True, type=click.Path())
@click.option("--metrics", "metrics_out", default="metrics/ablation.json", show_default=True, type=click.Path())
@click.option("--info", "info_out", default="data/info/ablate.json", show_default=True, type=click.Path())
@stage_main(NAME)
def main(params_path, coco_dir, proj_dir, captions, out, curve_out, metrics_out, info_out) -> None:
    import polars as pl
    import torch

    from mmn.data.layout import CocoLayout
    from mmn.distributed import all_reduce_sum, distributed, gather_frames
    from mmn.experiments.ablation import ablate_images, ablation_curve, ablation_info, ablation_metrics
    from mmn.metrics.bertscore import BertScorer
    from mmn.pipeline import attributed_layers, build_prefix_lm, seed_everything
    from mmn.quality import check_ablation

    params = load_params(params_path)
    seed_everything(params.seed)
    ap = params.ablate
    caps = read_parquet(captions)
    layout = CocoLayout(Path(coco_dir))
    with distributed() as info:
        plm = build_prefix_lm(params, Path(proj_dir))
        ad = plm.adapter
        # fp32 decode on the main rank only (one CPU copy of the LM), shared with the others
        if info.is_main:
            interpretable = interpretable_fp32(params, plm)
            if tuple(interpretable.shape) != (ad.n_layers, ad.d_mlp):
                raise StageError(f"fp32 interpretability mask {tuple(interpretable.shape)} does not match the "
                                 f"LM's (layers, d_mlp) = ({ad.n_layers}, {ad.d_mlp})")
        else:
            interpretable = torch.zeros(ad.n_layers, ad.d_mlp, dtype=torch.bool)
        if info.world > 1:
            interpretable = all_reduce_sum(interpretable.to(torch.float32), info) > 0.5
        layers = attributed_layers(params, ad.n_layers)
        if info.is_main:
            log(NAME, f"{int(interpretable.sum())} of {interpretable.numel()} units interpretable (fp32 decode)")
        part = ablate_images(caps, layout.load_image, plm, interpretable, ks=ap.ks, mode=ap.mode,
                             max_new_tokens=params.caption.max_new_tokens,
                             stop_at_newline=params.caption.stop_at_newline, regenerate=ap.regenerate,
                             seed=params.seed, layers=layers, progress=info.is_main, shard=info.shard,
                             reduce_sum=lambda t: all_reduce_sum(t, info))
        df = gather_frames(part, info)
    if not info.is_main:
        return
    df = df.sort(["image_id", "kind", "k"])
    if info.world > 1:
        log(NAME, f"merged {info.world} shards")
    if ap.regenerate:
        bert = BertScorer.from_params(params.model.bert_model, params.model.bert_layers, device=ad.device,
                                      dtype=ad.dtype)
        orig = dict(zip(caps["image_id"].to_list(), caps["caption"].to_list()))
        f1 = bert.f1(df["caption"].to_list(), [orig[i] for i in df["image_id"].to_list()])
        df = df.with_columns(pl.Series("bertscore_f1", f1, dtype=pl.Float64))
    check_ablation(df)
    curve = ablation_curve(df)  # fixed resampling seed: plot recomputes the same numbers
    metrics = ablation_metrics(curve, ap.ks)
    write_parquet(df, out)
    with atomic_file(curve_out) as tmp:
        curve.write_csv(tmp, float_precision=6)
    write_json(metrics, metrics_out)
    write_json(ablation_info(params, int(interpretable.sum()), int(interpretable.numel()), layers), info_out)
    for r in curve.filter(pl.col("k") == max(ap.ks)).iter_rows(named=True):
        lo, hi = r["rel_drop_lo"], r["rel_drop_hi"]
        ci = "" if lo is None else f" [95% CI {100 * lo:.1f}, {100 * hi:.1f}]"
        dm = "n/a" if r["drop_of_mean"] is None else f"{100 * r['drop_of_mean']:.1f}%"
        log(NAME, f"{r['kind']}: k={r['k']} (effective {r['k_effective']:.0f}), n={r['n']}: mean relative drop "
                  f"of p(c) {100 * r['rel_drop']:.1f}%{ci}; drop of the mean p(c) {dm}")
    log(NAME, f"wrote {out}, {curve_out}, {metrics_out}, {info_out}")


if __name__ == "__main__":
    main()
