"""Stage score: Table 1 (decoded units vs images), Table 2 (image prompts) and KS tests.

Writes data/scores.parquet (every scored text), summary/scores.json (numbers only: per-row
means with 95% bootstrap CIs over images, paired tests, per-image KS tests; headline:
metrics/scores.json) and
data/info/score.json (models, scales, "not computed" reasons). Without CLIP weights (the
offline embedded profile) CLIPScore is null in the metrics and the reason is in the info
file; a configured CLIP model that cannot load fails the stage.
"""

from __future__ import annotations

from mmn.runner import Run, stage


@stage("score")
def main(run: Run) -> None:
    import polars as pl

    from mmn.data.layout import CocoLayout
    from mmn.errors import DataError
    from mmn.experiments.scores import build_scorers, describe, per_image_scores, score_tables, summarise, table1_line
    from mmn.headline import headline
    from mmn.pipeline import build_prefix_lm
    from mmn.quality import check_scores

    params, s = run.params, run.params.score
    plm = build_prefix_lm(params, run.path("projection"), plant=run.path("plant"))
    layout = CocoLayout(run.path("coco"))
    bert, clip, reason = build_scorers(params, plm.adapter.device, plm.adapter.dtype)
    if reason:
        run.log(f"CLIPScore not computed: {reason}")
    try:
        df, own_units = score_tables(run.read_parquet("captions"), run.read_parquet("attributions"), run.read_parquet("neurons"),
                          layout.captions, layout.load_image, plm, bert, clip, random_draws=s.random_draws,
                          prompt_neighbours=s.prompt_neighbours, seed=params.seed)
    except ValueError as e:
        raise DataError(f"{run.path('attributions')} / {run.path('neurons')}: {e}") from e
    check_scores(df, clip_computed=clip is not None, bert_min=bert.min_score(), clip_max=100.0 * s.clip_w)
    pi = per_image_scores(df)
    metrics = summarise(pi, bert_rescaled=bert.rescaled, clip_w=s.clip_w, clip_computed=clip is not None)
    info = describe(bert, clip, reason, s.clip_w, pi.filter(pl.col("item") == "multimodal_all").height, own_units)
    run.write_parquet("out", df)
    run.write_metrics(metrics, headline)
    run.write_info(info)
    run.log(table1_line(metrics, info["bertscore"]["scale"]))
    run.log(f"wrote {run.wrote()}")


if __name__ == "__main__":
    main()
