"""Stage load_projection: load LiMBeR's proj.ckpt or train a LiMBeR-style projection.

Writes data/projection/ (projection.safetensors + meta.json) and, when training,
data/projection/loss.csv (step, loss) for `dvc plots`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import click

from mmn.cli import StageError, log, stage_main
from mmn.io import atomic_dir
from mmn.params import load_params

NAME = "load_projection"


@click.command(help=__doc__)
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path())
@click.option("--coco", "coco_dir", default="data/coco", show_default=True, type=click.Path())
@click.option("--out", "out_dir", default="data/projection", show_default=True, type=click.Path())
@click.option("--ckpt", default=None, type=click.Path(),
              help="local LiMBeR proj.ckpt (overrides the profile's limber_url)")
@stage_main(NAME)
def main(params_path: str, coco_dir: str, out_dir: str, ckpt: str | None) -> None:
    from mmn.data.layout import CocoLayout
    from mmn.models.projection import load_limber, save_projection
    from mmn.pipeline import build_encoder, build_lm, seed_everything
    from mmn.projection_training import train_from_layout

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
            path = Path(src) if Path(src).exists() else _fetch(src, Path(".cache/limber"))
            lin = load_limber(path, enc.dim, adapter.d_model)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            save_projection(tmp, lin, {"source": "limber", "checkpoint": str(src), "sha256": digest})
            log(NAME, f"loaded LiMBeR projection {src} (sha256 {digest[:12]})")
        else:
            lin, losses, meta = train_from_layout(CocoLayout(Path(coco_dir)), adapter, tok, enc, params)
            save_projection(tmp, lin, meta)
            (tmp / "loss.csv").write_text("step,loss\n" + "".join(f"{i},{v:.6f}\n" for i, v in enumerate(losses)))
            log(NAME, f"trained projection: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    log(NAME, f"wrote {out_dir}/")


def _fetch(url: str, cache: Path) -> Path:
    """Download a checkpoint URL once into the cache (paper profile; needs internet)."""
    import requests

    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / hashlib.sha1(url.encode()).hexdigest()[:12] / Path(url).name
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        r = requests.get(url, timeout=120)
        r.raise_for_status()
    except requests.RequestException as err:
        raise StageError(f"cannot download LiMBeR checkpoint {url}: {err}") from None
    part = dest.with_suffix(".part")
    part.write_bytes(r.content)
    part.rename(dest)
    return dest


if __name__ == "__main__":
    main()
