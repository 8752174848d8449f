"""Stage score: Table 1 (decoded units vs images), Table 2 (image prompts) and KS tests.

Writes data/scores.parquet (every scored text) and metrics/scores.json. Without CLIP
weights (the offline embedded profile) every CLIPScore entry says "not computed"
with the reason; a configured CLIP model that cannot load fails the stage.
"""

from __future__ import annotations

from pathlib import Path

import click

from mmn.cli import log, stage_main
from mmn.io import write_json, write_parquet
from mmn.params import load_params

NAME = "score"


@click.command(help=__doc__)
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path())
@click.option("--coco", "coco_dir", default="data/coco", show_default=True, type=click.Path())
@click.option("--projection", "proj_dir", default="data/projection", show_default=True, type=click.Path())
@click.option("--captions", default="data/captions.parquet", show_default=True, type=click.Path())
@click.option("--attributions", default="data/attributions.parquet", show_default=True, type=click.Path())
@click.option("--neurons", default="data/interpretable.parquet", show_default=True, type=click.Path())
@click.option("--out", default="data/scores.parquet", show_default=True, type=click.Path())
@click.option("--metrics", "metrics_out", default="metrics/scores.json", show_default=True, type=click.Path())
@stage_main(NAME)
def main(params_path, coco_dir, proj_dir, captions, attributions, neurons, out, metrics_out) -> None:
    import polars as pl

    from mmn.data.layout import CocoLayout
    from mmn.experiments.scores import score_tables, summarise
    from mmn.metrics.bertscore import BertScorer
    from mmn.metrics.clipscore import ClipScorer
    from mmn.pipeline import build_prefix_lm, seed_everything
    from mmn.quality import check_scores

    params = load_params(params_path)
    seed_everything(params.seed)
    m, s = params.model, params.score
    plm, enc = build_prefix_lm(params, Path(proj_dir))
    layout = CocoLayout(Path(coco_dir))
    bert = BertScorer.from_params(m.bert_model, m.bert_layers, device=plm.adapter.device)
    clip, reason = None, None
    if m.clip_pretrained is None and m.clip_checkpoint is None:
        reason = (f"no CLIP weights configured for profile '{params.profile}' (none ship in any PyPI package; "
                  "set profiles.<name>.clip_pretrained or clip_checkpoint)")
        log(NAME, f"CLIPScore not computed: {reason}")
    else:
        clip = ClipScorer.from_params(s.clip_model, m.clip_pretrained, m.clip_checkpoint, device=plm.adapter.device,
                                      w=s.clip_w)
    df = score_tables(
        pl.read_parquet(captions), pl.read_parquet(attributions), pl.read_parquet(neurons), layout.captions,
        layout.load_image, plm, enc, bert, clip, top_units=s.top_units, random_draws=s.random_draws,
        prompt_neighbours=s.prompt_neighbours, seed=params.seed,
    )
    check_scores(df, clip_computed=clip is not None)
    metrics = summarise(df, reason, bert.description, None if clip is None else clip.description)
    write_parquet(df, out)
    write_json(metrics, metrics_out)
    t1 = metrics["table1"]
    log(NAME, "Table 1 BERTScore: " + ", ".join(f"{k} {v['bertscore']}" for k, v in t1.items()))
    log(NAME, f"wrote {out}, {metrics_out}")


if __name__ == "__main__":
    main()
