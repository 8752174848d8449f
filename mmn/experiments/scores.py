"""Table 1 (decoded units vs images), Table 2 / Fig. 3 (decoded image prompts) and their statistics.

Table 1 (paper: "For each image, we record the max CLIPScore and BERTScore per neuron, and
report means across all images"; "Each BERTScore (F1) is a mean across 5 human image
annotations from COCO"): per image,
every one of its top-k distinct units (all of them, as ranked by ``attribute``) has its decoded
token list (comma-joined) scored — BERTScore F1 as the mean over the image's COCO captions,
CLIPScore against the image — and the image keeps the max over its units. Rows:

* ``multimodal_all`` / ``multimodal_interpretable``: all top units / the interpretable ones.
* ``random_pairing``: each image scored with the top units of another image
  (``random_draws`` seeded derangements); per image, the max within a draw, averaged over draws.
* ``random_pairing_interpretable``: the interpretable row's matched baseline: an image with m
  interpretable top units is scored with m interpretable units drawn without replacement from
  the other images' interpretable top units (count-matched, since a max grows with the count);
  per draw max, mean over draws.
* ``captions``: the model's own caption. ``coco_nouns``: five nouns sampled (seeded) from the
  image's human captions, comma-joined (all of them when there are fewer).

Table 2 / Fig. 3 (paper: "we map them (and 1000 randomly sampled vectors for comparison) onto
the five nearest tokens"; Fig. 3: "the mean across all image patches as well as the distribution
of max CLIPScores per image"; "five COCO nouns per image (sampled from human annotations)"):
each soft token is decoded to its
``prompt_neighbours`` nearest real-vocabulary input embeddings (cosine; added tokens excluded)
and scored like above. Per image the prompts are summarised by the mean and by the max over
patches. Baseline: one set of random vectors per image (as many as patches) drawn to match the
real-vocabulary embedding statistics (:func:`random_like_embeddings`), summarised the same way.
KS two-sample tests run on PER-IMAGE values (n = number of images on each side; per-prompt
scores share an image and its references, so they are pseudo-replicates).

Outputs: :func:`score_tables` → the long per-item table (:data:`SCORE_SCHEMA`);
:func:`per_image_scores` → one value per (item, stat, image); :func:`summarise` → the
numbers-only metrics; :func:`describe` → the strings (models, scales, reasons).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import polars as pl
import torch
from PIL import Image

from mmn.metrics.bertscore import BertScorer
from mmn.metrics.clipscore import ClipScorer, scale_description
from mmn.metrics.stats import bootstrap_ci, ks_2samp, nearest_tokens, paired_test, random_like_embeddings
from mmn.models.prefix_lm import ImagePrefixLM
from mmn.text import nouns

#: Long table, one row per scored text. ``draw``: random-baseline draw (0 for the others);
#: ``index``: the unit's position in the scored set (table 1 units), the patch (table 2), 0 else;
#: ``layer``/``unit``: the decoded unit (null for captions, nouns and prompts).
SCORE_SCHEMA = {
    "table": pl.Utf8,
    "item": pl.Utf8,
    "image_id": pl.Int64,
    "draw": pl.Int64,
    "index": pl.Int64,
    "layer": pl.Int64,
    "unit": pl.Int64,
    "text": pl.Utf8,
    "bertscore": pl.Float64,
    "clipscore": pl.Float64,
}
UNIT_ITEMS = ("multimodal_all", "multimodal_interpretable")
RANDOM_ITEMS = ("random_pairing", "random_pairing_interpretable")
SINGLE_ITEMS = ("captions", "coco_nouns")
PROMPT_ITEMS = ("prompts", "random_prompts")
TABLE1_ROWS = (*UNIT_ITEMS, *RANDOM_ITEMS, *SINGLE_ITEMS)
#: per-image summary tables: (item, stat) rows; ``stat`` is max (over units; random: mean over
#: draws of the per-draw max), value (one text per image), mean / max (over patches)
PER_IMAGE_SCHEMA = {"item": pl.Utf8, "stat": pl.Utf8, "image_id": pl.Int64,
                    "bertscore": pl.Float64, "clipscore": pl.Float64}
N_NOUNS = 5


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation with no fixed point (n >= 2)."""
    if n < 2:
        raise ValueError("random pairing needs at least 2 images")
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return p


