"""Stage caption: greedy captions, first noun (spaCy) and target token c per image.

Writes data/captions.parquet (image_id, caption, noun, target token id/text/position,
p(target), ...); images whose caption has no noun are kept with has_noun = false.
Held-out caption quality on the evaluation images: per image, BERTScore of the caption
vs its own COCO references and vs a shuffled image's (seeded derangement), and whether
the first noun occurs in its own references; bootstrap CIs and the paired test go to
summary/captions.json (headline: metrics/captions.json), model names and warnings to
data/info/caption.json. A line starting "WARNING" is logged when own and shuffled do not differ significantly.
"""

from __future__ import annotations

from mmn.runner import Run, stage


@stage("caption")
def main(run: Run) -> None:
    import torch

    from mmn.captioning import caption_images, caption_report
    from mmn.data.layout import CocoLayout
    from mmn.distributed import distributed, gather_frames
    from mmn.headline import headline
    from mmn.io import read_json
    from mmn.metrics.bertscore import BertScorer
    from mmn.pipeline import build_prefix_lm
    from mmn.quality import check_captions

    params, c = run.params, run.params.caption
    layout = CocoLayout(run.path("coco"))
    with distributed() as info:
        plm = build_prefix_lm(params, run.path("projection"), plant=run.path("plant"))
        with torch.inference_mode():
            part = caption_images(layout, plm, batch_size=c.batch_size, max_new_tokens=c.max_new_tokens,
                                  stop_at_newline=c.stop_at_newline, progress=info.is_main, shard=info.shard)
        df = gather_frames(part, info)
    if not info.is_main:
        return
    if info.world > 1:
        run.log(f"merged {info.world} shards")
    scorer = BertScorer.from_profile(params, plm.adapter.device, plm.adapter.dtype)
    df, metrics, desc, lines = caption_report(df.sort("image_id"), layout.captions, scorer, params.seed,
                                              read_json(run.path("projection") / "meta.json"))
    check_captions(df, with_quality=True)
    run.write_parquet("out", df)
    run.write_metrics(metrics, headline)
    run.write_info(desc)
    for line in lines:
        run.log(line)
    n_noun = int(df["has_noun"].sum())
    run.log(f"{df.height} captions, {n_noun} with a noun, {df.height - n_noun} without; wrote {run.wrote()}")
    for r in df.head(3).iter_rows(named=True):
        run.log(f"  {r['image_id']}: {r['caption']!r} -> c={r['target_token']!r} p={r['p_target']}")


if __name__ == "__main__":
    main()
