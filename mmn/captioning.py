"""Caption every image and pick the target token c (first noun's first token); held-out caption
quality (BERTScore vs own and shuffled references, first noun in the own references)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import polars as pl
from tqdm import tqdm

from mmn.data.layout import CocoLayout
from mmn.distributed import shard_batches
from mmn.metrics.stats import bootstrap_ci, paired_test
from mmn.models.prefix_lm import ImagePrefixLM, stop_token_ids
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
        soft = plm.image_soft_tokens(images)
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


# ------------------------------------------------------------ caption quality

#: per-image caption-quality columns added to captions.parquet by the caption stage
QUALITY_SCHEMA = {
    "bertscore_own": pl.Float64,
    "shuffled_image_id": pl.Int64,
    "bertscore_shuffled": pl.Float64,
    "noun_in_refs": pl.Boolean,
}


class RefScorer(Protocol):
    def mean_f1_over_refs(self, cands: Sequence[str], refs_per_cand: Sequence[Sequence[str]]) -> np.ndarray: ...


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded random permutation of ``range(n)`` with no fixed point (Sattolo's algorithm:
    a uniformly random n-cycle); ``[0]`` for n = 1 (no derangement exists)."""
    perm = np.arange(n)
    rng = np.random.default_rng(seed)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i: Sattolo, never the identity
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def noun_in_refs(noun: str | None, refs: Sequence[str]) -> bool:
    """Whether ``noun`` occurs as a word in any of ``refs``: case-insensitive, whole words, also
    as its plural (+s, +es, y→ies) or singular (-s, -es, ies→y). No noun → False."""
    if not noun or not noun.strip():
        return False
    n = noun.strip().lower()
    if " " in n:  # a multi-word noun: match the phrase
        return any(re.search(rf"\b{re.escape(n)}(s|es)?\b", r.lower()) for r in refs)
    forms = {n, n + "s", n + "es"}
    if n.endswith("y"):
        forms.add(n[:-1] + "ies")
    if len(n) > 3 and n.endswith("ies"):
        forms.add(n[:-3] + "y")
    if len(n) > 2 and n.endswith("s"):
        forms |= {n[:-1]} | ({n[:-2]} if n.endswith("es") else set())
    words = {w for r in refs for w in re.findall(r"[^\W_]+", r.lower())}
    return bool(forms & words)


def caption_quality(
    df: pl.DataFrame, refs: Mapping[int, Sequence[str]], scorer: RefScorer, seed: int, alpha: float = 0.05
) -> tuple[pl.DataFrame, dict, bool]:
    """Held-out caption quality of ``df`` (captions.parquet rows) against the COCO references.

    Per image: BERTScore F1 of the caption averaged over the image's own references (the
    paper's Table 1 score, :meth:`BertScorer.mean_f1_over_refs`), the same against the
    references of ``shuffled_image_id`` (a seeded derangement of the images), and whether the
    first noun occurs in the own references (:func:`noun_in_refs`). Returns the frame with
    :data:`QUALITY_SCHEMA` columns added, the numbers-only metrics (bootstrap CIs over images,
    paired test own vs shuffled, distinct first nouns) and ``informative``: own > shuffled with
    p < ``alpha`` and a CI of the difference above 0.
    """
    ids = df["image_id"].to_list()
    missing = [i for i in ids if not refs.get(i)]
    if missing:
        raise ValueError(f"images without reference captions: {missing[:10]}")
    caps = df["caption"].to_list()
    perm = derangement(len(ids), seed)
    shuf_ids = [ids[j] for j in perm]
    own = np.asarray(scorer.mean_f1_over_refs(caps, [list(refs[i]) for i in ids]), dtype=np.float64)
    shuf = np.asarray(scorer.mean_f1_over_refs(caps, [list(refs[i]) for i in shuf_ids]), dtype=np.float64)
    hit = [noun_in_refs(n, refs[i]) for n, i in zip(df["noun"].to_list(), ids)]
    out = df.with_columns(
        pl.Series("bertscore_own", own, dtype=pl.Float64),
        pl.Series("shuffled_image_id", shuf_ids, dtype=pl.Int64),
        pl.Series("bertscore_shuffled", shuf, dtype=pl.Float64),
        pl.Series("noun_in_refs", hit, dtype=pl.Boolean),
    )
    test = paired_test(own, shuf, seed=seed)
    nouns = {n.strip().lower() for n in df["noun"].drop_nulls().to_list() if n.strip()}
    metrics = {
        "bertscore_own": bootstrap_ci(own, seed=seed),
        "bertscore_shuffled": bootstrap_ci(shuf, seed=seed),
        "own_vs_shuffled": test,
        "noun_in_refs": bootstrap_ci(np.asarray(hit, dtype=np.float64), seed=seed),
        "distinct_nouns": len(nouns),
        "n_images": len(ids),
        "n_with_noun": int(df["has_noun"].sum()),
    }
    informative = test["p"] is not None and test["p"] < alpha and test["lo"] is not None and test["lo"] > 0
    return out, metrics, informative


def caption_report(df: pl.DataFrame, refs: Mapping[int, Sequence[str]], scorer: RefScorer, seed: int,
                   projection_meta: dict) -> tuple[pl.DataFrame, dict, dict, list[str]]:
    """The caption stage's held-out quality: :func:`caption_quality` plus ``(metrics, info, log lines)``.

    ``metrics`` adds ``held_out`` and ``image_information`` (0/1); ``info`` describes the
    scorer, the definitions and the projection's training data; a log line starts with
    "WARNING" when own and shuffled references do not differ significantly, or when the
    projection was trained on the evaluated images (``projection_meta["held_out"]`` false)."""
    held_out = bool(projection_meta.get("held_out", False))
    df, metrics, informative = caption_quality(df, refs, scorer, seed)
    own, shuf, t = metrics["bertscore_own"], metrics["bertscore_shuffled"], metrics["own_vs_shuffled"]
    summary = (f"caption BERTScore vs own references {own['mean']:.3f}, vs shuffled {shuf['mean']:.3f} "
               f"(diff {t['diff']:+.3f}, 95% CI {_fmt(t['lo'])}..{_fmt(t['hi'])}, p {_fmt(t['p'])}, n {t['n']})")
    warning = None
    if not informative:
        warning = ("the captions carry no detectable image information: BERTScore against the image's own "
                   "references is not significantly above shuffled references (p >= 0.05 or the CI of the "
                   "difference includes 0)")
    lines = [f"WARNING: {warning}; {summary}" if warning else summary]
    if not held_out:
        lines.append("WARNING: the projection was trained on these evaluation images (held_out: false)")
    lines.append(f"first noun in the image's own references for {metrics['noun_in_refs']['mean']:.0%} of images; "
                 f"{metrics['distinct_nouns']} distinct first nouns")
    info = {
        "bert_model": scorer.description,
        "score": "BERTScore F1 of the generated caption, mean over the reference captions (paper Table 1)",
        "shuffled": f"references of another image: seeded derangement (Sattolo), seed {seed}",
        "noun_in_refs": "first noun (or its plural/singular: -s, -es, -ies/-y) occurs as a word in one of the image's "
                        "own COCO captions; images without a noun count as misses",
        "held_out": held_out,
        "train_data": projection_meta.get("train_data"),
        "projection_source": projection_meta.get("source"),
        "warning": warning,
        "summary": summary,
    }
    return df, {**metrics, "held_out": int(held_out), "image_information": int(informative)}, info, lines


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"
