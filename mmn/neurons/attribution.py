"""Gradient × activation attribution of every MLP unit to the target token's logit.

g_{k,c,p} = A_{p,k} · ∂y^c/∂A_{p,k} for every unit k of every layer at every image
position p, from ONE forward and ONE backward pass per batch:

* the input embeddings are made to require grad, so the whole graph is recorded
  while no parameter needs (or gets) a gradient;
* :class:`mmn.hooks.TraceDict` keeps each layer's A (the input of W_out) attached to
  the graph; ``torch.autograd.grad(Σ_b y_b, [A_0..A_L])`` then gives every layer's
  gradient at once. Rows of a batch do not interact (causal LM, right padding), so
  the gradient of the batch sum is each row's own gradient.

Gotcha: y^c is read at the position that *predicts* c, i.e. the last real position of
the row (prefix + caption tokens before c).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from mmn.hooks import TraceDict
from mmn.models.prefix_lm import ImagePrefixLM
from mmn.models.vision import PatchEncoder

if TYPE_CHECKING:
    import polars as pl


@dataclass
class TopK:
    """Top-k (layer, unit, patch) triples of one image, sorted by g descending."""

    layer: Tensor  # Long[k]
    unit: Tensor  # Long[k]
    patch: Tensor  # Long[k]
    g: Tensor  # Float[k]
    activation: Tensor  # Float[k]
    gradient: Tensor  # Float[k]


def _one_pass(
    plm: ImagePrefixLM, soft: Tensor, texts: list[list[int]], targets: list[int], preactivation: bool,
    layers: Sequence[int] | None = None,
) -> tuple[Tensor, list[Tensor], tuple[Tensor, ...], slice]:
    """One forward + one backward: ``(y [batch], A per layer, dy/dA per layer, image slice)``.

    Only ``layers`` (default: all) are traced and differentiated; the lists follow
    their order. Logits are computed only at the positions that predict c (one per
    distinct row length), so the LM head costs nothing at the other positions.
    """
    ad = plm.adapter
    layers = list(range(ad.n_layers)) if layers is None else list(layers)
    bad = [x for x in layers if not 0 <= x < ad.n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range 0..{ad.n_layers - 1}")
    batch = plm.build(soft.detach(), texts)
    embeds = batch.inputs_embeds.detach().requires_grad_(True)
    if preactivation:
        mods, kw = {str(l): ad.preact_module(l) for l in layers}, {"retain_output": True}
    else:
        mods, kw = {str(l): ad.act_module(l) for l in layers}, {"retain_input": True}
    dev = embeds.device
    keep = sorted({n - 1 for n in batch.lengths})
    col = torch.tensor([keep.index(n - 1) for n in batch.lengths], device=dev)
    with torch.enable_grad(), TraceDict(mods, **kw) as traces:
        out = ad.model(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                       logits_to_keep=torch.tensor(keep, device=dev))
        rows = torch.arange(len(targets), device=dev)
        y = out.logits[rows, col, torch.tensor(targets, device=dev)]
        acts = [(traces[str(l)].output if preactivation else traces[str(l)].input) for l in layers]
        grads = torch.autograd.grad(y.sum(), acts)
    return y.detach().float(), acts, grads, batch.image_slice


def attribution_maps(
    plm: ImagePrefixLM,
    soft: Tensor,
    texts: list[list[int]],
    targets: list[int],
    *,
    preactivation: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(y, A, dy/dA)`` at the image positions.

    ``soft``: ``Float[Tensor, "batch P d_model"]`` soft tokens; ``texts[b]`` = caption
    tokens before c; ``targets[b]`` = c. ``A`` and the gradient have shape
    ``[batch, n_layers, P, d_mlp]`` (fp32); ``y`` is ``[batch]``. With
    ``preactivation`` the pre-nonlinearity Z (output of the adapter's
    ``preact_module``) replaces A. Materialises every layer: use :func:`attribute_topk`
    for large models.
    """
    y, acts, grads, sl = _one_pass(plm, soft, texts, targets, preactivation)
    a = torch.stack([t[:, sl, :].detach().float() for t in acts], dim=1)
    g = torch.stack([t[:, sl, :].float() for t in grads], dim=1)
    return y, a, g


