"""Stage load_projection: load LiMBeR's proj.ckpt or train a LiMBeR-style projection.

Training reads the training layout data/coco_train/ (stage download_train; its
split.json says whether it is held out from the evaluation images), holds out a
seeded validation split of it, and keeps the checkpoint of the lowest validation loss.
Writes data/projection/ (projection.safetensors + meta.json, and when training
loss.csv: step, train_loss, val_loss for `dvc plots`) and metrics/projection.json.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import click

from mmn.cli import StageError, log, stage_main
from mmn.io import atomic_dir, write_json
from mmn.params import load_params

NAME = "load_projection"
#: where LiMBeR checkpoints from a URL are cached, and how they are fetched
LIMBER_CACHE = Path(".cache/limber")
CKPT_RETRIES = 3
CKPT_TIMEOUT_S = 120.0


@click.command(help=__doc__)
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path())
@click.option("--coco", "coco_dir", default="data/coco", show_default=True, type=click.Path(),
              help="the evaluation layout (checked for overlap with the training images)")
@click.option("--train", "train_dir", default="data/coco_train", show_default=True, type=click.Path(),
              help="the training layout (with split.json)")
@click.option("--out", "out_dir", default="data/projection", show_default=True, type=click.Path())
@click.option("--metrics", "metrics_out", default="metrics/projection.json", show_default=True, type=click.Path())
@click.option("--ckpt", default=None, type=click.Path(),
              help="local LiMBeR proj.ckpt (overrides the profile's limber_url)")
@stage_main(NAME)
def main(params_path: str, coco_dir: str, train_dir: str, out_dir: str, metrics_out: str, ckpt: str | None) -> None:
    from mmn.data.layout import CocoLayout
    from mmn.models.projection import load_limber, save_projection
    from mmn.pipeline import build_encoder, build_lm, seed_everything
    from mmn.projection_training import loss_csv, train_from_layout

    params = load_params(params_path)
    seed_everything(params.seed)
    m = params.model
    adapter, tok = build_lm(params)
    enc = build_encoder(params)
    with atomic_dir(out_dir) as tmp:
        if m.projection == "limber" or ckpt:
            src = ckpt or m.limber_url
            if not src:
                raise StageError(f"{params_path}: profiles.{params.profile}.limber_url is not set")
            path = Path(src) if Path(src).exists() else fetch_checkpoint(src)
            lin = load_limber(path, enc.dim, adapter.d_model)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            # LiMBeR trained on CC3M: disjoint from the COCO images evaluated here
            meta = {"source": "limber", "checkpoint": str(src), "sha256": digest, "held_out": True,
                    "train_data": "CC3M (LiMBeR)"}
            save_projection(tmp, lin, meta)
            log(NAME, f"loaded LiMBeR projection {src} (sha256 {digest[:12]})")
        else:
            split = read_split(Path(train_dir))
            layout = CocoLayout(Path(train_dir))
            check_disjoint(layout, CocoLayout(Path(coco_dir)), split)
            if not split["held_out"]:
                log(NAME, f"WARNING: the projection is trained on the evaluated images (projection.train.data: "
                          f"{split['mode']}); held_out: false - every downstream effect is partly memorisation")
            proj, res, meta = train_from_layout(layout, adapter, tok, enc, params)
            meta.update(held_out=bool(split["held_out"]), train_data=split["mode"])
            save_projection(tmp, proj, meta)
            (tmp / "loss.csv").write_text(loss_csv(res.history))
            _log_training(res, meta)
    write_json(projection_metrics(meta), metrics_out)
    log(NAME, f"wrote {out_dir}/ and {metrics_out}")


def read_split(train_dir: Path) -> dict:
    """``train_dir/split.json`` (written by download_train), checked by
    :func:`mmn.data.split.read_split_info` (SplitError names the file and key)."""
    from mmn.data.split import read_split_info

    return read_split_info(train_dir).to_json()


def check_disjoint(train, evaluation, split: dict) -> None:
    """A held-out training layout must share no image id with the evaluation layout."""
    if not split["held_out"] or not evaluation.instances_path.exists():
        return
    shared = sorted({r["id"] for r in train.images} & {r["id"] for r in evaluation.images})
    if shared:
        raise StageError(f"{train.root}/split.json says held_out but {len(shared)} training image id(s) are "
                         f"also in {evaluation.root}: {shared[:10]}")


def _log_training(res, meta: dict) -> None:
    h = res.history
    log(NAME, f"trained projection on {meta['n_train_images']} images ({meta['n_views']} views), "
              f"{meta['n_val_images']} validation images; {res.steps_run} steps"
              f"{' (stopped early)' if res.stopped_early else ''}; train loss {h[0]['train_loss']:.3f} -> "
              f"{h[-1]['train_loss']:.3f}")
    if res.best_val_loss is None:
        log(NAME, "WARNING: no validation split (projection.train.val_fraction: 0 or one image): kept the last step")
        return
    log(NAME, f"validation loss {res.initial_val_loss:.3f} (untrained) -> best {res.best_val_loss:.3f} at step "
              f"{res.best_step} (kept)")
    if res.best_step == 0:
        log(NAME, "WARNING: the validation loss never fell below the untrained projection's; the projection "
                  "carries no learned image information")


def projection_metrics(meta: dict) -> dict:
    """Numbers-only summary for metrics/projection.json (null where not applicable)."""
    keys = ("n_train_images", "n_val_images", "steps_run", "best_step", "best_val_loss", "initial_val_loss")
    out = {k: meta.get(k) for k in keys}
    out["held_out"] = int(bool(meta.get("held_out")))
    return out


def fetch_checkpoint(url: str, cache: Path = LIMBER_CACHE) -> Path:
    """Download a checkpoint URL once into ``cache/<12 hex of sha1(url)>/<file name>`` (paper
    profile; needs internet) through :func:`mmn.download.download`: resumed from its ``.part``
    after an interruption, retried with backoff. No sha1 is checked (params name none); the
    stage records the file's sha256 in meta.json."""
    from mmn.download import download

    dest = Path(cache) / hashlib.sha1(url.encode()).hexdigest()[:12] / Path(url).name
    return download(url, dest, retries=CKPT_RETRIES, timeout=CKPT_TIMEOUT_S, what="LiMBeR checkpoint",
                    show_bar=True)


if __name__ == "__main__":
    main()
