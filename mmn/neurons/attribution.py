"""Gradient × activation attribution of every MLP unit to the target token's logit.

g_{k,c,p} = A_{p,k} · ∂y^c/∂A_{p,k} for every unit k of every layer at every image
position p, from ONE forward and ONE backward pass per batch:

* the input embeddings are made to require grad, so the whole graph is recorded
  while no parameter needs (or gets) a gradient;
* :meth:`mmn.models.prefix_lm.ImagePrefixLM.target_forward` keeps each layer's A (the
  input of W_out) attached to the graph; ``torch.autograd.grad(Σ_b y_b, [A_0..A_L])`` then
  gives every layer's gradient at once (:func:`mmn.neurons.methods.grad_x_act_pass`). Rows
  of a batch do not interact (causal LM, right padding), so the gradient of the batch sum
  is each row's own gradient.

Gotcha: y^c is read at the position that *predicts* c, i.e. the last real position of
the row (prefix + caption tokens before c).

What is kept per image (``rank_by``): the paper keeps units, "For the 100 u_k with
highest g_{k,c} for each image, we compute decoder(W_out^k)" (§3.1), with g defined per
image patch p (Eq. 2: g_{k,c} = Z_p^k ∂y^c/∂Z_p^k). ``rank_by="unit"`` (default) scores a
unit by its max over image positions, g_k = max_p g_{k,c,p}, keeps the top k *distinct*
(layer, unit) and records the arg-max patch with A and ∂y/∂A there.
``rank_by="triple"`` keeps the top k (layer, unit, patch) triples (a unit may repeat).

``method`` (:mod:`mmn.neurons.methods`) swaps ∂y/∂A for another per-position multiplier M
(``direct_logit``: W_U[c]·W_out^k; ``integrated_gradients``: the path-averaged gradient);
the ranking and the table are the same, with ``gradient`` = M and ``g`` = A·M.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from mmn.models.prefix_lm import ImagePrefixLM
from mmn.neurons.methods import grad_x_act_pass, method_pass
from mmn.neurons.scoring import AGGREGATES, Aggregate, unit_scores

if TYPE_CHECKING:
    import polars as pl


RankBy = Literal["unit", "triple"]
RANK_BY: tuple[str, ...] = ("unit", "triple")


def _check_rank_by(rank_by: str, aggregate: str = "max") -> None:
    if rank_by not in RANK_BY:
        raise ValueError(f"attribute.rank_by must be one of {RANK_BY}, got {rank_by!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"attribute.aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if aggregate == "sum" and rank_by == "triple":
        raise ValueError("attribute.aggregate: sum scores whole units; rank_by: triple needs aggregate: max")


@dataclass
class TopK:
    """Top k of one image sorted by g descending: distinct units (``rank_by="unit"``,
    ``patch`` = the arg-max patch) or (layer, unit, patch) triples."""

    layer: Int[Tensor, "k"]
    unit: Int[Tensor, "k"]
    patch: Int[Tensor, "k"]
    g: Float[Tensor, "k"]
    activation: Float[Tensor, "k"]
    gradient: Float[Tensor, "k"]


def attribution_maps(
    plm: ImagePrefixLM,
    soft: Float[Tensor, "batch patches d_model"],
    texts: list[list[int]],
    targets: list[int],
    *,
    preactivation: bool = False,
) -> tuple[Float[Tensor, "batch"], Float[Tensor, "batch layers patches d_mlp"],
           Float[Tensor, "batch layers patches d_mlp"]]:
    """Return ``(y, A, dy/dA)`` at the image positions.

    ``soft``: ``Float[Tensor, "batch P d_model"]`` soft tokens; ``texts[b]`` = caption
    tokens before c; ``targets[b]`` = c. ``A`` and the gradient have shape
    ``[batch, n_layers, P, d_mlp]`` (fp32); ``y`` is ``[batch]``. With
    ``preactivation`` the pre-nonlinearity Z (output of the adapter's
    ``preact_module``) replaces A. Materialises every layer: use :func:`attribute_topk`
    for large models.
    """
    y, acts, grads, sl = grad_x_act_pass(plm, soft, texts, targets, preactivation)
    a = torch.stack([t[:, sl, :].detach().float() for t in acts], dim=1)
    g = torch.stack([t[:, sl, :].float() for t in grads], dim=1)
    return y, a, g


def _layer_candidates(a_l: Tensor, g_l: Tensor, k: int, rank_by: RankBy,
                      aggregate: Aggregate = "max") -> tuple[Tensor, ...]:
    """One layer's top-k candidates per row: ``(score fp32, flat index, A, dA)``, each ``[b, kk]``.

    ``a_l``/``g_l``: ``[b, P, U]`` (model dtype). Ranking runs on fp32 products, one row at a
    time (a ``[P, U]`` fp32 copy, not ``[b, P, U]``): in fp16/bf16 the product of two small
    factors underflows to 0 (fp16: below 6e-8) and such units tie, ranked by index. The kept g
    is recomputed in fp32 from the gathered A and dA. Flat index: ``patch * U + unit``
    (triple) or ``unit`` (unit; patch returned separately via the index
    ``argmax_patch * U + unit``, so both modes decode the same way). ``aggregate="sum"``
    (units only): the score is Σ_p A·dA, the patch still the arg-max of A·dA (a label).
    """
    b, n_patch, n_units = a_l.shape
    # a stable descending sort (not topk) so that ties keep the lowest index, as the merge
    # and the full-map reference do: the last layer's g is exactly 0 at every image position
    # (its MLP there cannot reach the position that predicts c), so ties are real
    rows, sums = [], []
    for r in range(b):
        a_r, g_r = a_l[r].float(), g_l[r].float()  # [P, U]
        if rank_by == "unit":
            score, best_patch = unit_scores(a_r, g_r, aggregate, patch=True)  # [U]; first maximal patch
            unit = torch.sort(score, descending=True, stable=True).indices[:k]
            rows.append(best_patch.gather(0, unit) * n_units + unit)  # [kk] index into (patch, unit)
            sums.append(score.gather(0, unit))
        else:
            rows.append(torch.sort((a_r * g_r).reshape(-1), descending=True, stable=True).indices[:k])
    i = torch.stack(rows)
    a_k = a_l.reshape(b, -1).gather(1, i).float()
    g_k = g_l.reshape(b, -1).gather(1, i).float()
    return (torch.stack(sums) if aggregate == "sum" else a_k * g_k), i, a_k, g_k


def _merge(v: Tensor, idx: Tensor, av: Tensor, gv: Tensor, k: int, n_patch: int, n_units: int,
           rank_by: RankBy) -> list[TopK]:
    """Merge the per-layer candidates (``[b, n]`` each; idx flat over (layer, patch, unit))
    into each row's top k, g descending, ties by (layer, unit, patch) order: deterministic."""
    out = []
    k = min(k, v.shape[1])
    layer_all, patch_all, unit_all = idx // (n_patch * n_units), (idx // n_units) % n_patch, idx % n_units
    # tie key: the flat index over (layer, patch, unit) for triples, over (layer, unit) for units
    key = idx if rank_by == "triple" else layer_all * n_units + unit_all
    for r in range(v.shape[0]):
        by_key = torch.argsort(key[r])
        order = by_key[torch.sort(v[r, by_key], descending=True, stable=True).indices[:k]]
        out.append(TopK(layer_all[r, order], unit_all[r, order], patch_all[r, order], v[r, order], av[r, order],
                        gv[r, order]))
    return out


