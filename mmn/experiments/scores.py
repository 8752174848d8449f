"""Table 1 (decoded units vs images), Table 2 (decoded image prompts) and KS tests.

Table 1, per image: each of its top ``top_units`` distinct units' decoded token list
(comma-joined) is scored — BERTScore F1 as the mean over the image's COCO captions,
CLIPScore against the image — and the image keeps the max over its units; the table
reports the mean over images. Rows: all top units, interpretable ones only, random
pairing (each image scored with another image's units; ``random_draws`` seeded
derangements), the model's own captions, and COCO nouns (the nouns of the image's
human captions, comma-joined).

Table 2: each soft token (image prompt) is decoded to its ``prompt_neighbours``
nearest input-embedding rows (cosine) and scored like above, one score per prompt;
random vectors matched to the embedding statistics give the baseline. KS two-sample
tests compare the per-prompt score distributions (real vs random prompts; prompts vs
COCO nouns).

CLIPScore is computed only when a CLIP scorer is given; otherwise every CLIPScore
entry is the string ``"not computed: <reason>"``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import polars as pl
import torch
from PIL import Image

from mmn.metrics.bertscore import BertScorer
from mmn.metrics.clipscore import ClipScorer
from mmn.metrics.stats import ks_2samp, nearest_tokens, random_like_embeddings
from mmn.models.prefix_lm import ImagePrefixLM
from mmn.models.vision import PatchEncoder
from mmn.text import nouns

SCORE_SCHEMA = {
    "table": pl.Utf8,
    "item": pl.Utf8,
    "image_id": pl.Int64,
    "index": pl.Int64,
    "text": pl.Utf8,
    "bertscore": pl.Float64,
    "clipscore": pl.Float64,
}


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation with no fixed point (n >= 2)."""
    if n < 2:
        raise ValueError("random pairing needs at least 2 images")
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return p


