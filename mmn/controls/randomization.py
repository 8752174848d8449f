"""Cascading model randomisation (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

The captions and targets stay those of the trained model; the LM's MLP weights are
re-initialised from the top layer down, one more layer at each step, and every image's unit
scores g are recomputed. An attribution that barely changes when the weights it explains are
destroyed is not explaining them.

Re-initialisation: every weight matrix (and bias) of the layer's MLP is replaced by Gaussian
noise with that matrix's own mean and standard deviation (seeded per layer): the scale of the
activations is kept, the learned structure is gone. Family-agnostic (no model's init code).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import polars as pl
import scipy.stats
import torch
from PIL import Image

from mmn.models.adapters import LMAdapter
from mmn.models.prefix_lm import ImagePrefixLM
from mmn.neurons.attribution import attribution_maps
from mmn.neurons.scoring import Aggregate, unit_scores

CASCADE_SCHEMA = {"image_id": pl.Int64, "layers_randomised": pl.Int64, "top_layer_randomised": pl.Int64,
                  "overlap": pl.Float64, "spearman": pl.Float64}


@torch.no_grad()
def randomise_mlp(adapter: LMAdapter, layer: int, seed: int) -> None:
    """Replace every parameter of ``layer``'s MLP by seeded Gaussian noise of its own mean and std (in place)."""
    g = torch.Generator().manual_seed(seed * 1000 + layer)
    for p in adapter.mlp(layer).parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        std, mean = p.float().std() if p.numel() > 1 else torch.tensor(0.0), p.float().mean()
        p.copy_((mean + std * noise).to(p.dtype))


def top_overlap(a: torch.Tensor, b: torch.Tensor, allowed: torch.Tensor, k: int) -> float:
    """|top k of a ∩ top k of b| / k over the allowed units (``[layers, d_mlp]`` scores)."""
    fa = torch.where(allowed, a, -torch.inf).flatten()
    fb = torch.where(allowed, b, -torch.inf).flatten()
    ta = set(torch.topk(fa, k).indices.tolist())
    return len(ta & set(torch.topk(fb, k).indices.tolist())) / k


def cascade(plm: ImagePrefixLM, captions: pl.DataFrame, load_image: Callable[[int], Image.Image],
            allowed: torch.Tensor, steps: Sequence[int], *, k: int, aggregate: Aggregate, preactivation: bool,
            seed: int, max_images: int | None = None) -> pl.DataFrame:
    """One row per (image, step): overlap of the top ``k`` units by g and the Spearman
    correlation of g over every allowed unit, randomised model vs the trained one. ``steps``:
    the number of top layers randomised (cumulative, capped at the LM's layers); the LM is
    changed in place (load a fresh one after)."""
    ad = plm.adapter
    recs = list(captions.filter(pl.col("has_noun")).sort("image_id").iter_rows(named=True))[:max_images]
    inputs = []
    for r in recs:
        soft = plm.image_soft_tokens([load_image(r["image_id"])])
        inputs.append((r["image_id"], soft, list(r["caption_token_ids"][: r["target_pos"]]), int(r["target_token_id"])))

    def scores(soft, text, target) -> torch.Tensor:
        _, a, g = attribution_maps(plm, soft, [text], [target], preactivation=preactivation)
        return unit_scores(a[0], g[0], aggregate)

    trained = [scores(s, t, c) for _, s, t, c in inputs]
    done, rows = 0, []
    flat_allowed = allowed.flatten()
    for n in sorted({min(s, ad.n_layers) for s in steps}):
        for layer in range(ad.n_layers - 1 - done, ad.n_layers - 1 - n, -1):
            randomise_mlp(ad, layer, seed)
        done = n
        for (iid, soft, text, target), base in zip(inputs, trained):
            new = scores(soft, text, target)
            rho = scipy.stats.spearmanr(base.flatten()[flat_allowed].numpy(), new.flatten()[flat_allowed].numpy())
            rows.append({"image_id": iid, "layers_randomised": n, "top_layer_randomised": ad.n_layers - n,
                         "overlap": top_overlap(base, new, allowed, k),
                         "spearman": None if np.isnan(rho.statistic) else float(rho.statistic)})
    return pl.DataFrame(rows, schema=CASCADE_SCHEMA)


def cascade_table(df: pl.DataFrame, seed: int = 0) -> pl.DataFrame:
    """Per step: mean overlap and Spearman with bootstrap CIs over images."""
    from mmn.metrics.stats import bootstrap_ci

    rows = []
    for (n,), g in sorted(df.group_by(["layers_randomised"]), key=lambda t: t[0][0]):
        o = bootstrap_ci(g["overlap"].to_numpy(), seed=seed)
        s = bootstrap_ci(g["spearman"].drop_nulls().to_numpy(), seed=seed)
        rows.append({"layers_randomised": n, "top_layer_randomised": int(g["top_layer_randomised"][0]), "n": o["n"],
                     "overlap": o["mean"], "overlap_lo": o["lo"], "overlap_hi": o["hi"],
                     "spearman": s["mean"], "spearman_lo": s["lo"], "spearman_hi": s["hi"]})
    return pl.DataFrame(rows)


def cascade_results(table: pl.DataFrame) -> dict | None:
    """:func:`cascade_table` as data/results/controls.json's ``cascade``: ``{"k<n>": {"overlap":
    {mean, lo, hi, n}, "spearman": {mean, lo, hi}}}``; None for an empty table (no cascade run)."""
    out = {f"k{r['layers_randomised']}": {
        "overlap": {"mean": r["overlap"], "lo": r["overlap_lo"], "hi": r["overlap_hi"], "n": r["n"]},
        "spearman": {"mean": r["spearman"], "lo": r["spearman_lo"], "hi": r["spearman_hi"]}}
        for r in table.iter_rows(named=True)}
    return out or None
