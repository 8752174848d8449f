"""Stage caption: greedy captions, first noun (spaCy) and target token c per image.

Writes data/captions.parquet (image_id, caption, noun, target token id/text/position,
p(target), ...); images whose caption has no noun are kept with has_noun = false.
"""

from __future__ import annotations

from pathlib import Path

import click

from mmn.cli import log, stage_main
from mmn.io import write_parquet
from mmn.params import load_params

NAME = "caption"


@click.command(help=__doc__)
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path())
@click.option("--coco", "coco_dir", default="data/coco", show_default=True, type=click.Path())
@click.option("--projection", "proj_dir", default="data/projection", show_default=True, type=click.Path())
@click.option("--out", default="data/captions.parquet", show_default=True, type=click.Path())
@stage_main(NAME)
def main(params_path: str, coco_dir: str, proj_dir: str, out: str) -> None:
    import torch

    from mmn.captioning import caption_images
    from mmn.data.layout import CocoLayout
    from mmn.distributed import distributed, gather_frames
    from mmn.pipeline import build_prefix_lm, seed_everything
    from mmn.quality import check_captions

    params = load_params(params_path)
    seed_everything(params.seed)
    c = params.caption
    with distributed() as info:
        plm, enc = build_prefix_lm(params, Path(proj_dir))
        with torch.inference_mode():
            part = caption_images(
                CocoLayout(Path(coco_dir)), plm, enc, batch_size=c.batch_size, max_new_tokens=c.max_new_tokens,
                stop_at_newline=c.stop_at_newline, progress=info.is_main, shard=info.shard,
            )
        df = gather_frames(part, info)
    if not info.is_main:
        return
    df = df.sort("image_id")
    if info.world > 1:
        log(NAME, f"merged {info.world} shards")
    check_captions(df)
    write_parquet(df, out)
    n_noun = int(df["has_noun"].sum())
    log(NAME, f"{df.height} captions, {n_noun} with a noun, {df.height - n_noun} without; wrote {out}")
    for r in df.head(3).iter_rows(named=True):
        log(NAME, f"  {r['image_id']}: {r['caption']!r} -> c={r['target_token']!r} p={r['p_target']}")


if __name__ == "__main__":
    main()
