"""Ablation of MLP units at the image positions, through the shared hook mechanism.

Each batch row can ablate a different set of units (one row per k, per kind), so a
whole ablation curve of one image is one forward pass (and one batched generation).
Units are zeroed (or set to a fill value, e.g. their mean activation) only at the
soft-token positions; during KV-cache generation the later single-token steps are left
untouched, as the image positions were already ablated in the cached prefix.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from mmn.hooks import TraceDict
from mmn.models.adapters import LMAdapter
from mmn.models.prefix_lm import ImagePrefixLM


def unit_masks(rows: Sequence[Sequence[tuple[int, int]]], n_layers: int, d_mlp: int) -> Tensor:
    """``Bool[Tensor, "layers batch d_mlp"]``: True where row b ablates (layer, unit)."""
    m = torch.zeros(n_layers, len(rows), d_mlp, dtype=torch.bool)
    for b, units in enumerate(rows):
        if len(units):
            idx = torch.tensor(units, dtype=torch.long)
            m[idx[:, 0], b, idx[:, 1]] = True
    return m


@contextmanager
def ablated(
    adapter: LMAdapter, masks: Tensor, image_slice: slice, fill: Tensor | None = None
) -> Iterator[TraceDict]:
    """Ablate units while the context is open.

    ``masks``: ``Bool[Tensor, "layers batch d_mlp"]`` from :func:`unit_masks`;
    ``fill``: ``Float[Tensor, "layers d_mlp"]`` replacement values (None = zero).
    """
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

        edits[str(layer)] = edit
    mods = {k: adapter.act_module(int(k)) for k in edits}
    with TraceDict(mods, edit_input=edits) as td:
        yield td


def target_probs(plm: ImagePrefixLM, soft: Tensor, text: list[int], target: int, masks: Tensor,
                 fill: Tensor | None = None) -> Tensor:
    """p(c) for one image under each row's ablation: ``Float[Tensor, "rows"]``."""
    rows = masks.shape[1]
    batch = plm.build(soft.expand(rows, -1, -1), [text] * rows)
    with torch.no_grad(), ablated(plm.adapter, masks, batch.image_slice, fill):
        # all rows have the same length: only the last position's logits are needed
        out = plm.adapter.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                logits_to_keep=1)
    logits = out.logits[:, -1, : plm.adapter.vocab_size].float()
    return torch.softmax(logits, -1)[:, target]


def ablated_captions(plm: ImagePrefixLM, soft: Tensor, masks: Tensor, max_new_tokens: int, stop_ids: set[int],
                     fill: Tensor | None = None) -> list[list[int]]:
    """Greedy captions of one image under each row's ablation."""
    rows = masks.shape[1]
    n_patch = soft.shape[1]
    nb = len(plm.bos_ids)
    with ablated(plm.adapter, masks, slice(nb, nb + n_patch), fill):
        ids, _ = plm.generate(soft.expand(rows, -1, -1), max_new_tokens, stop_ids)
    return ids


def unit_scores(a: Tensor, grad: Tensor) -> Tensor:
    """Per-unit attribution for ranking: max over image positions of g. ``[L, P, U] -> [L, U]``."""
    return (a * grad).amax(dim=1)


def rank_units(scores: Tensor, allowed: Tensor | None = None, limit: int | None = None) -> list[tuple[int, int]]:
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


def random_like(units: Sequence[tuple[int, int]], n_units: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """As many random units per layer as ``units`` has, drawn without replacement in that layer."""
    by_layer: dict[int, int] = {}
    for layer, _ in units:
        by_layer[layer] = by_layer.get(layer, 0) + 1
    out = []
    for layer in sorted(by_layer):
        picks = rng.choice(n_units, size=by_layer[layer], replace=False)
        out += [(layer, int(u)) for u in sorted(picks)]
    return out
