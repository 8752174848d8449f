"""Stage load_projection: load LiMBeR's proj.ckpt or train a LiMBeR-style projection.

Training reads the training layout data/coco_train/ (stage download_train; its
split.json says whether it is held out from the evaluation images), holds out a
seeded validation split of it, and keeps the checkpoint of the lowest validation loss. The
training views' encoder features and a resumable checkpoint live in the cache folder
(`--cache`, default .cache/projection): a training killed halfway continues from its last
evaluation when the stage is rerun.
Writes data/projection/ (projection.safetensors + meta.json), summary/projection.json and its
headline metrics/projection.json, and the training curves with DVCLive in
data/projection_live/ (metrics.json: the latest losses, a row of `dvc exp show`;
plots/metrics/{train,val}/loss.tsv for `dvc plots`), written as training runs.
"""

from __future__ import annotations

import click

from mmn.runner import Run, stage

_ckpt = click.option("--ckpt", default=None, type=click.Path(),
                     help="local LiMBeR proj.ckpt (overrides the profile's limber_url)")


@stage("load_projection", extra=_ckpt)
def main(run: Run) -> None:
    from mmn.data.layout import CocoLayout
    from mmn.data.split import read_split_info
    from mmn.errors import ParamsError
    from mmn.headline import headline
    from mmn.limber import limber_projection
    from mmn.models.projection import save_projection
    from mmn.pipeline import build_encoder, build_lm
    from mmn.projection_training import projection_metrics, train_from_layout, training_lines
    from mmn.training_log import LiveLog, empty_live
    from mmn.quality import check_train_eval_disjoint

    params, m, ckpt = run.params, run.params.model, run.extra["ckpt"]
    adapter, tok = build_lm(params)
    enc = build_encoder(params)
    with run.out_dir("out") as tmp:
        if m.projection == "limber" or ckpt:
            src = ckpt or m.limber_url
            if not src:
                raise ParamsError(f"profiles.{params.profile}.limber_url is not set (or pass --ckpt)")
            proj, meta = limber_projection(src, enc.dim, adapter.d_model)
            save_projection(tmp, proj, meta)
            empty_live(run.path("live_metrics").parent)  # no training: an empty curve, declared all the same
            run.log(f"loaded LiMBeR projection {src} (sha256 {meta['sha256'][:12]})")
        else:
            split = read_split_info(run.path("train"))
            check_train_eval_disjoint(run.path("train"), run.path("coco"), allow_overlap=not split.held_out,
                                      compare_ids=split.mode != "captions")
            if not split.held_out:
                run.log(f"WARNING: the projection is trained on the evaluated images (projection.train.data: "
                        f"{split.mode}); held_out: false - every downstream effect is partly memorisation")
            live = LiveLog(run.path("live_metrics").parent)
            proj, res, meta = train_from_layout(CocoLayout(run.path("train")), adapter, tok, enc, params,
                                                cache_dir=run.path("cache"), log=live)
            live.close()
            meta.update(held_out=split.held_out, train_data=split.mode)
            save_projection(tmp, proj, meta)
            for line in training_lines(res, meta):
                run.log(line)
    run.write_metrics(projection_metrics(meta), headline)
    run.log(f"wrote {run.wrote()}")


if __name__ == "__main__":
    main()