def attribute_topk(
    plm: ImagePrefixLM,
    soft: Float[Tensor, "batch patches d_model"],
    texts: list[list[int]],
    targets: list[int],
    k: int,
    *,
    preactivation: bool = False,
    layers: Sequence[int] | None = None,
    rank_by: str = "unit",  # one of RANK_BY (a ValueError otherwise)
    method: str = "grad_x_act",
    ig_steps: int = 16,
    aggregate: Aggregate = "max",
) -> tuple[Float[Tensor, "batch"], list[TopK]]:
    """Top-k units (or triples) per image without materialising all layers' maps at once.

    Same forward/backward as :func:`attribution_maps`, but each layer's g is reduced on the
    model's device before moving on (unit: max over patches, then that layer's top k
    units; triple: that layer's top k triples), so memory beyond the autograd graph is
    O(batch · L · k) instead of O(batch · L · P · d_mlp). Equal to
    ``top_k(*attribution_maps(...)[1:], k, rank_by)`` (tested). ``layers`` restricts the
    candidates to those layers (default: all); then equal to the same top-k over the
    maps of those layers only. ``method``: :func:`method_pass` (``gradient`` = its M).
    ``aggregate``: :func:`mmn.neurons.scoring.unit_scores` (``sum``: g = Σ_p A·M, units only).
    """
    _check_rank_by(rank_by, aggregate)
    layers = list(range(plm.adapter.n_layers)) if layers is None else sorted(set(layers))
    y, acts, grads = method_pass(plm, soft, texts, targets, layers, method, preactivation=preactivation,
                                 ig_steps=ig_steps)
    n_patch, n_units = acts[0].shape[1], plm.adapter.d_mlp
    cand: list[tuple[Tensor, ...]] = []
    for layer, a_l, g_l in zip(layers, acts, grads):
        v, i, a_k, g_k = _layer_candidates(a_l, g_l, k, rank_by, aggregate)
        cand.append((v, i + layer * n_patch * n_units, a_k, g_k))  # flat index over (layer, patch, unit)
    v, idx, av, gv = (torch.cat([c[j] for c in cand], 1).cpu() for j in range(4))
    return y, _merge(v, idx, av, gv, k, n_patch, n_units, rank_by)


