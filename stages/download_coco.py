"""Stage download_coco: materialise the COCO-format layout in data/coco.

source `sample` (embedded profile): photos shipped in installed wheels + the project's
own annotations; source `coco`: COCO 2017 from params `data.coco.base_url` (`data.coco.subset`
images, or the profile's `eval_subset`). Under `projection.train.data: split` only the
evaluated part (`projection.train.holdout`) of the seeded split is kept. Images that
cannot be fetched or decoded fail the stage, or with `data.on_bad_image: skip` are left
out and listed in data/coco/skipped.csv.
"""

from __future__ import annotations

from mmn.runner import Run, stage


@stage("download_coco")
def main(run: Run) -> None:
    from mmn.data.build import build_eval_layout
    from mmn.quality import check_coco_layout

    params = run.params
    with run.out_dir("out") as tmp:
        summary = build_eval_layout(params, tmp, run.path("cache"))
        check_coco_layout(tmp)
    run.log(f"source={params.model.data_source} train_data={params.train_data}: {summary}; wrote {run.wrote()}/")
    if summary.get("n_skipped"):
        run.log(f"skipped {summary['n_skipped']} bad image(s) (data.on_bad_image: skip); listed with the reason in "
                f"{run.path('out')}/skipped.csv")


if __name__ == "__main__":
    main()
