"""Ablation of MLP units at the image positions, through the shared hook mechanism.

Each batch row can ablate a different set of units (one row per k, per kind), so a
whole ablation curve of one image is one forward pass (and one batched generation).
Units are zeroed (or set to a fill value, e.g. their mean activation) only at the
soft-token positions; during KV-cache generation the later single-token steps are left
untouched, as the image positions were already ablated in the cached prefix.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mmn.hooks import EditFn, TraceDict
from mmn.models.adapters import LMAdapter
from mmn.models.prefix_lm import ImagePrefixLM


def unit_masks(rows: Sequence[Sequence[tuple[int, int]]], n_layers: int, d_mlp: int
               ) -> Bool[Tensor, "layers batch d_mlp"]:
    """``Bool[Tensor, "layers batch d_mlp"]``: True where row b ablates (layer, unit)."""
    m = torch.zeros(n_layers, len(rows), d_mlp, dtype=torch.bool)
    for b, units in enumerate(rows):
        if len(units):
            idx = torch.tensor(units, dtype=torch.long)
            m[idx[:, 0], b, idx[:, 1]] = True
    return m


def ablation_edits(adapter: LMAdapter, masks: Tensor, image_slice: slice, fill: Tensor | None = None
                   ) -> dict[int, EditFn]:
    """Per layer that ablates anything, the edit of its unit activations A (the input of W_out):
    row b's units of ``masks`` (``Bool[Tensor, "layers batch d_mlp"]``, :func:`unit_masks`) set
    to ``fill`` (``Float[Tensor, "layers d_mlp"]``; None = zero) at the image positions. Steps
    shorter than the prefix (KV-cache generation) are left as they are."""
    dev = adapter.device
    masks = masks.to(dev)
    edits = {}
    for layer in range(masks.shape[0]):
        if not bool(masks[layer].any()):
            continue
        m = masks[layer][:, None, :]  # [B, 1, U]
        f = torch.zeros((), device=dev) if fill is None else fill[layer].to(dev)[None, None, :]

        def edit(x: Tensor, m: Tensor = m, f: Tensor = f) -> Tensor:
            if x.shape[1] < image_slice.stop:  # generation step after the prefix
                return x
            x = x.clone()
            region = x[:, image_slice, :]
            x[:, image_slice, :] = torch.where(m, f.to(x.dtype), region)
            return x

        edits[layer] = edit
    return edits


@contextmanager
def ablated(
    adapter: LMAdapter, masks: Tensor, image_slice: slice, fill: Tensor | None = None
) -> Iterator[TraceDict]:
    """Ablate units (:func:`ablation_edits`) in every forward while the context is open (generation)."""
    edits = ablation_edits(adapter, masks, image_slice, fill)
    with TraceDict({str(l): adapter.act_module(l) for l in edits},
                   edit_input={str(l): fn for l, fn in edits.items()}) as td:
        yield td


def target_probs(plm: ImagePrefixLM, soft: Float[Tensor, "1 patches d_model"], text: list[int], target: int,
                 masks: Bool[Tensor, "layers rows d_mlp"], fill: Float[Tensor, "layers d_mlp"] | None = None
                 ) -> Float[Tensor, "rows"]:
    """p(c) for one image under each row's ablation: ``Float[Tensor, "rows"]``."""
    rows = masks.shape[1]
    batch = plm.build(soft.expand(rows, -1, -1), [text] * rows)
    with torch.no_grad():
        fwd = plm.target_forward(batch, [target] * rows,
                                 edits=ablation_edits(plm.adapter, masks, batch.image_slice, fill))
    return fwd.probs()


def set_effects(plm: ImagePrefixLM, soft: Float[Tensor, "1 patches d_model"], text: list[int], target: int,
                sets: Sequence[Sequence[tuple[int, int]]], rows: int = 64,
                fill: Float[Tensor, "layers d_mlp"] | None = None
                ) -> tuple[Float[Tensor, "sets"], Float[Tensor, "sets"]]:
    """y^c (logit) and p(c) for one image with each unit set ablated at the image positions:
    ``(Float[Tensor, "sets"], Float[Tensor, "sets"])``, ``rows`` sets per batched forward."""
    ad = plm.adapter
    ys, ps = [], []
    for start in range(0, len(sets), rows):
        chunk = list(sets[start: start + rows])
        masks = unit_masks(chunk, ad.n_layers, ad.d_mlp)
        batch = plm.build(soft.expand(len(chunk), -1, -1), [text] * len(chunk))
        with torch.no_grad():
            fwd = plm.target_forward(batch, [target] * len(chunk),
                                     edits=ablation_edits(ad, masks, batch.image_slice, fill))
        ys.append(fwd.y.float())
        ps.append(fwd.probs())
    return torch.cat(ys).cpu(), torch.cat(ps).cpu()


