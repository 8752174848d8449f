"""Stage download_coco: materialise the COCO-format layout in data/coco.

source `sample` (embedded profile): photos shipped in installed wheels + the project's
own annotations; source `coco`: COCO 2017 from params `data.coco.base_url` (`data.coco.subset`
images, or the profile's `eval_subset`). Under `projection.train.data: split` only the
evaluated part (`projection.train.holdout`) of the seeded split is kept. Images that
cannot be fetched or decoded fail the stage, or with `data.on_bad_image: skip` are left
out and listed in data/coco/skipped.csv.
"""

from __future__ import annotations

from pathlib import Path

import click

from mmn.cli import log, stage_main
from mmn.io import atomic_dir
from mmn.params import load_params

NAME = "download_coco"


@click.command(help=__doc__)
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path())
@click.option("--out", "out_dir", default="data/coco", show_default=True, type=click.Path())
@click.option("--cache", "cache_dir", default=".cache/coco", show_default=True, type=click.Path(),
              help="resumable download cache (coco source)")
@stage_main(NAME)
def main(params_path: str, out_dir: str, cache_dir: str) -> None:
    params = load_params(params_path)
    source = params.model.data_source
    eval_part = None
    if params.train_data == "split":  # keep only the evaluated part; download_train gets the rest
        from mmn.data.split import split_part

        eval_part = split_part("eval", params.projection.train.holdout, params.seed)
    with atomic_dir(out_dir) as tmp:
        if source == "sample":
            from mmn.data.sample import materialize_sample, sample_image_ids

            summary = materialize_sample(tmp, image_ids=eval_part(sample_image_ids()) if eval_part else None)
        else:
            from mmn.data.coco import download_coco

            summary = download_coco(params.coco_eval, tmp, seed=params.seed, cache_dir=Path(cache_dir),
                                    on_bad_image=params.data.on_bad_image, restrict=eval_part)
        from mmn.quality import check_coco_layout

        check_coco_layout(tmp)
    log(NAME, f"source={source} train_data={params.train_data}: {summary}; wrote {out_dir}/")
    if summary.get("n_skipped"):
        log(NAME, f"skipped {summary['n_skipped']} bad image(s) (data.on_bad_image: skip); "
                  f"listed with the reason in {out_dir}/skipped.csv")


if __name__ == "__main__":
    main()
