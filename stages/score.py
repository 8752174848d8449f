"""Stage score: Table 1 (decoded units vs images), Table 2 (image prompts) and KS tests.

Writes data/scores.parquet (every scored text), metrics/scores.json (numbers only: per-row
means with 95% bootstrap CIs over images, paired tests, per-image KS tests) and
data/info/score.json (models, scales, "not computed" reasons). Without CLIP weights (the
offline embedded profile) CLIPScore is null in the metrics and the reason is in the info
file; a configured CLIP model that cannot load fails the stage.
"""

from __future__ import annotations

from pathlib import Path

import click

from mmn.cli import StageError, log, stage_main
from mmn.io import read_parquet, write_json, write_parquet
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
@click.option("--info", "info_out", default="data/info/score.json", show_default=True, type=click.Path())
@stage_main(NAME)
def main(params_path, coco_dir, proj_dir, captions, attributions, neurons, out, metrics_out, info_out) -> None:
    import polars as pl

    from mmn.data.layout import CocoLayout
    from mmn.experiments.scores import describe, per_image_scores, score_tables, summarise
    from mmn.metrics.bertscore import BertScorer
    from mmn.metrics.clipscore import ClipScorer
    from mmn.pipeline import build_prefix_lm, seed_everything
    from mmn.quality import check_scores

    params = load_params(params_path)
    seed_everything(params.seed)
    m, s = params.model, params.score
    plm = build_prefix_lm(params, Path(proj_dir))
    layout = CocoLayout(Path(coco_dir))
    try:
        bert = BertScorer.from_params(m.bert_model, m.bert_layers, device=plm.adapter.device,
                                      rescale=m.bert_rescale, batch_size=s.batch_size, dtype=plm.adapter.dtype)
    except ValueError as e:
        raise StageError(f"profiles.{params.profile}.bert_rescale: {e}") from e
    clip, reason = None, None
    if m.clip_pretrained is None and m.clip_checkpoint is None:
        reason = (f"no CLIP weights configured for profile '{params.profile}' (none ship in any PyPI package; "
                  "set profiles.<name>.clip_pretrained or clip_checkpoint)")
        log(NAME, f"CLIPScore not computed: {reason}")
    else:
        clip = ClipScorer.from_params(s.clip_model, m.clip_pretrained, m.clip_checkpoint, device=plm.adapter.device,
                                      w=s.clip_w, batch_size=s.batch_size)
    try:
        df = score_tables(
            read_parquet(captions), read_parquet(attributions), read_parquet(neurons), layout.captions,
            layout.load_image, plm, bert, clip, random_draws=s.random_draws,
            prompt_neighbours=s.prompt_neighbours, seed=params.seed,
        )
    except ValueError as e:
        raise StageError(f"{attributions} / {neurons}: {e}") from e
    check_scores(df, clip_computed=clip is not None, bert_min=bert.min_score(), clip_max=100.0 * s.clip_w)
    pi = per_image_scores(df)
    metrics = summarise(pi, bert_rescaled=bert.rescaled, clip_w=s.clip_w, clip_computed=clip is not None)
    info = describe(bert, clip, reason, s.clip_w, pi.filter(pl.col("item") == "multimodal_all").height)
    write_parquet(df, out)
    write_json(metrics, metrics_out)
    write_json(info, info_out)
    t1 = metrics["bertscore"]["table1"]
    log(NAME, f"Table 1 BERTScore ({info['bertscore']['scale'].split(',')[0]}): "
        + ", ".join(f"{k} {v['mean']:.4f} [{v['lo']}, {v['hi']}] n={v['n']}" for k, v in t1.items() if v))
    log(NAME, f"wrote {out}, {metrics_out}, {info_out}")


if __name__ == "__main__":
    main()
