"""Caption every image and pick the target token c (first noun's first token)."""

from __future__ import annotations

import polars as pl
from tqdm import tqdm

from mmn.data.layout import CocoLayout
from mmn.distributed import shard_batches
from mmn.models.prefix_lm import ImagePrefixLM, stop_token_ids
from mmn.models.vision import PatchEncoder
from mmn.text import first_noun, token_at_char

CAPTION_SCHEMA = {
    "image_id": pl.Int64,
    "file_name": pl.Utf8,
    "caption": pl.Utf8,
    "caption_token_ids": pl.List(pl.Int64),
    "n_caption_tokens": pl.Int64,
    "has_noun": pl.Boolean,
    "noun": pl.Utf8,
    "target_token_id": pl.Int64,
    "target_token": pl.Utf8,
    "target_pos": pl.Int64,
    "p_target": pl.Float64,
}


def caption_images(
    layout: CocoLayout,
    plm: ImagePrefixLM,
    enc: PatchEncoder,
    *,
    batch_size: int,
    max_new_tokens: int,
    stop_at_newline: bool = True,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> pl.DataFrame:
    """One row per image, sorted by image_id (schema :data:`CAPTION_SCHEMA`).

    ``target_pos`` indexes ``caption_token_ids``; ``p_target`` is the softmax
    probability of c at the step that generated it. Images whose caption has no
    noun keep a row with ``has_noun = False`` and nulls. ``shard=(rank, world)``
    keeps only this rank's batches (:func:`mmn.distributed.shard_batches`).
    """
    tok = plm.tokenizer
    stop = stop_token_ids(tok, plm.adapter.vocab_size, stop_at_newline)
    recs = layout.images
    rows = []
    for idx in tqdm(shard_batches(len(recs), batch_size, shard), desc="caption", disable=not progress):
        chunk = [recs[i] for i in idx]
        images = [layout.load_image(r["id"]) for r in chunk]
        soft = plm.soft_tokens(enc.encode(images))
        ids, probs = plm.generate(soft, max_new_tokens, stop)
        for rec, row_ids, row_p in zip(chunk, ids, probs):
            raw = tok.decode(row_ids)
            noun = first_noun(raw, plm.prompt)
            r = {
                "image_id": rec["id"],
                "file_name": rec["file_name"],
                "caption": raw.strip(),
                "caption_token_ids": row_ids,
                "n_caption_tokens": len(row_ids),
                "has_noun": noun is not None,
                "noun": None,
                "target_token_id": None,
                "target_token": None,
                "target_pos": None,
                "p_target": None,
            }
            if noun is not None:
                pos = token_at_char(row_ids, tok, noun.start)
                r.update(
                    noun=noun.text,
                    target_token_id=row_ids[pos],
                    target_token=tok.decode([row_ids[pos]]),
                    target_pos=pos,
                    p_target=row_p[pos],
                )
            rows.append(r)
    return pl.DataFrame(rows, schema=CAPTION_SCHEMA).sort("image_id")
