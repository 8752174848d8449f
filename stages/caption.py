"""Stage caption: greedy captions, first noun (spaCy) and target token c per image.

Writes data/captions.parquet (image_id, caption, noun, target token id/text/position,
p(target), ...); images whose caption has no noun are kept with has_noun = false.
Held-out caption quality on the evaluation images: per image, BERTScore of the caption
vs its own COCO references and vs a shuffled image's (seeded derangement), and whether
the first noun occurs in its own references; bootstrap CIs and the paired test go to
metrics/captions.json, model names and warnings to data/info/caption.json. A line
starting "WARNING" is logged when own and shuffled do not differ significantly.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from mmn.cli import log, stage_main
from mmn.io import read_json, write_json, write_parquet
from mmn.params import load_params

NAME = "caption"


@click.command(help=__doc__)
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path())
@click.option("--coco", "coco_dir", default="data/coco", show_default=True, type=click.Path())
@click.option("--projection", "proj_dir", default="data/projection", show_default=True, type=click.Path())
@click.option("--out", default="data/captions.parquet", show_default=True, type=click.Path())
@click.option("--metrics", "metrics_out", default="metrics/captions.json", show_default=True, type=click.Path())
@click.option("--info", "info_out", default="data/info/caption.json", show_default=True, type=click.Path())
@stage_main(NAME)
def main(params_path: str, coco_dir: str, proj_dir: str, out: str, metrics_out: str, info_out: str) -> None:
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
        plm = build_prefix_lm(params, Path(proj_dir))
        with torch.inference_mode():
            part = caption_images(
                CocoLayout(Path(coco_dir)), plm, batch_size=c.batch_size, max_new_tokens=c.max_new_tokens,
                stop_at_newline=c.stop_at_newline, progress=info.is_main, shard=info.shard,
            )
        df = gather_frames(part, info)
    if not info.is_main:
        return
    df = df.sort("image_id")
    if info.world > 1:
        log(NAME, f"merged {info.world} shards")
    df = _quality(df, CocoLayout(Path(coco_dir)), Path(proj_dir), params, plm.adapter.device, metrics_out, info_out,
                  dtype=plm.adapter.dtype)
    check_captions(df, with_quality=True)
    write_parquet(df, out)
    n_noun = int(df["has_noun"].sum())
    log(NAME, f"{df.height} captions, {n_noun} with a noun, {df.height - n_noun} without; wrote {out}")
    for r in df.head(3).iter_rows(named=True):
        log(NAME, f"  {r['image_id']}: {r['caption']!r} -> c={r['target_token']!r} p={r['p_target']}")


def _quality(df, layout, proj_dir: Path, params, device, metrics_out: str, info_out: str,
             dtype=None):
    """Score the captions against the references (see module doc); write metrics + info JSON."""
    from mmn.captioning import caption_quality
    from mmn.metrics.bertscore import BertScorer

    m = params.model
    meta = read_json(proj_dir / "meta.json")
    held_out = bool(meta.get("held_out", False))
    scorer = BertScorer.from_params(m.bert_model, m.bert_layers, device=device, dtype=dtype)
    df, metrics, informative = caption_quality(df, layout.captions, scorer, params.seed)
    own, shuf, t = metrics["bertscore_own"], metrics["bertscore_shuffled"], metrics["own_vs_shuffled"]
    summary = (f"caption BERTScore vs own references {own['mean']:.3f}, vs shuffled {shuf['mean']:.3f} "
               f"(diff {t['diff']:+.3f}, 95% CI {_fmt(t['lo'])}..{_fmt(t['hi'])}, p {_fmt(t['p'])}, n {t['n']})")
    warning = None
    if not informative:
        warning = ("the captions carry no detectable image information: BERTScore against the image's own "
                   "references is not significantly above shuffled references (p >= 0.05 or the CI of the "
                   "difference includes 0)")
        log(NAME, f"WARNING: {warning}; {summary}")
    else:
        log(NAME, summary)
    if not held_out:
        log(NAME, "WARNING: the projection was trained on these evaluation images (held_out: false)")
    noun = metrics["noun_in_refs"]
    log(NAME, f"first noun in the image's own references for {noun['mean']:.0%} of images; "
              f"{metrics['distinct_nouns']} distinct first nouns")
    write_json({**metrics, "held_out": int(held_out), "image_information": int(informative)}, metrics_out)
    write_json({
        "bert_model": scorer.description,
        "score": "BERTScore F1 of the generated caption, mean over the reference captions (paper Table 1)",
        "shuffled": f"references of another image: seeded derangement (Sattolo), seed {params.seed}",
        "noun_in_refs": "first noun (or its plural/singular: -s, -es, -ies/-y) occurs as a word in one of the image's "
                        "own COCO captions; images without a noun count as misses",
        "held_out": held_out,
        "train_data": meta.get("train_data"),
        "projection_source": meta.get("source"),
        "warning": warning,
        "summary": summary,
    }, info_out)
    return df


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


if __name__ == "__main__":
    main()