def attribute_topk(
    plm: ImagePrefixLM,
    soft: Tensor,
    texts: list[list[int]],
    targets: list[int],
    k: int,
    *,
    preactivation: bool = False,
    layers: Sequence[int] | None = None,
) -> tuple[Tensor, list[TopK]]:
    """Top-k triples per image without materialising all layers' maps at once.

    Same forward/backward as :func:`attribution_maps`, but each layer's g is reduced to
    its own top k (on the model's device) before moving on, so memory beyond the
    autograd graph is O(batch · L · k) instead of O(batch · L · P · d_mlp). Equal to
    ``top_k(*attribution_maps(...)[1:], k)`` (tested). ``layers`` restricts the
    candidates to those layers (default: all); then equal to the same top-k over the
    maps of those layers only.
    """
    layers = list(range(plm.adapter.n_layers)) if layers is None else sorted(set(layers))
    y, acts, grads, sl = _one_pass(plm, soft, texts, targets, preactivation, layers)
    b = soft.shape[0]
    n_patch, n_units = sl.stop - sl.start, plm.adapter.d_mlp
    cand_v, cand_i, cand_a, cand_g = [], [], [], []
    for layer, a_l, g_l in zip(layers, acts, grads):
        # rank in the model's dtype (no full-size fp32 copies), then recompute the kept
        # g in fp32 from the gathered activation and gradient
        a_l = a_l[:, sl, :].detach().reshape(b, -1)
        g_l = g_l[:, sl, :].reshape(b, -1)
        kk = min(k, a_l.shape[1])
        _, i = torch.topk(a_l * g_l, kk, dim=1, sorted=False)
        a_k, g_k = a_l.gather(1, i).float(), g_l.gather(1, i).float()
        cand_v.append(a_k * g_k)
        cand_i.append(i + layer * n_patch * n_units)  # flat index over (layer, patch, unit)
        cand_a.append(a_k)
        cand_g.append(g_k)
    v, idx = torch.cat(cand_v, 1).cpu(), torch.cat(cand_i, 1).cpu()
    av, gv = torch.cat(cand_a, 1).cpu(), torch.cat(cand_g, 1).cpu()
    out_list = []
    k = min(k, v.shape[1])
    for r in range(b):
        by_index = torch.argsort(idx[r])
        vr, ir, ar, gr = v[r, by_index], idx[r, by_index], av[r, by_index], gv[r, by_index]
        order = torch.sort(vr, descending=True, stable=True).indices[:k]
        flat = ir[order]
        out_list.append(TopK(flat // (n_patch * n_units), flat % n_units, (flat // n_units) % n_patch,
                             vr[order], ar[order], gr[order]))
    return y, out_list


def top_k(a: Tensor, grad: Tensor, k: int) -> list[TopK]:
    """Top ``k`` of g = a·grad over (layer, patch, unit) per image.

    ``a``/``grad``: ``[batch, L, P, U]``. Ties break by flat index (layer, patch, unit)
    so results are deterministic.
    """
    b, n_layers, n_patch, n_units = a.shape
    g = (a * grad).reshape(b, -1)
    k = min(k, g.shape[1])
    vals, idx = torch.topk(g, k, dim=1, sorted=False)
    out = []
    for i in range(b):
        # order by g descending, ties by flat index (layer, patch, unit): deterministic
        by_index = torch.argsort(idx[i])
        v, ix = vals[i, by_index], idx[i, by_index]
        order = ix[torch.sort(v, descending=True, stable=True).indices]
        layer = order // (n_patch * n_units)
        patch = (order // n_units) % n_patch
        unit = order % n_units
        out.append(TopK(layer, unit, patch, g[i, order], a[i].reshape(-1)[order], grad[i].reshape(-1)[order]))
    return out


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
    enc: PatchEncoder,
    *,
    k: int,
    batch_size: int,
    preactivation: bool = False,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    layers: Sequence[int] | None = None,
) -> "pl.DataFrame":
    """Top-k triples for every image of ``captions`` that has a target (:func:`attribution_schema`).

    Images are batched in image_id order; captions of different lengths share a batch
    (right padding). Rows are sorted by (image_id, rank). ``shard=(rank, world)`` keeps
    only this rank's batches; ``layers`` restricts attribution to those layers.
    """
    import polars as pl

    from mmn.distributed import shard_batches

    todo = captions.filter(pl.col("has_noun")).sort("image_id")
    rows: list[dict] = []
    recs = list(todo.iter_rows(named=True))
    for idx in tqdm(shard_batches(len(recs), batch_size, shard), desc="attribute", disable=not progress):
        chunk = [recs[i] for i in idx]
        with torch.no_grad():
            soft = plm.soft_tokens(enc.encode([load_image(r["image_id"]) for r in chunk]))
        texts = [list(r["caption_token_ids"][: r["target_pos"]]) for r in chunk]
        targets = [int(r["target_token_id"]) for r in chunk]
        y, tops = attribute_topk(plm, soft, texts, targets, k, preactivation=preactivation, layers=layers)
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
