"""Stage ablate: zero (or mean-fill) the top-k units by attribution at the image
positions and measure p(c) and the regenerated caption (Fig. 6), for unfiltered,
filtered (interpretable) and random units from the same layers.

Writes data/ablation.parquet (one row per image, kind, k) and metrics/ablation.json.
"""

from __future__ import annotations

from pathlib import Path

import click

from mmn.cli import log, stage_main
from mmn.io import write_json, write_parquet
from mmn.params import load_params

NAME = "ablate"


@click.command(help=__doc__)
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path())
@click.option("--coco", "coco_dir", default="data/coco", show_default=True, type=click.Path())
@click.option("--projection", "proj_dir", default="data/projection", show_default=True, type=click.Path())
@click.option("--captions", default="data/captions.parquet", show_default=True, type=click.Path())
@click.option("--out", default="data/ablation.parquet", show_default=True, type=click.Path())
@click.option("--metrics", "metrics_out", default="metrics/ablation.json", show_default=True, type=click.Path())
@stage_main(NAME)
def main(params_path, coco_dir, proj_dir, captions, out, metrics_out) -> None:
    import polars as pl

    from mmn.data.layout import CocoLayout
    from mmn.experiments.ablation import ablate_images, ablation_summary
    from mmn.metrics.bertscore import BertScorer
    from mmn.neurons.decode import top_token_ids_all_units
    from mmn.neurons.filter import load_wordlist, vocab_word_mask
    from mmn.distributed import all_reduce_sum, distributed, gather_frames
    from mmn.pipeline import attributed_layers, build_prefix_lm, seed_everything
    from mmn.quality import check_ablation

    params = load_params(params_path)
    seed_everything(params.seed)
    ap, f = params.ablate, params.filter
    caps = pl.read_parquet(captions)
    layout = CocoLayout(Path(coco_dir))
    with distributed() as info:
        plm, enc = build_prefix_lm(params, Path(proj_dir))
        ad = plm.adapter
        layers = attributed_layers(params, ad.n_layers)
        # interpretability of every unit (for the `filtered` kind): top tokens of all units
        words = vocab_word_mask(plm.tokenizer, ad.vocab_size, load_wordlist(f.wordlist), f.min_letters)
        top_ids = top_token_ids_all_units(ad, top_n=f.top_n, final_norm=params.decode.final_norm)
        interpretable = (words[top_ids].sum(-1) >= f.min_words).cpu()
        if info.is_main:
            log(NAME, f"{int(interpretable.sum())} of {interpretable.numel()} units interpretable")
        part = ablate_images(caps, layout.load_image, plm, enc, interpretable, ks=ap.ks, mode=ap.mode,
                             max_new_tokens=params.caption.max_new_tokens, regenerate=ap.regenerate,
                             seed=params.seed, layers=layers, progress=info.is_main, shard=info.shard,
                             reduce_sum=lambda t: all_reduce_sum(t, info))
        df = gather_frames(part, info)
    if not info.is_main:
        return
    df = df.sort(["image_id", "kind", "k"])
    if info.world > 1:
        log(NAME, f"merged {info.world} shards")
    if ap.regenerate:
        bert = BertScorer.from_params(params.model.bert_model, params.model.bert_layers, device=ad.device)
        orig = dict(zip(caps["image_id"].to_list(), caps["caption"].to_list()))
        f1 = bert.f1(df["caption"].to_list(), [orig[i] for i in df["image_id"].to_list()])
        df = df.with_columns(pl.Series("bertscore_f1", f1, dtype=pl.Float64))
    check_ablation(df)
    metrics = {"mode": ap.mode, "n_images": int(df["image_id"].n_unique()), **ablation_summary(df)}
    write_parquet(df, out)
    write_json(metrics, metrics_out)
    top = max(ap.ks)
    for kind in ("unfiltered", "filtered", "random"):
        v = metrics.get(kind, {}).get(f"k{top}")
        if v:
            log(NAME, f"{kind}: k={top} (effective {v['k_effective']:.0f}) mean relative drop of p(c) "
                      f"{100 * v['rel_drop']:.1f}%")
    log(NAME, f"wrote {out}, {metrics_out}")


if __name__ == "__main__":
    main()
