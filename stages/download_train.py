"""Stage download_train: the images the projection learns from, in data/coco_train.

Same COCO layout as data/coco, plus data/coco_train/split.json (mode, held_out, n_train,
n_eval, train_ids). `projection.train.data` (or the profile's `train_data`):
`coco-train` fetches `projection.train.subset` seeded images of COCO
`projection.train.split` through the coco source (same checks, same
`data.on_bad_image`); `split` keeps the training part of the seeded disjoint split
whose evaluated part download_coco wrote to data/coco; `captions` reads any image-caption
set (`projection.train.captions`: CSV, COCO captions JSON or webdataset shards); `eval`
copies data/coco itself (nothing held out; logged loudly). Gate: no training image may be in
data/coco (same id, or same file content), except under `eval`.
"""

from __future__ import annotations

from mmn.runner import Run, stage


@stage("download_train")
def main(run: Run) -> None:
    from mmn.data.build import EVAL_WARNING, build_train_layout
    from mmn.data.layout import CocoLayout
    from mmn.data.split import write_split_info
    from mmn.quality import check_coco_layout, check_train_eval_disjoint

    params, mode, out = run.params, run.params.train_data, run.path("out")
    n_eval = len(CocoLayout(run.path("eval")).images)  # LayoutError naming the file when data/coco is broken
    with run.out_dir("out") as tmp:
        summary = build_train_layout(params, run.path("eval"), tmp, run.path("cache"))
        check_coco_layout(tmp)
        overlap = check_train_eval_disjoint(tmp, run.path("eval"), allow_overlap=mode == "eval",
                                            train_label=f"{out}/", compare_ids=mode != "captions")
        info = write_split_info(tmp, mode, [r["id"] for r in CocoLayout(tmp).images], n_eval)
    if mode == "eval" and params.model.projection == "train":
        run.log(EVAL_WARNING.format(n=len(overlap), eval_dir=run.path("eval")))
    elif params.model.projection != "train":
        run.log(f"profile {params.profile!r} loads a {params.model.projection} projection: {out}/ is not used for "
                f"training")
    run.log(f"mode={mode} source={params.model.data_source}: {info.n_train} training image(s), {info.n_eval} "
            f"evaluated, held_out={str(info.held_out).lower()}; {summary}; wrote {out}/")
    if summary.get("n_skipped"):
        run.log(f"skipped {summary['n_skipped']} bad image(s) (data.on_bad_image: skip); listed with the reason in "
                f"{out}/skipped.csv")


if __name__ == "__main__":
    main()
