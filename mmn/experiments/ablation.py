"""Fig. 6: ablate the top-k units by attribution and measure p(c) and the caption.

Paper (§4.3): "we successively ablate units sorted by g_{k,c} and measure the resulting
change in the probability of token c ... for multimodal neurons (filtered and unfiltered
for interpretability), and randomly selected units in the same layers."

Per image with a target c: one attribution pass ranks units by max-over-patches g;
four kinds of unit sets are ablated at the image positions for every k:
``unfiltered`` (top k), ``filtered`` (top k among interpretable units), ``random`` and
``random_filtered``. Each random kind is the first k of ONE random ranking per image
(:func:`mmn.neurons.ablation.random_ranking`: nested across k) with the layer mix of the
ranking it is compared with: ``random`` that of the unfiltered top units, ``random_filtered``
that of the interpretable top units (so also their k_effective). Random units are never the
image's own top units (unfiltered or interpretable, up to max(ks)): per-layer draws in the
few early layers that hold the top units would otherwise largely coincide with them at large
k. ``overlap_if_not_excluded`` records, per random row, the share of the same draw without
that exclusion that were top units. All rows of an image (plus one clean row giving p_clean)
are one batched forward pass and one batched generation. k is capped at the number of units
available for that kind (``k_effective``); a random set whose layers run out of non-top
units is smaller than its partner's, and the paired test leaves such images out.

Two summaries of the drop of p(c) (:func:`ablation_curve`): the mean over images of the
per-image relative drop ``1 - p_k/p_clean`` (it can swing negative when ablation raises
p(c) on some images) and the relative drop of the mean ``1 - mean(p_k)/mean(p_clean)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from PIL import Image
from tqdm import tqdm

from mmn.models.prefix_lm import ImagePrefixLM, stop_token_ids
from mmn.neurons.ablation import (
    ablated_captions,
    random_ranking,
    rank_units,
    target_probs,
    unit_masks,
)
from mmn.neurons.attribution import attribution_maps
from mmn.neurons.scoring import Aggregate, unit_scores

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
    "overlap_if_not_excluded": pl.Float64,
}

KINDS = ("unfiltered", "filtered", "random", "random_filtered")
PARTNER = {"unfiltered": "random", "filtered": "random_filtered"}  # each top kind's random control


Unit = tuple[int, int]  # (layer, unit)


@dataclass
class _ImageAblation:
    """What every image of one ``ablate_images`` run shares; one method per step."""

    plm: ImagePrefixLM
    allowed: torch.Tensor  # Bool[Tensor, "layers d_mlp"]: units that may be ranked
    interpretable: torch.Tensor  # Bool[Tensor, "layers d_mlp"]
    ks: Sequence[int]
    kinds: Sequence[str]
    stop: set[int]
    max_new_tokens: int
    regenerate: bool
    seed: int
    preactivation: bool = False
    aggregate: Aggregate = "max"

    @staticmethod
    def text(r: dict) -> list[int]:
        """The caption tokens before the target c."""
        return list(r["caption_token_ids"][: r["target_pos"]])

    def rank(self, r: dict, soft: torch.Tensor) -> tuple[list[Unit], list[Unit], torch.Tensor]:
        """Top ``max(ks)`` units (all allowed, interpretable allowed) and A's mean over positions
        (with ``preactivation`` the units are ranked by Z·dy/dZ, as ``attribute`` ranks them, and
        the mean is Z's: the mean fill is then refused upstream)."""
        _, a, grad = attribution_maps(self.plm, soft, [self.text(r)], [int(r["target_token_id"])],
                                      preactivation=self.preactivation)
        scores, top = unit_scores(a[0], grad[0], self.aggregate), max(self.ks)
        return (rank_units(scores, self.allowed, limit=top),
                rank_units(scores, self.allowed & self.interpretable, limit=top), a[0].mean(dim=1))

    def unit_sets(self, image_id: int, order_all: list[Unit], order_int: list[Unit]
                  ) -> tuple[list[list[Unit]], list[tuple[str, int, int, float | None]]]:
        """Row 0 ablates nothing (p_clean), then one row per (kind, k):
        ``(sets, [(kind, k, k_eff, overlap_if_not_excluded)])``. Each random kind is ONE random
        ranking per image (seeded by image and kind) with its partner's layer mix, drawn outside
        the image's top units, so its sets are nested in k."""
        top = set(order_all) | set(order_int)
        ranking: dict[str, list] = {"unfiltered": order_all, "filtered": order_int}
        unexcluded: dict[str, list] = {}
        for i, (kind, partner) in enumerate((("random", order_all), ("random_filtered", order_int))):
            seed = [self.seed, image_id] if i == 0 else [self.seed, image_id, i]
            ranking[kind] = random_ranking(partner, self.plm.adapter.d_mlp, np.random.default_rng(seed), top)
            unexcluded[kind] = random_ranking(partner, self.plm.adapter.d_mlp, np.random.default_rng(seed))
        sets: list[list[Unit]] = [[]]
        meta = []
        for kind in self.kinds:
            for k in self.ks:
                units = [u for u in ranking[kind][:k] if u is not None]
                sets.append(units)
                drawn = unexcluded.get(kind, [])[:k]
                overlap = len(set(drawn) & top) / len(drawn) if drawn else None
                meta.append((kind, k, len(units), overlap))
        return sets, meta

    def rows(self, r: dict, soft: torch.Tensor, order_all: list[Unit], order_int: list[Unit],
             fill: torch.Tensor | None) -> list[dict]:
        """Every (kind, k) row of one image: one batched forward (+ one batched generation)."""
        plm, ad = self.plm, self.plm.adapter
        sets, meta = self.unit_sets(int(r["image_id"]), order_all, order_int)
        masks = unit_masks(sets, ad.n_layers, ad.d_mlp)
        p_all = target_probs(plm, soft, self.text(r), int(r["target_token_id"]), masks, fill).tolist()
        p_clean, p = p_all[0], p_all[1:]
        caps = (ablated_captions(plm, soft, masks[:, 1:], self.max_new_tokens, self.stop, fill) if self.regenerate
                else [None] * len(meta))
        clean = list(r["caption_token_ids"])
        return [{
            "image_id": r["image_id"], "kind": kind, "k": k, "k_effective": k_eff, "p_target": pk,
            "p_clean": p_clean, "rel_drop": (p_clean - pk) / p_clean if p_clean > 0 else 0.0,
            "caption": None if cap is None else plm.tokenizer.decode(cap).strip(),
            "caption_changed": None if cap is None else cap != clean,
            "overlap_if_not_excluded": overlap,
        } for (kind, k, k_eff, overlap), pk, cap in zip(meta, p, caps)]


def ablate_images(
    captions: pl.DataFrame,
    load_image: Callable[[int], Image.Image],
    plm: ImagePrefixLM,
    interpretable: torch.Tensor,
    *,
    ks: Sequence[int],
    mode: str = "zero",
    kinds: Sequence[str] = KINDS,
    max_new_tokens: int = 16,
    stop_at_newline: bool = True,
    regenerate: bool = True,
    seed: int = 0,
    progress: bool = True,
    layers: Sequence[int] | None = None,
    shard: tuple[int, int] = (0, 1),
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    preactivation: bool = False,
    aggregate: Aggregate = "max",
) -> pl.DataFrame:
    """One row per (image, kind, k). ``interpretable``: ``Bool[Tensor, "layers d_mlp"]``;
    images go through ``plm``'s encoder.

    ``layers`` restricts the ranked (and so the random) units to those layers, as
    ``attribute.layers`` does for attribution. ``shard=(rank, world)`` keeps every
    ``world``-th image; ``reduce_sum`` sums a tensor over ranks (for the mean fill,
    accumulated in float64). ``zero``: one pass, each image ranked and ablated in turn;
    ``mean``: two passes (the fill needs all images first), keeping only the top
    ``max(ks)`` units per image in between, so memory stays flat in the image count.
    Regenerated captions stop at EOS and, with ``stop_at_newline`` (``caption.stop_at_newline``,
    as the caption stage), at a newline. ``preactivation`` (``attribute.preactivation``) ranks
    units by Z·dy/dZ as the attribute stage does; the ablation still sets A. It is refused with
    ``mode="mean"``, whose fill is a mean of A. ``aggregate`` (``attribute.aggregate``): a
    unit's score over the image positions, max (the paper's g) or Σ_p A·dy/dA.
    """
    if preactivation and mode == "mean":
        raise ValueError("ablate.mode: mean fills A with its mean, but attribute.preactivation: true ranks by Z; "
                         "use ablate.mode: zero, or attribute.preactivation: false")
    from mmn.distributed import shard_batches

    ad = plm.adapter
    allowed = torch.zeros(ad.n_layers, ad.d_mlp, dtype=torch.bool)
    allowed[list(range(ad.n_layers)) if layers is None else list(layers)] = True
    recs = list(captions.filter(pl.col("has_noun")).sort("image_id").iter_rows(named=True))
    todo = [recs[b[0]] for b in shard_batches(len(recs), 1, shard)]
    run = _ImageAblation(plm, allowed, interpretable, ks, kinds,
                         stop_token_ids(plm.tokenizer, ad.vocab_size, stop_at_newline), max_new_tokens, regenerate,
                         seed, preactivation, aggregate)

    def soft_of(r: dict) -> torch.Tensor:
        return plm.image_soft_tokens([load_image(r["image_id"])])

    rows: list[dict] = []
    if mode != "mean":
        for r in tqdm(todo, desc="ablate", disable=not progress):
            soft = soft_of(r)
            order_all, order_int, _ = run.rank(r, soft)
            rows += run.rows(r, soft, order_all, order_int, None)
    else:
        ranked, fill = _mean_fill(run, todo, soft_of, reduce_sum, progress)
        for r, (order_all, order_int) in tqdm(list(zip(todo, ranked)), desc="ablate", disable=not progress):
            rows += run.rows(r, soft_of(r), order_all, order_int, fill)
    return pl.DataFrame(rows, schema=ABLATION_SCHEMA).sort(["image_id", "kind", "k"])


def _mean_fill(run: _ImageAblation, todo: list[dict], soft_of: Callable[[dict], torch.Tensor],
               reduce_sum: Callable[[torch.Tensor], torch.Tensor], progress: bool
               ) -> tuple[list[tuple[list[Unit], list[Unit]]], torch.Tensor]:
    """Pass 1 of ``mode="mean"``: each image's rankings (top ``max(ks)`` units only) and the fill,
    ``Float[Tensor, "layers d_mlp"]`` = every image's (over all ranks) mean A over its positions,
    averaged; the soft tokens are recomputed in pass 2 rather than kept."""
    ad = run.plm.adapter
    ranked, acc = [], torch.zeros(ad.n_layers, ad.d_mlp, dtype=torch.float64)
    for r in tqdm(todo, desc="ablate: rank units", disable=not progress):
        order_all, order_int, a_mean = run.rank(r, soft_of(r))
        acc += a_mean.cpu().double()
        ranked.append((order_all, order_int))
    n = reduce_sum(torch.tensor([float(len(todo))], dtype=torch.float64))
    return ranked, (reduce_sum(acc) / n.clamp(min=1)).float()


CURVE_SCHEMA = {
    "kind": pl.Utf8,
    "k": pl.Int64,
    "n": pl.Int64,
    "k_effective": pl.Float64,
    "p_clean": pl.Float64,
    "p": pl.Float64,
    "drop_of_mean": pl.Float64,
    "rel_drop": pl.Float64,
    "rel_drop_lo": pl.Float64,
    "rel_drop_hi": pl.Float64,
    "vs_random_diff": pl.Float64,
    "vs_random_lo": pl.Float64,
    "vs_random_hi": pl.Float64,
    "vs_random_p": pl.Float64,
    "vs_random_n": pl.Int64,
    "overlap_if_not_excluded": pl.Float64,
    "bertscore_f1": pl.Float64,
    "bertscore_lo": pl.Float64,
    "bertscore_hi": pl.Float64,
}


def drop_of_mean(p: Sequence[float] | np.ndarray, p_clean: Sequence[float] | np.ndarray) -> float | None:
    """Relative drop of the mean p(c): ``1 - mean(p) / mean(p_clean)`` (None when mean(p_clean) = 0).

    Unlike the mean of per-image relative drops it weights images by their clean p(c), so
    images where p(c) was already tiny cannot swing it negative.
    """
    p, p_clean = np.asarray(p, dtype=np.float64), np.asarray(p_clean, dtype=np.float64)
    if p.shape != p_clean.shape or p.size == 0:
        raise ValueError(f"drop_of_mean needs two equal-length non-empty samples, got {p.size} and {p_clean.size}")
    m = float(p_clean.mean())
    return None if m <= 0 else 1.0 - float(p.mean()) / m


def ablation_curve(df: pl.DataFrame, seed: int = 0) -> pl.DataFrame:
    """Fig. 6 table, one row per (kind, k) (schema :data:`CURVE_SCHEMA`).

    ``rel_drop`` is the mean over images of the per-image relative drop with its 95%
    bootstrap CI over images (``rel_drop_lo/hi``); ``drop_of_mean`` is
    :func:`drop_of_mean`; ``vs_random_*`` is the paired test over images of this kind's
    per-image relative drop against its random control's (:data:`PARTNER`) at the same k
    (:func:`mmn.metrics.stats.paired_test`; null for the random kinds), over the
    ``vs_random_n`` images where both sets have the same size (a random set whose layers ran
    out of non-top units is smaller; null when no image is left); ``overlap_if_not_excluded``
    the random kinds' mean share of top units in the same draw without the exclusion;
    ``bertscore_*`` the
    regenerated captions' BERTScore F1 with its CI (null without regeneration). ``seed``
    seeds the resampling only; keep the default so the plot stage's recomputation from
    data/ablation.parquet equals the stage's data/ablation_curve.csv.
    """
    from mmn.metrics.stats import bootstrap_ci, paired_test

    for c in ("image_id", "kind", "k", "k_effective", "p_target", "p_clean", "rel_drop"):
        if c not in df.columns:
            raise ValueError(f"ablation table has no column {c!r}")
    has_b = "bertscore_f1" in df.columns and df["bertscore_f1"].null_count() < df.height
    groups = {key: g.sort("image_id") for key, g in df.group_by(["kind", "k"])}
    rows = []
    for (kind, k), g in sorted(groups.items()):
        ci = bootstrap_ci(g["rel_drop"].to_numpy(), seed=seed)
        row = {"kind": kind, "k": k, "n": ci["n"], "k_effective": float(g["k_effective"].mean()),
               "p_clean": float(g["p_clean"].mean()), "p": float(g["p_target"].mean()),
               "drop_of_mean": drop_of_mean(g["p_target"].to_numpy(), g["p_clean"].to_numpy()),
               "rel_drop": ci["mean"], "rel_drop_lo": ci["lo"], "rel_drop_hi": ci["hi"]}
        if "overlap_if_not_excluded" in g.columns and g["overlap_if_not_excluded"].null_count() < g.height:
            row["overlap_if_not_excluded"] = float(g["overlap_if_not_excluded"].mean())
        control = groups.get((PARTNER.get(kind), k))
        if control is not None:
            pair = g.select("image_id", "rel_drop", "k_effective").join(
                control.select("image_id", pl.col("rel_drop").alias("r"), pl.col("k_effective").alias("k_r")),
                on="image_id", how="inner").filter(pl.col("k_effective") == pl.col("k_r"))
            row["vs_random_n"] = pair.height
            if pair.height:
                t = paired_test(pair["rel_drop"].to_numpy(), pair["r"].to_numpy(), seed=seed)
                row |= {"vs_random_diff": t["diff"], "vs_random_lo": t["lo"], "vs_random_hi": t["hi"],
                        "vs_random_p": t["p"]}
        if has_b:
            b = g["bertscore_f1"].drop_nulls().to_numpy()
            if b.size:
                cb = bootstrap_ci(b, seed=seed)
                row |= {"bertscore_f1": cb["mean"], "bertscore_lo": cb["lo"], "bertscore_hi": cb["hi"]}
        rows.append(row)
    return pl.DataFrame(rows, schema=CURVE_SCHEMA)


def headline_ks(ks: Sequence[int]) -> list[int]:
    """The ks reported in summary/ablation.json (metrics/ablation.json: k_small, k_large): 100 (when run) and the largest k (the paper's 6400)."""
    ks = sorted({int(k) for k in ks if int(k) > 0})
    if not ks:
        return []
    return sorted({ks[-1]} | ({100} if 100 in ks else {ks[0]}))


def ablation_metrics(curve: pl.DataFrame, ks: Sequence[int]) -> dict:
    """Compact, numbers-only metrics: per kind and headline k (:func:`headline_ks`) the mean
    per-image relative drop with its CI ``{"mean","lo","hi","n"}``, the relative drop of the
    mean p(c), the mean k_effective, and for the top kinds the paired test against their random
    control at that k (p, images paired; the difference and its CI are in the curve table); for the random kinds the overlap their
    draws would have had with the top units without the exclusion."""
    out: dict = {"n_images": int(curve["n"].max()) if curve.height else 0}
    for r in curve.filter(pl.col("k").is_in(headline_ks(ks))).iter_rows(named=True):
        v = {"rel_drop": {"mean": r["rel_drop"], "lo": r["rel_drop_lo"], "hi": r["rel_drop_hi"], "n": r["n"]},
             "drop_of_mean": r["drop_of_mean"], "k_effective": r["k_effective"]}
        if r["kind"] in PARTNER:
            v |= {"vs_random_p": r["vs_random_p"], "vs_random_n": r["vs_random_n"]}
        else:
            v["overlap_if_not_excluded"] = r["overlap_if_not_excluded"]
        out.setdefault(r["kind"], {})[f"k{r['k']}"] = v
    return out


def ablation_info(ks: Sequence[int], n_interpretable: int, n_units: int, layers: Sequence[int]) -> dict:
    """The ablate stage's description (data/info/ablate.json; strings allowed): counts and definitions behind summary/ablation.json."""
    return {
        "headline_ks": headline_ks(ks), "layers": list(layers),
        "interpretable_units": n_interpretable, "units": n_units,
        "interpretability": "decided on an fp32 CPU copy of the LM by the decode + filter rule",
        "definitions": {
            "rel_drop": "mean over images of the per-image relative drop 1 - p_k(c)/p_clean(c), "
                        "95% percentile bootstrap CI over images",
            "drop_of_mean": "relative drop of the mean: 1 - mean_images p_k(c) / mean_images p_clean(c)",
            "vs_random_p": "two-sided paired sign-flip permutation test over images of the per-image "
                           "relative drop, this kind vs random units at the same k",
            "random": "per image one random ranking of units with the unfiltered ranking's layer mix, drawn "
                      "outside the image's top units (unfiltered and interpretable, up to max(ks)); the random "
                      "set for k is its first k units (nested across k); a layer out of non-top units adds none",
            "random_filtered": "as random, with the interpretable (filtered) ranking's layer mix and k_effective: "
                               "the control of the filtered kind",
            "vs_random_p_pairs": "filtered is tested against random_filtered, unfiltered against random, over the "
                                 "images whose two sets have the same size",
            "overlap_if_not_excluded": "per random row, the share of the same draw without the exclusion that "
                                       "were the image's top units (the overlap the exclusion removes)",
        },
    }


def curve_lines(curve: pl.DataFrame, k: int) -> list[str]:
    """One log line per kind at ``k``: mean relative drop of p(c) with its CI, drop of the mean."""
    lines = []
    for r in curve.filter(pl.col("k") == k).iter_rows(named=True):
        lo, hi = r["rel_drop_lo"], r["rel_drop_hi"]
        ci = "" if lo is None else f" [95% CI {100 * lo:.1f}, {100 * hi:.1f}]"
        dm = "n/a" if r["drop_of_mean"] is None else f"{100 * r['drop_of_mean']:.1f}%"
        lines.append(f"{r['kind']}: k={r['k']} (effective {r['k_effective']:.0f}), n={r['n']}: mean relative "
                     f"drop of p(c) {100 * r['rel_drop']:.1f}%{ci}; drop of the mean p(c) {dm}")
    return lines


def interpretable_fp32(params, wordlist: str | Path, plm: ImagePrefixLM | None = None, plant: Path | None = None
                       ) -> torch.Tensor:
    """``Bool[Tensor, "layers d_mlp"]``: every unit's interpretability, decided on an fp32 CPU
    copy of the LM by the decode + filter rule (so ablate and the decode + filter stages agree
    unit for unit, whatever the profile's dtype). ``plm``'s LM is reused when it already is fp32
    on the CPU (the embedded profile): no second load. Reads ``params.decode``, ``params.filter``
    and, when it loads the LM, the profile's ``lm``/``lm_revision`` (with stage plant's unit, ``plant``)."""
    from mmn import pipeline
    from mmn.neurons.filter import interpretable_units, load_wordlist

    if plm is not None and plm.adapter.dtype == torch.float32 and plm.adapter.device.type == "cpu":
        adapter, tok = plm.adapter, plm.tokenizer
    else:
        adapter, tok = pipeline.build_lm(params, dtype="float32", device="cpu", plant=plant)
    return interpretable_units(adapter, tok, load_wordlist(wordlist), params.decode, params.filter)