def single_unit_effects(plm: ImagePrefixLM, soft: Float[Tensor, "1 patches d_model"], text: list[int], target: int,
                        units: Sequence[tuple[int, int]], rows: int = 64) -> dict[str, Tensor | float]:
    """Exact effect of ablating each unit ALONE at the image positions (activation patching
    to zero): ``dy = y_clean - y_ablated`` and ``dp = p_clean - p_ablated`` (``[n_units]``,
    positive = the unit supports c), plus ``y_clean`` and ``p_clean``. Many single-unit
    ablations are the rows of one forward (:func:`set_effects`)."""
    y, p = set_effects(plm, soft, text, target, [[]] + [[tuple(u)] for u in units], rows)
    return {"y_clean": float(y[0]), "p_clean": float(p[0]), "dy": y[0] - y[1:], "dp": p[0] - p[1:]}


def ablated_captions(plm: ImagePrefixLM, soft: Float[Tensor, "1 patches d_model"],
                     masks: Bool[Tensor, "layers rows d_mlp"],
                     max_new_tokens: int, stop_ids: set[int], fill: Float[Tensor, "layers d_mlp"] | None = None
                     ) -> list[list[int]]:
    """Greedy captions of one image under each row's ablation."""
    rows = masks.shape[1]
    n_patch = soft.shape[1]
    nb = len(plm.bos_ids)
    with ablated(plm.adapter, masks, slice(nb, nb + n_patch), fill):
        ids, _ = plm.generate(soft.expand(rows, -1, -1), max_new_tokens, stop_ids)
    return ids


def rank_units(scores: Float[Tensor, "layers d_mlp"], allowed: Bool[Tensor, "layers d_mlp"] | None = None,
               limit: int | None = None) -> list[tuple[int, int]]:
    """(layer, unit) sorted by score descending, ties by (layer, unit); optionally only
    ``allowed`` (``Bool[Tensor, "layers d_mlp"]``) and only the first ``limit``."""
    n_layers, n_units = scores.shape
    flat = scores.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    if allowed is not None:
        order = order[allowed.to(order.device).reshape(-1)[order]]
    if limit is not None:
        order = order[:limit]
    return [(int(i) // n_units, int(i) % n_units) for i in order.tolist()]


def random_ranking(order: Sequence[tuple[int, int]], n_units: int, rng: np.random.Generator,
                   exclude: Collection[tuple[int, int]] = ()) -> list[tuple[int, int] | None]:
    """One random ranking of units with ``order``'s layer mix, for nested random sets.

    Each layer gets one random permutation of its ``n_units`` units, less the units in
    ``exclude`` (an image's own top units: a random set must not contain the set it is compared
    with); the i-th entry of the result is the next unused unit of that permutation in the layer
    of ``order[i]``. So for every k the first k entries hold as many units per layer as
    ``order[:k]`` does (the random units come "from the same layers" as the top k, as in the
    paper's Fig. 6), and the random set of a smaller k is a prefix of that of a larger one.

    Gotcha: when a layer's non-excluded units run out (large k with the top units crowded in a
    few layers), that entry is ``None``: the set for k is then smaller than k (its
    ``k_effective`` says so), never filled from other layers.
    """
    excluded: dict[int, set[int]] = {}
    for layer, unit in exclude:
        excluded.setdefault(layer, set()).add(unit)
    perms: dict[int, list[int]] = {}
    used: dict[int, int] = {}
    out: list[tuple[int, int] | None] = []
    for layer in sorted({layer for layer, _ in order}):
        drop = excluded.get(layer, set())  # drawn in layer order: reproducible
        perms[layer] = [int(u) for u in rng.permutation(n_units) if int(u) not in drop]
    for layer, _ in order:
        j = used.get(layer, 0)
        if j >= n_units:
            raise ValueError(f"order has more than n_units={n_units} units in layer {layer}")
        out.append((layer, perms[layer][j]) if j < len(perms[layer]) else None)
        used[layer] = j + 1
    return out
