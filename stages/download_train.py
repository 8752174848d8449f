"""Stage download_train: the images the projection learns from, in data/coco_train.

Same COCO layout as data/coco, plus data/coco_train/split.json (mode, held_out, n_train,
n_eval, train_ids). `projection.train.data` (or the profile's `train_data`):
`coco-train` fetches `projection.train.subset` seeded images of COCO
`projection.train.split` through the coco source (same checks, same
`data.on_bad_image`); `split` keeps the training part of the seeded disjoint split
whose evaluated part download_coco wrote to data/coco; `eval` copies data/coco itself
(nothing held out; logged loudly). Gate: no training image may be in data/coco, except
under `eval`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from mmn.cli import StageError, log, stage_main
from mmn.data.layout import CocoLayout
from mmn.io import atomic_dir
from mmn.params import Params, load_params

NAME = "download_train"

EVAL_WARNING = (
    "WARNING: projection.train.data = eval: the projection is trained on the very images it is evaluated on "
    "({n} images of {eval_dir}/). Nothing is held out (held_out: false): every effect measured downstream is "
    "partly memorisation. Use `coco-train` or `split` for a held-out result."
)


def _copy_layout(src: Path, dst: Path) -> dict:
    """Copy the COCO layout ``src`` (images, annotations, skipped.csv) into ``dst``."""
    lay = CocoLayout(src)
    shutil.copytree(lay.images_dir, dst / "images")
    shutil.copytree(lay.root / "annotations", dst / "annotations")
    if lay.skipped_path.exists():
        shutil.copyfile(lay.skipped_path, dst / "skipped.csv")
    return {"n_images": len(lay.images), "copied_from": str(src)}


def build_train_layout(params: Params, eval_dir: Path, tmp: Path, cache_dir: Path) -> dict:
    """Write the training layout of ``params.train_data`` into the empty folder ``tmp``."""
    mode, source = params.train_data, params.model.data_source
    t = params.projection.train
    if mode == "eval":
        return _copy_layout(eval_dir, tmp)
    if mode == "split":
        from mmn.data.split import split_part

        train_part = split_part("train", t.holdout, params.seed)
        if source == "sample":
            from mmn.data.sample import materialize_sample, sample_image_ids

            return materialize_sample(tmp, image_ids=train_part(sample_image_ids()))
        from mmn.data.coco import download_coco

        return download_coco(params.coco_eval, tmp, seed=params.seed, cache_dir=cache_dir,
                             on_bad_image=params.data.on_bad_image, restrict=train_part)
    if source != "coco":  # coco-train
        raise StageError(f"projection.train.data: coco-train needs the profile's data_source to be coco "
                         f"(profile {params.profile!r} has {source!r}); use split or eval")
    from mmn.data.coco import download_coco

    return download_coco(params.coco_train, tmp, seed=params.seed, cache_dir=cache_dir,
                         on_bad_image=params.data.on_bad_image)


@click.command(help=__doc__)
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path())
@click.option("--eval", "eval_dir", default="data/coco", show_default=True, type=click.Path(),
              help="the evaluation layout (stage download_coco)")
@click.option("--out", "out_dir", default="data/coco_train", show_default=True, type=click.Path())
@click.option("--cache", "cache_dir", default=".cache/coco", show_default=True, type=click.Path(),
              help="resumable download cache (coco source), shared with download_coco")
@stage_main(NAME)
def main(params_path: str, eval_dir: str, out_dir: str, cache_dir: str) -> None:
    from mmn.data.split import write_split_info
    from mmn.quality import check_coco_layout, check_train_eval_disjoint

    params = load_params(params_path)
    mode = params.train_data
    eval_path = Path(eval_dir)
    n_eval = len(CocoLayout(eval_path).images)  # LayoutError naming the file when data/coco is missing
    with atomic_dir(out_dir) as tmp:
        summary = build_train_layout(params, eval_path, tmp, Path(cache_dir))
        check_coco_layout(tmp)
        overlap = check_train_eval_disjoint(tmp, eval_path, allow_overlap=mode == "eval", train_label=f"{out_dir}/")
        info = write_split_info(tmp, mode, [r["id"] for r in CocoLayout(tmp).images], n_eval)
    if mode == "eval" and params.model.projection == "train":
        log(NAME, EVAL_WARNING.format(n=len(overlap), eval_dir=eval_dir))
    elif params.model.projection != "train":
        log(NAME, f"profile {params.profile!r} loads a {params.model.projection} projection: "
                  f"{out_dir}/ is not used for training")
    log(NAME, f"mode={mode} source={params.model.data_source}: {info.n_train} training image(s), "
              f"{info.n_eval} evaluated, held_out={str(info.held_out).lower()}; {summary}; wrote {out_dir}/")
    if summary.get("n_skipped"):
        log(NAME, f"skipped {summary['n_skipped']} bad image(s) (data.on_bad_image: skip); "
                  f"listed with the reason in {out_dir}/skipped.csv")


if __name__ == "__main__":
    main()