class _Scorer:
    """Caches image embeddings and batches BERTScore/CLIPScore calls."""

    def __init__(self, bert: BertScorer, clip: ClipScorer | None, load_image: Callable[[int], Image.Image]):
        self.bert, self.clip, self.load_image = bert, clip, load_image
        self._img: dict[int, torch.Tensor] = {}

    def score(self, texts: list[str], refs: list[list[str]], image_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        b = self.bert.mean_f1_over_refs(texts, refs) if texts else np.zeros(0)
        if self.clip is None or not texts:
            return b, np.full(len(texts), np.nan)
        for i in set(image_ids) - set(self._img):
            self._img[i] = self.clip.image_embeddings([self.load_image(i)])[0]
        img = torch.stack([self._img[i] for i in image_ids])
        txt = self.clip.text_embeddings(texts)
        return b, self.clip.pair_scores(img, txt)


def score_tables(
    captions: pl.DataFrame,
    attributions: pl.DataFrame,
    neurons: pl.DataFrame,
    refs: dict[int, list[str]],
    load_image: Callable[[int], Image.Image],
    plm: ImagePrefixLM,
    enc: PatchEncoder,
    bert: BertScorer,
    clip: ClipScorer | None,
    *,
    top_units: int,
    random_draws: int,
    prompt_neighbours: int,
    seed: int,
) -> pl.DataFrame:
    """Long table of every scored text (schema :data:`SCORE_SCHEMA`)."""
    sc = _Scorer(bert, clip, load_image)
    rows: list[dict] = []

    def add(table: str, item: str, ids: list[int], idx: list[int], texts: list[str]) -> None:
        b, c = sc.score(texts, [refs[i] for i in ids], ids)
        for i, j, t, bv, cv in zip(ids, idx, texts, b, c):
            rows.append({"table": table, "item": item, "image_id": i, "index": j, "text": t,
                         "bertscore": float(bv), "clipscore": None if np.isnan(cv) else float(cv)})

    images = sorted(set(attributions["image_id"].to_list()))
    dec = neurons.select("layer", "unit", "decoded", "interpretable")
    top = (attributions.sort(["image_id", "rank"]).unique(subset=["image_id", "layer", "unit"], keep="first",
                                                         maintain_order=True)
           .group_by("image_id", maintain_order=True).head(top_units).join(dec, on=["layer", "unit"], how="left"))
    units_of = {i: top.filter(pl.col("image_id") == i) for i in images}

    # Table 1: every top unit of every image (max over units is taken in the summary)
    for item, only_int in (("multimodal_all", False), ("multimodal_interpretable", True)):
        ids, idx, texts = [], [], []
        for i in images:
            u = units_of[i].filter(pl.col("interpretable")) if only_int else units_of[i]
            for j, t in enumerate(u["decoded"].to_list()):
                ids.append(i), idx.append(j), texts.append(t)
        add("table1", item, ids, idx, texts)
    rng = np.random.default_rng(seed)
    if len(images) >= 2:
        for d in range(random_draws):
            perm = derangement(len(images), rng)
            ids, idx, texts = [], [], []
            for a, b in zip(images, perm):
                for j, t in enumerate(units_of[images[b]]["decoded"].to_list()):
                    ids.append(a), idx.append(d * 10_000 + j), texts.append(t)
            add("table1", "random_pairing", ids, idx, texts)
    caps = captions.filter(pl.col("image_id").is_in(images)).sort("image_id")
    add("table1", "captions", caps["image_id"].to_list(), [0] * caps.height, caps["caption"].to_list())
    noun_text = {i: ", ".join(dict.fromkeys(n for r in refs[i] for n in nouns(r))) for i in images}
    add("table1", "coco_nouns", images, [0] * len(images), [noun_text[i] for i in images])

    # Table 2: decoded image prompts vs random vectors
    emb = plm.adapter.embed.weight.detach().float()
    tok = plm.tokenizer
    ids, idx, texts, n_prompts = [], [], [], 0
    for i in images:
        with torch.no_grad():
            soft = plm.soft_tokens(enc.encode([load_image(i)]))[0].float()
        near, _ = nearest_tokens(soft, emb, k=prompt_neighbours)
        n_prompts = soft.shape[0]
        for j, row in enumerate(near.tolist()):
            ids.append(i), idx.append(j), texts.append(", ".join(tok.decode([t]).strip() for t in row))
    add("table2", "prompts", ids, idx, texts)
    rnd = random_like_embeddings(emb, n_prompts * len(images), seed)
    near, _ = nearest_tokens(rnd, emb, k=prompt_neighbours)
    texts = [", ".join(tok.decode([t]).strip() for t in row) for row in near.tolist()]
    ids = [i for i in images for _ in range(n_prompts)]
    add("table2", "random_prompts", ids, list(range(len(ids))), texts)
    return pl.DataFrame(rows, schema=SCORE_SCHEMA)


def summarise(df: pl.DataFrame, clip_reason: str | None, bert_desc: str, clip_desc: str | None) -> dict:
    """Table 1/2 means and KS tests; CLIPScore entries are a 'not computed' string when absent."""
    nc = "not computed: no CLIP weights (reason in models.clipscore)" if clip_reason else None

    def entry(sub: pl.DataFrame, per_image_max: bool) -> dict:
        if sub.height == 0:
            return {"bertscore": None, "clipscore": nc, "n": 0}
        if per_image_max:
            b = sub.group_by("image_id").agg(pl.col("bertscore").max())["bertscore"]
            c = sub.group_by("image_id").agg(pl.col("clipscore").max())["clipscore"]
            n = b.len()
        else:
            b, c, n = sub["bertscore"], sub["clipscore"], sub.height
        return {"bertscore": round(float(b.mean()), 6),
                "clipscore": nc if nc else round(float(c.mean()), 4), "n": int(n)}

    t1 = df.filter(pl.col("table") == "table1")
    t2 = df.filter(pl.col("table") == "table2")
    out = {"table1": {}, "table2": {}, "ks": {},
           "models": {"bertscore": bert_desc, "clipscore": clip_desc or f"not computed: {clip_reason}"}}
    for item in ("multimodal_all", "multimodal_interpretable", "captions", "coco_nouns"):
        out["table1"][item] = entry(t1.filter(pl.col("item") == item), per_image_max=True)
    rp = t1.filter(pl.col("item") == "random_pairing")
    # random pairing: per draw, per image max; then mean over draws
    if rp.height:
        rp = rp.with_columns((pl.col("index") // 10_000).alias("draw"))
        b = rp.group_by(["draw", "image_id"]).agg(pl.col("bertscore").max())["bertscore"].mean()
        c = rp.group_by(["draw", "image_id"]).agg(pl.col("clipscore").max())["clipscore"].mean()
        out["table1"]["random_pairing"] = {"bertscore": round(float(b), 6),
                                           "clipscore": nc if nc else round(float(c), 4),
                                           "n": int(rp["draw"].n_unique())}
    else:
        out["table1"]["random_pairing"] = {"bertscore": None, "clipscore": nc, "n": 0}
    for item in ("prompts", "random_prompts"):
        out["table2"][item] = entry(t2.filter(pl.col("item") == item), per_image_max=False)
    for item in ("captions", "coco_nouns"):
        out["table2"][item] = out["table1"][item]
    p = t2.filter(pl.col("item") == "prompts")
    r = t2.filter(pl.col("item") == "random_prompts")
    nn_ = t1.filter(pl.col("item") == "coco_nouns")
    for metric in ("bertscore", "clipscore"):
        if metric == "clipscore" and nc:
            out["ks"][f"prompts_vs_random_{metric}"] = nc
            out["ks"][f"prompts_vs_coco_nouns_{metric}"] = nc
            continue
        if p.height and r.height:
            out["ks"][f"prompts_vs_random_{metric}"] = _round(ks_2samp(p[metric], r[metric]))
        if p.height and nn_.height:
            out["ks"][f"prompts_vs_coco_nouns_{metric}"] = _round(ks_2samp(p[metric], nn_[metric]))
    return out


def _round(d: dict) -> dict:
    return {k: float(f"{v:.6g}") for k, v in d.items()}
