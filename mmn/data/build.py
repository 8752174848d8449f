"""Materialise the two COCO-format layouts the pipeline reads: the evaluated images
(``data/coco``, stage download_coco) and the projection's training images
(``data/coco_train``, stage download_train), from the profile's ``data_source``.

``sample``: photos shipped in installed wheels + the project's own annotations (offline);
``coco``: COCO 2017 from ``data.coco.base_url`` through :func:`mmn.data.coco.download_coco`
(checked, resumable, ``data.on_bad_image``). ``projection.train.data: captions`` builds the
training layout from any image-caption set instead (:mod:`mmn.data.captions_source`). Under ``projection.train.data: split`` both
layouts are the two parts of one seeded disjoint split (:func:`mmn.data.split.split_part`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mmn.data.layout import CocoLayout
from mmn.errors import ParamsError

EVAL_WARNING = (
    "WARNING: projection.train.data = eval: the projection is trained on the very images it is evaluated on "
    "({n} images of {eval_dir}/). Nothing is held out (held_out: false): every effect measured downstream is "
    "partly memorisation. Use `coco-train` or `split` for a held-out result."
)


def build_eval_layout(params, tmp: Path, cache_dir: Path) -> dict:
    """Write the evaluated images' layout into the empty folder ``tmp``; returns a summary dict."""
    eval_part = None
    if params.train_data == "split":  # keep only the evaluated part; download_train gets the rest
        from mmn.data.split import split_part

        eval_part = split_part("eval", params.projection.train.holdout, params.seed)
    if params.model.data_source == "sample":
        from mmn.data.sample import materialize_sample, sample_image_ids

        return materialize_sample(tmp, image_ids=eval_part(sample_image_ids()) if eval_part else None)
    from mmn.data.coco import download_coco

    return download_coco(params.coco_eval, tmp, seed=params.seed, cache_dir=cache_dir,
                         on_bad_image=params.data.on_bad_image, restrict=eval_part)


def _copy_layout(src: Path, dst: Path) -> dict:
    """Copy the COCO layout ``src`` (images, annotations, skipped.csv) into ``dst``."""
    lay = CocoLayout(src)
    shutil.copytree(lay.images_dir, dst / "images")
    shutil.copytree(lay.root / "annotations", dst / "annotations")
    if lay.skipped_path.exists():
        shutil.copyfile(lay.skipped_path, dst / "skipped.csv")
    return {"n_images": len(lay.images), "copied_from": str(src)}


def build_train_layout(params, eval_dir: Path, tmp: Path, cache_dir: Path) -> dict:
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
    if mode == "captions":
        from mmn.data.captions_source import build_captions_layout

        c = params.data.coco
        return build_captions_layout(t.captions, tmp, seed=params.seed, cache_dir=cache_dir,
                                     on_bad_image=params.data.on_bad_image, retries=c.retries, timeout_s=c.timeout_s)
    if source != "coco":  # coco-train
        raise ParamsError(f"projection.train.data: coco-train needs the profile's data_source to be coco "
                          f"(profile {params.profile!r} has {source!r}); use split or eval")
    from mmn.data.coco import download_coco

    return download_coco(params.coco_train, tmp, seed=params.seed, cache_dir=cache_dir,
                         on_bad_image=params.data.on_bad_image)
