"""Fig. 6: ablate the top-k units by attribution and measure p(c) and the caption.

Per image with a target c: one attribution pass ranks units by max-over-patches g;
three kinds of unit sets are ablated at the image positions for every k:
``unfiltered`` (top k), ``filtered`` (top k among interpretable units) and ``random``
(as many units per layer as the unfiltered top k, seeded by image and k). All rows
of an image (plus one clean row giving p_clean) are one batched forward pass and one
batched generation. k is capped at the number of units available for that kind
(``k_effective``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import polars as pl
import torch
from PIL import Image
from tqdm import tqdm

from mmn.models.prefix_lm import ImagePrefixLM, stop_token_ids
from mmn.models.vision import PatchEncoder
from mmn.neurons.ablation import (
    ablated_captions,
    random_like,
    rank_units,
    target_probs,
    unit_masks,
    unit_scores,
)
from mmn.neurons.attribution import attribution_maps

ABLATION_SCHEMA = {
    "image_id": pl.Int64,
    "kind": pl.Utf8,
    "k": pl.Int64,
    "k_effective": pl.Int64,
    "p_target": pl.Float64,
    "p_clean": pl.Float64,
    "rel_drop": pl.Float64,
    "caption": pl.Utf8,
    "caption_changed": pl.Boolean,
}

KINDS = ("unfiltered", "filtered", "random")


def ablate_images(
    captions: pl.DataFrame,
    load_image: Callable[[int], Image.Image],
    plm: ImagePrefixLM,
    enc: PatchEncoder,
    interpretable: torch.Tensor,
    *,
    ks: Sequence[int],
    mode: str = "zero",
    kinds: Sequence[str] = KINDS,
    max_new_tokens: int = 16,
    regenerate: bool = True,
    seed: int = 0,
    progress: bool = True,
    layers: Sequence[int] | None = None,
    shard: tuple[int, int] = (0, 1),
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> pl.DataFrame:
    """One row per (image, kind, k). ``interpretable``: ``Bool[Tensor, "layers d_mlp"]``.

    ``layers`` restricts the ranked (and so the random) units to those layers, as
    ``attribute.layers`` does for attribution. ``shard=(rank, world)`` keeps every
    ``world``-th image; ``reduce_sum`` sums a tensor over ranks (for the mean fill,
    accumulated in float64). ``zero``: one pass, each image ranked and ablated in turn;
    ``mean``: two passes (the fill needs all images first), keeping only the top
    ``max(ks)`` units per image in between, so memory stays flat in the image count.
    """
    from mmn.distributed import shard_batches

    ad = plm.adapter
    allowed = torch.zeros(ad.n_layers, ad.d_mlp, dtype=torch.bool)
    allowed[list(range(ad.n_layers)) if layers is None else list(layers)] = True
    recs = list(captions.filter(pl.col("has_noun")).sort("image_id").iter_rows(named=True))
    todo = [recs[b[0]] for b in shard_batches(len(recs), 1, shard)]
    stop = stop_token_ids(plm.tokenizer, ad.vocab_size, True)
    top = max(ks)

    def soft_of(r: dict) -> torch.Tensor:
        with torch.no_grad():
            return plm.soft_tokens(enc.encode([load_image(r["image_id"])]))

    def rank(r: dict, soft: torch.Tensor) -> tuple[list, list, torch.Tensor]:
        """Top ``max(ks)`` units (all allowed, interpretable allowed) and A's mean over positions."""
        text = list(r["caption_token_ids"][: r["target_pos"]])
        _, a, grad = attribution_maps(plm, soft, [text], [int(r["target_token_id"])])
        scores = unit_scores(a[0], grad[0])
        return (rank_units(scores, allowed, limit=top), rank_units(scores, allowed & interpretable, limit=top),
                a[0].mean(dim=1))

    def ablate_one(r: dict, soft: torch.Tensor, order_all: list, order_int: list, fill) -> list[dict]:
        """Every (kind, k) row of one image: one batched forward (+ one batched generation)."""
        text = list(r["caption_token_ids"][: r["target_pos"]])
        sets: list[list[tuple[int, int]]] = [[]]  # row 0: nothing ablated (p_clean)
        meta = []
        for kind in kinds:
            for k in ks:
                if kind == "unfiltered":
                    units = order_all[:k]
                elif kind == "filtered":
                    units = order_int[:k]
                else:
                    rng = np.random.default_rng([seed, int(r["image_id"]), int(k)])
                    units = random_like(order_all[:k], ad.d_mlp, rng)
                sets.append(units)
                meta.append((kind, k, len(units)))
        masks = unit_masks(sets, ad.n_layers, ad.d_mlp)
        p_all = target_probs(plm, soft, text, int(r["target_token_id"]), masks, fill).tolist()
        p_clean, p = p_all[0], p_all[1:]
        caps = (ablated_captions(plm, soft, masks[:, 1:], max_new_tokens, stop, fill) if regenerate
                else [None] * len(meta))
        clean = list(r["caption_token_ids"])
        return [{
            "image_id": r["image_id"], "kind": kind, "k": k, "k_effective": k_eff, "p_target": pk,
            "p_clean": p_clean, "rel_drop": (p_clean - pk) / p_clean if p_clean > 0 else 0.0,
            "caption": None if cap is None else plm.tokenizer.decode(cap).strip(),
            "caption_changed": None if cap is None else cap != clean,
        } for (kind, k, k_eff), pk, cap in zip(meta, p, caps)]

    rows: list[dict] = []
    if mode != "mean":
        for r in tqdm(todo, desc="ablate", disable=not progress):
            soft = soft_of(r)
            order_all, order_int, _ = rank(r, soft)
            rows += ablate_one(r, soft, order_all, order_int, None)
    else:
        # the fill needs every image's activations (over all ranks) first: pass 1 ranks and
        # sums, keeping only the top max(ks) units per image; pass 2 recomputes the soft tokens
        ranked, acc = [], torch.zeros(ad.n_layers, ad.d_mlp, dtype=torch.float64)
        for r in tqdm(todo, desc="ablate: rank units", disable=not progress):
            order_all, order_int, a_mean = rank(r, soft_of(r))
            acc += a_mean.cpu().double()
            ranked.append((order_all, order_int))
        n = reduce_sum(torch.tensor([float(len(todo))], dtype=torch.float64))
        fill = (reduce_sum(acc) / n.clamp(min=1)).float()
        for r, (order_all, order_int) in tqdm(list(zip(todo, ranked)), desc="ablate", disable=not progress):
            rows += ablate_one(r, soft_of(r), order_all, order_int, fill)
    return pl.DataFrame(rows, schema=ABLATION_SCHEMA).sort(["image_id", "kind", "k"])


def ablation_summary(df: pl.DataFrame) -> dict:
    """Mean relative drop of p(c), mean p(c) and (if present) BERTScore per kind and k."""
    out: dict = {}
    agg = [pl.col("rel_drop").mean().alias("rel_drop"), pl.col("p_target").mean().alias("p"),
           pl.col("k_effective").mean().alias("k_effective")]
    if "bertscore_f1" in df.columns:
        agg.append(pl.col("bertscore_f1").mean().alias("bertscore_f1"))
    for row in df.group_by(["kind", "k"]).agg(agg).sort(["kind", "k"]).iter_rows(named=True):
        out.setdefault(row["kind"], {})[f"k{row['k']}"] = {
            key: round(float(row[key]), 6) for key in row if key not in ("kind", "k") and row[key] is not None
        }
    return out