def sample_nouns(captions: list[str], n: int, seed: int, image_id: int) -> str:
    """``n`` distinct nouns of an image's human captions, sampled without replacement with
    ``default_rng([seed, image_id])`` (all of them when fewer), comma-joined in caption order."""
    pool = list(dict.fromkeys(w for c in captions for w in nouns(c)))
    if len(pool) > n:
        keep = set(np.random.default_rng([seed, image_id]).choice(len(pool), size=n, replace=False).tolist())
        pool = [w for i, w in enumerate(pool) if i in keep]
    return ", ".join(pool)


def image_units(attributions: pl.DataFrame, neurons: pl.DataFrame) -> pl.DataFrame:
    """Per image, its distinct top units in rank order with their decodings:
    ``image_id, order, layer, unit, decoded, interpretable``. Every unit must be decoded."""
    need = {"image_id", "rank", "layer", "unit"} - set(attributions.columns)
    if need:
        raise ValueError(f"attributions table lacks columns {sorted(need)}")
    top = (attributions.sort(["image_id", "rank"])
           .unique(subset=["image_id", "layer", "unit"], keep="first", maintain_order=True)
           .with_columns(pl.int_range(pl.len()).over("image_id").cast(pl.Int64).alias("order"))
           .select("image_id", "order", "layer", "unit")
           .join(neurons.select("layer", "unit", "decoded", "interpretable"), on=["layer", "unit"], how="left"))
    missing = top.filter(pl.col("decoded").is_null() | pl.col("interpretable").is_null())
    if missing.height:
        r = missing.row(0, named=True)
        raise ValueError(f"{missing.height} attributed units have no decoding in the neurons table, e.g. "
                         f"layer {r['layer']} unit {r['unit']} (image {r['image_id']})")
    return top


def table1_plan(units: pl.DataFrame, random_draws: int, seed: int) -> tuple[pl.DataFrame, dict]:
    """Which unit texts each image is scored with (no scores yet): ``(plan, own_units)``.

    ``plan``: ``item, image_id, draw, index, layer, unit, text`` for the unit rows and the two
    random-pairing baselines. A baseline never scores an image with one of its OWN top units
    (a unit can be in the top list of several images): in ``random_pairing`` such a unit of the
    partner image is replaced by a unit drawn from all the images' top units that are neither the
    image's own nor already in the set (the count stays the partner's); the matched interpretable
    baseline draws from a pool without them. ``own_units`` counts what that touched (info JSON):
    ``random_pairing_draws`` (image, draw) sets and ``random_pairing_units`` units replaced,
    ``random_pairing_interpretable_draws`` draws whose pool held own units."""
    images = sorted(set(units["image_id"].to_list()))
    by = {i: units.filter(pl.col("image_id") == i) for i in images}
    own = {i: set(by[i].select("layer", "unit").rows()) for i in images}
    everyone = units.unique(subset=["layer", "unit"], keep="first", maintain_order=True)
    rows: list[tuple] = []
    touched = {"random_pairing_draws": 0, "random_pairing_units": 0, "random_pairing_interpretable_draws": 0}

    def add(item: str, image: int, draw: int, u: pl.DataFrame) -> None:
        for j, (layer, unit, text) in enumerate(u.select("layer", "unit", "decoded").iter_rows()):
            rows.append((item, image, draw, j, layer, unit, text))

    def not_own(df: pl.DataFrame, image: int, also: set = frozenset()) -> pl.Series:
        return pl.Series([(lu not in own[image] and lu not in also) for lu in df.select("layer", "unit").rows()],
                         dtype=pl.Boolean)

    for i in images:
        add("multimodal_all", i, 0, by[i])
        add("multimodal_interpretable", i, 0, by[i].filter(pl.col("interpretable")))
    rng = np.random.default_rng(seed)
    if len(images) >= 2:
        interp = units.filter(pl.col("interpretable"))
        for d in range(random_draws):
            perm = derangement(len(images), rng)
            for a, b in zip(images, perm):
                partner = by[images[b]]
                keep = not_own(partner, a)
                n_own = partner.height - int(keep.sum())
                if n_own:
                    kept = partner.filter(keep)
                    pool = everyone.filter(not_own(everyone, a, set(kept.select("layer", "unit").rows())))
                    pick = rng.choice(pool.height, size=min(n_own, pool.height), replace=False)
                    partner = pl.concat([kept, pool[np.sort(pick).tolist()]], how="vertical")
                    touched["random_pairing_draws"] += 1
                    touched["random_pairing_units"] += n_own
                add("random_pairing", a, d, partner)
            for a in images:
                m = int(by[a]["interpretable"].sum())
                others = (interp.filter(pl.col("image_id") != a)
                          .unique(subset=["layer", "unit"], keep="first", maintain_order=True))
                pool = others.filter(not_own(others, a))
                touched["random_pairing_interpretable_draws"] += int(m > 0 and pool.height < others.height)
                if m == 0 or pool.height == 0:
                    continue
                pick = rng.choice(pool.height, size=min(m, pool.height), replace=False)
                add("random_pairing_interpretable", a, d, pool[np.sort(pick).tolist()])
    schema = {k: SCORE_SCHEMA[k] for k in ("item", "image_id", "draw", "index", "layer", "unit", "text")}
    return pl.DataFrame(rows, schema=schema, orient="row"), touched