def top_k(a: Float[Tensor, "batch layers patches d_mlp"], grad: Float[Tensor, "batch layers patches d_mlp"], k: int,
          rank_by: str = "triple", aggregate: Aggregate = "max") -> list[TopK]:
    """Reference top ``k`` from full maps ``a``/``grad`` (``[batch, L, P, U]``) per image.

    ``rank_by="triple"``: top k of g = a·grad over (layer, patch, unit), ties by flat index
    (layer, patch, unit). ``rank_by="unit"``: g_k = max over patches of g per (layer, unit),
    top k distinct units, ties by (layer, unit); ``patch`` is the first maximal patch.
    ``aggregate="sum"`` (units only): g_k = Σ_p a·grad.
    """
    _check_rank_by(rank_by, aggregate)
    b, n_layers, n_patch, n_units = a.shape
    if rank_by == "unit":
        v, best = unit_scores(a, grad, aggregate, patch=True)  # [b, L, U] each
        v = v.reshape(b, -1)  # [b, L*U]
        lu = torch.arange(n_layers * n_units).expand(b, -1)
        idx = (lu // n_units) * n_patch * n_units + best.reshape(b, -1) * n_units + lu % n_units
    else:
        v = (a * grad).reshape(b, -1)
        idx = torch.arange(v.shape[1]).expand(b, -1)
    av = a.reshape(b, -1).gather(1, idx)
    gv = grad.reshape(b, -1).gather(1, idx)
    return _merge(v, idx, av, gv, k, n_patch, n_units, rank_by)


def attribution_schema() -> dict:
    """Column types of ``attributions.parquet`` (polars imported lazily: the GPU path needs none)."""
    import polars as pl

    return {"image_id": pl.Int64, "rank": pl.Int64, "layer": pl.Int64, "unit": pl.Int64, "patch": pl.Int64,
            "g": pl.Float64, "activation": pl.Float64, "gradient": pl.Float64, "target_token_id": pl.Int64,
            "target_token": pl.Utf8, "y": pl.Float64}


def attribute_captions(
    captions: "pl.DataFrame",
    load_image: Callable[[int], Image.Image],
    plm: ImagePrefixLM,
    *,
    k: int,
    batch_size: int,
    preactivation: bool = False,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    layers: Sequence[int] | None = None,
    rank_by: str = "unit",  # one of RANK_BY (a ValueError otherwise)
    method: str = "grad_x_act",
    ig_steps: int = 16,
    aggregate: Aggregate = "max",
) -> "pl.DataFrame":
    """Top-k units (``rank_by="unit"``: k distinct (layer, unit), ``patch`` = arg-max patch)
    or triples for every image of ``captions`` that has a target (:func:`attribution_schema`).

    Images are batched in image_id order; captions of different lengths share a batch
    (right padding). Rows are sorted by (image_id, rank). ``shard=(rank, world)`` keeps
    only this rank's batches; ``layers`` restricts attribution to those layers; ``method``
    and ``ig_steps``: :func:`method_pass` (integrated gradients: the images of a batch one
    after another, each with its ``ig_steps`` path points as the rows of one forward).
    ``aggregate``: ``max`` (the paper's g) or ``sum`` (column ``g`` = Σ_p A·M; ``activation``
    and ``gradient`` stay those of the recorded arg-max patch, so g ≠ their product).
    """
    import polars as pl

    from mmn.distributed import shard_batches

    todo = captions.filter(pl.col("has_noun")).sort("image_id")
    rows: list[dict] = []
    recs = list(todo.iter_rows(named=True))
    for idx in tqdm(shard_batches(len(recs), batch_size, shard), desc="attribute", disable=not progress):
        chunk = [recs[i] for i in idx]
        soft = plm.image_soft_tokens([load_image(r["image_id"]) for r in chunk])
        texts = [list(r["caption_token_ids"][: r["target_pos"]]) for r in chunk]
        targets = [int(r["target_token_id"]) for r in chunk]
        y, tops = attribute_topk(plm, soft, texts, targets, k, preactivation=preactivation, layers=layers,
                                 rank_by=rank_by, method=method, ig_steps=ig_steps, aggregate=aggregate)
        for r, yi, top in zip(chunk, y.tolist(), tops):
            for rank, (l, u, p, gv, av, dv) in enumerate(
                zip(top.layer.tolist(), top.unit.tolist(), top.patch.tolist(), top.g.tolist(),
                    top.activation.tolist(), top.gradient.tolist())
            ):
                rows.append(
                    {"image_id": r["image_id"], "rank": rank, "layer": l, "unit": u, "patch": p, "g": gv,
                     "activation": av, "gradient": dv, "target_token_id": r["target_token_id"],
                     "target_token": r["target_token"], "y": yi}
                )
    return pl.DataFrame(rows, schema=attribution_schema()).sort(["image_id", "rank"])