class _Scorer:
    """Scores (image, text) pairs, each distinct pair once (units recur across images and draws)."""

    def __init__(self, bert: BertScorer, clip: ClipScorer | None, load_image: Callable[[int], Image.Image],
                 refs: dict[int, list[str]]):
        self.bert, self.clip, self.load_image, self.refs = bert, clip, load_image, refs
        self._img: dict[int, torch.Tensor] = {}
        self._cache: dict[tuple[int, str], tuple[float, float]] = {}

    def score(self, ids: list[int], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(bertscore [n], clipscore [n])``; CLIPScore is NaN when no CLIP scorer is given."""
        need = list(dict.fromkeys(k for k in zip(ids, texts) if k not in self._cache))
        if need:
            b = self.bert.mean_f1_over_refs([t for _, t in need], [self.refs[i] for i, _ in need])
            c = np.full(len(need), np.nan)
            if self.clip is not None:
                for i in {i for i, _ in need} - set(self._img):
                    self._img[i] = self.clip.image_embeddings([self.load_image(i)])[0]
                img = torch.stack([self._img[i] for i, _ in need])
                c = self.clip.pair_scores(img, self.clip.text_embeddings([t for _, t in need]))
            self._cache.update({k: (float(bv), float(cv)) for k, bv, cv in zip(need, b, c)})
        got = [self._cache[k] for k in zip(ids, texts)]
        return (np.array([g[0] for g in got], dtype=np.float64).reshape(-1),
                np.array([g[1] for g in got], dtype=np.float64).reshape(-1))


def _decode_rows(tok, ids: torch.Tensor) -> list[str]:
    return [", ".join(tok.decode([t]).strip() for t in row) for row in ids.tolist()]


def score_tables(
    captions: pl.DataFrame,
    attributions: pl.DataFrame,
    neurons: pl.DataFrame,
    refs: dict[int, list[str]],
    load_image: Callable[[int], Image.Image],
    plm: ImagePrefixLM,
    bert: BertScorer,
    clip: ClipScorer | None,
    *,
    random_draws: int,
    prompt_neighbours: int,
    seed: int,
    n_nouns: int = N_NOUNS,
) -> tuple[pl.DataFrame, dict]:
    """``(table, own_units)``: the long table of every scored text (schema :data:`SCORE_SCHEMA`)
    and :func:`table1_plan`'s count of the own units its random baselines left out."""
    units = image_units(attributions, neurons)
    images = sorted(set(units["image_id"].to_list()))
    no_refs = [i for i in images if not refs.get(i)]
    if no_refs:
        raise ValueError(f"{len(no_refs)} attributed images have no COCO captions, e.g. image_id {no_refs[0]}")
    sc = _Scorer(bert, clip, load_image, refs)
    parts: list[pl.DataFrame] = []

    def add(table: str, plan: pl.DataFrame) -> None:
        b, c = sc.score(plan["image_id"].to_list(), plan["text"].to_list())
        parts.append(plan.with_columns(pl.lit(table).alias("table"), pl.Series("bertscore", b, pl.Float64),
                                       pl.Series("clipscore", c, pl.Float64).fill_nan(None)))

    plan, own_units = table1_plan(units, random_draws, seed)
    add("table1", plan)
    caps = captions.filter(pl.col("image_id").is_in(images)).sort("image_id")
    add("table1", _single_plan("captions", caps["image_id"].to_list(), caps["caption"].to_list()))
    add("table1", _single_plan("coco_nouns", images, [sample_nouns(refs[i], n_nouns, seed, i) for i in images]))

    for plan in prompt_plans(plm, images, load_image, prompt_neighbours, seed):
        add("table2", plan)
    return pl.concat(parts, how="diagonal").select(list(SCORE_SCHEMA)).cast(SCORE_SCHEMA), own_units


def _single_plan(item: str, ids: list[int], texts: list[str], index: list[int] | None = None) -> pl.DataFrame:
    """Plan rows of one text per (image, index), no unit and no draw."""
    n = len(ids)
    return pl.DataFrame({"item": [item] * n, "image_id": ids, "draw": [0] * n, "index": index or [0] * n,
                         "layer": [None] * n, "unit": [None] * n, "text": texts},
                        schema={k: SCORE_SCHEMA[k] for k in ("item", "image_id", "draw", "index", "layer", "unit",
                                                              "text")})


def prompt_plans(plm: ImagePrefixLM, images: list[int], load_image: Callable[[int], Image.Image],
                 prompt_neighbours: int, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Table 2 plans ``(prompts, random_prompts)``: each image's soft tokens decoded to their
    ``prompt_neighbours`` nearest real-vocabulary input embeddings, and as many random vectors
    matched to those rows' statistics (:func:`random_like_embeddings`), decoded alike."""
    real = plm.adapter.real_token_ids.to(plm.adapter.embed.weight.device)
    emb = plm.adapter.embed.weight.detach().float()[real]
    tok = plm.tokenizer
    ids, idx, texts, n_patches = [], [], [], 0
    for i in images:
        soft = plm.image_soft_tokens([load_image(i)])[0].float()
        near, _ = nearest_tokens(soft, emb, k=prompt_neighbours)
        n_patches = soft.shape[0]
        ids += [i] * n_patches
        idx += list(range(n_patches))
        texts += _decode_rows(tok, real[near])
    rnd = random_like_embeddings(emb, n_patches * len(images), seed)
    near, _ = nearest_tokens(rnd, emb, k=prompt_neighbours)
    return (_single_plan("prompts", ids, texts, idx),
            _single_plan("random_prompts", ids, _decode_rows(tok, real[near]), idx))


def per_image_scores(df: pl.DataFrame) -> pl.DataFrame:
    """One value per (item, stat, image) (schema :data:`PER_IMAGE_SCHEMA`), from the long table.

    Units: ``max`` over the image's units; random pairings: ``max`` within each draw, then the
    mean over draws; captions / nouns: ``value`` (their one text); prompts: ``mean`` and ``max``
    over patches. CLIPScore stays null where it was not computed.

    Gotcha: the rows are sorted by their keys first and every group keeps that order, so each
    mean sums in one fixed order: the result does not depend on the table's row order, and two
    calls give the same bits (polars' unordered group_by summed the draws in a varying order).
    """
    metrics = [pl.col("bertscore"), pl.col("clipscore")]
    df = df.sort([c for c in ("item", "image_id", "draw", "index") if c in df.columns])
    units = (df.filter(pl.col("item").is_in(UNIT_ITEMS + RANDOM_ITEMS))
             .group_by("item", "image_id", "draw", maintain_order=True).agg(c.max() for c in metrics)
             .group_by("item", "image_id", maintain_order=True).agg(c.mean() for c in metrics)
             .with_columns(pl.lit("max").alias("stat")))
    single = (df.filter(pl.col("item").is_in(SINGLE_ITEMS)).group_by("item", "image_id", maintain_order=True)
              .agg(c.mean() for c in metrics).with_columns(pl.lit("value").alias("stat")))
    prompts = df.filter(pl.col("item").is_in(PROMPT_ITEMS))
    parts = [units, single] + [prompts.group_by("item", "image_id", maintain_order=True)
                               .agg(getattr(c, s)() for c in metrics)
                               .with_columns(pl.lit(s).alias("stat")) for s in ("mean", "max")]
    return (pl.concat([p.select(list(PER_IMAGE_SCHEMA)).cast(PER_IMAGE_SCHEMA) for p in parts])
            .sort("item", "stat", "image_id"))


def _values(pi: pl.DataFrame, item: str, stat: str, metric: str) -> dict[int, float]:
    sub = pi.filter((pl.col("item") == item) & (pl.col("stat") == stat) & pl.col(metric).is_not_null())
    return dict(zip(sub["image_id"].to_list(), sub[metric].to_list()))


def _num(d: dict | None) -> dict | None:
    if d is None:
        return None
    return {k: (None if v is None else int(v) if k == "n" else float(f"{v:.6g}")) for k, v in d.items()}


def _ci(v: dict[int, float]) -> dict | None:
    return _num(bootstrap_ci(list(v.values()))) if v else None


def _paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
    common = sorted(set(a) & set(b))
    return _num(paired_test([a[i] for i in common], [b[i] for i in common])) if common else None


def _ks(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """KS over per-image values; ``n`` = images per side (the same image set on both)."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    r = ks_2samp([a[i] for i in common], [b[i] for i in common])
    return _num({**r, "n": len(common)})


def metric_block(pi: pl.DataFrame, metric: str) -> dict:
    """Table 1/2 rows ``{mean, lo, hi, n}`` (95% bootstrap over images), the paired tests over
    images and the per-image KS tests for one metric (``bertscore`` | ``clipscore``)."""
    stat = {**{i: "max" for i in UNIT_ITEMS + RANDOM_ITEMS}, **{i: "value" for i in SINGLE_ITEMS}}
    v = {item: _values(pi, item, s, metric) for item, s in stat.items()}
    pm, rm = _values(pi, "prompts", "mean", metric), _values(pi, "random_prompts", "mean", metric)
    px, rx = _values(pi, "prompts", "max", metric), _values(pi, "random_prompts", "max", metric)
    return {
        "table1": {item: _ci(v[item]) for item in TABLE1_ROWS},
        "table2": {"prompts": _ci(pm), "random_prompts": _ci(rm)},
        "paired": {"multimodal_vs_random": _paired(v["multimodal_all"], v["random_pairing"]),
                   "interpretable_vs_random": _paired(v["multimodal_interpretable"],
                                                      v["random_pairing_interpretable"])},
        "ks": {"prompts_vs_random_mean": _ks(pm, rm), "prompts_vs_random_max": _ks(px, rx),
               "prompts_vs_coco_nouns_mean": _ks(pm, v["coco_nouns"])},
    }


def summarise(pi: pl.DataFrame, *, bert_rescaled: bool, clip_w: float, clip_computed: bool) -> dict:
    """summary/scores.json (headline: metrics/scores.json, mmn/headline.py): numbers or null only. ``clipscore`` is null when not computed;
    ``scale`` says which scale the numbers are on (``bertscore_rescaled`` 1/0, ``clip_w``)."""
    return {"bertscore": metric_block(pi, "bertscore"),
            "clipscore": metric_block(pi, "clipscore") if clip_computed else None,
            "scale": {"bertscore_rescaled": int(bool(bert_rescaled)), "clip_w": float(clip_w)}}


def build_scorers(params, device: torch.device, dtype: torch.dtype | None) -> tuple[BertScorer, ClipScorer | None,
                                                                             str | None]:
    """The score stage's BERTScore and CLIPScore models from the profile and ``params.score``:
    ``(bert, clip, reason)``; ``clip`` is None, with the ``reason``, when the profile configures
    no CLIP weights (none ship in any PyPI package). A configured CLIP model that cannot load
    raises; so does a ``bert_rescale`` without a baseline (ParamsError naming the key)."""
    m, s = params.model, params.score
    bert = BertScorer.from_profile(params, device, dtype, batch_size=s.batch_size)
    if m.clip_pretrained is None and m.clip_checkpoint is None:
        return bert, None, (f"no CLIP weights configured for profile '{params.profile}' (none ship in any PyPI "
                            "package; set profiles.<name>.clip_pretrained or clip_checkpoint)")
    clip = ClipScorer.from_params(s.clip_model, m.clip_pretrained, m.clip_checkpoint, device=device, w=s.clip_w,
                                  batch_size=s.batch_size)
    return bert, clip, None


def table1_line(metrics: dict, scale: str) -> str:
    """The log line of Table 1's BERTScore rows: mean [CI] n per row."""
    t1 = metrics["bertscore"]["table1"]
    return (f"Table 1 BERTScore ({scale.split(',')[0]}): "
            + ", ".join(f"{k} {v['mean']:.4f} [{v['lo']}, {v['hi']}] n={v['n']}" for k, v in t1.items() if v))


def describe(bert: BertScorer, clip: ClipScorer | None, clip_reason: str | None, clip_w: float,
             n_images: int, own_units: dict) -> dict:
    """data/info/score.json: the strings that go with the numbers (models, scales, reasons)."""
    if bert.rescaled:
        bscale = (f"baseline-rescaled F1, (F - b)/(1 - b) with bert_score's baseline b = {bert.baseline:.4f} "
                  "(the paper's scale)")
    else:
        bscale = ("raw F1, NOT baseline-rescaled (no published baseline for this model), so not on the paper's "
                  "scale: compare rows with each other, not with the paper's .36/.38/.53")
    return {
        "bertscore": {"model": bert.description, "scale": bscale,
                      "f1_guard": "P and R clamped at 0 before F = 2PR/(P+R); F = 0 when both are <= 0"},
        "clipscore": {"model": None if clip is None else clip.description, "scale": scale_description(clip_w),
                      "not_computed": None if clip is not None else f"CLIPScore not computed: {clip_reason}"},
        "n_images": n_images,
        "own_units_left_out": own_units,
        "definitions": {
            "table1": "per image: max over all its top units' decoded token lists (comma-joined); mean over images "
                      "with a 95% bootstrap CI over images",
            "random_pairing": "image scored with another image's top units (seeded derangements); a partner unit "
                              "that is also one of the image's own top units is replaced by a unit drawn from all "
                              "images' top units that are not its own; per-draw max, mean over draws",
            "random_pairing_interpretable": "image with m interpretable units scored with m interpretable units "
                                            "drawn from the other images' top units, never its own; per-draw max, "
                                            "mean over draws",
            "coco_nouns": f"{N_NOUNS} nouns sampled (seeded) per image from its human captions",
            "table2": "per image: mean (and max) over patches of the scores of each soft token's nearest "
                      "real-vocabulary tokens; random: one set of matched random vectors per image",
            "ks": "two-sample KS test on per-image values; n = images per side",
            "paired": "paired sign-flip permutation test over images of the per-image difference",
        },
    }
