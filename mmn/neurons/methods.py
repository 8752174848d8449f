"""Attribution methods besides the paper's gradient × activation, on the same hooks.

Every method gives, per image, a multiplier M_{l,p,k} at each image position p so that a
unit's score there is A_{l,p,k} · M_{l,p,k}; units are then ranked exactly as the paper's
g (max over image positions, top k distinct units; :mod:`mmn.neurons.attribution`):

* ``grad_x_act`` (Schwettmann et al. 2023, Eq. 2): M = ∂y^c/∂A, one forward + backward.
* ``direct_logit`` (MM_Neurons, Pan et al. 2023, "Finding and Editing Multi-Modal Neurons
  in Pre-Trained Transformers"): M = W_U[c] · W_out^k, the unit's direct contribution to
  the logit of c per unit of activation (raw unembedding row, no final norm, as the
  paper's decoder(W_out^k)). Gradient-free: one forward.
* ``integrated_gradients`` (Sundararajan et al. 2017; per neuron as in Knowledge Neurons,
  Dai et al. 2022): M = ∫_0^1 ∂y^c/∂A(αA) dα over the straight path from 0 to the clean
  activations, ALL attributed layers' image-position activations scaled together (each
  layer's A is replaced by α·A_clean, so the path is one path in the space of all
  attributed activations and completeness holds: Σ A·M ≈ y(A) − y(0), with y(0) = every
  attributed unit zeroed at the image positions). Midpoint Riemann sum over ``steps``
  points, batched as rows: ``steps`` forwards + backwards per image, not per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mmn.hooks import TraceDict
from mmn.models.adapters import LMAdapter
from mmn.models.prefix_lm import ImagePrefixLM, PrefixBatch

from mmn.neurons.names import METHODS, Method  # noqa: E402,F401 - re-exported: the one list of methods


def check_method(method: str, preactivation: bool = False) -> None:
    """Raise a clear error for an unknown method or one that has no pre-activation form."""
    if method not in METHODS:
        raise ValueError(f"attribute.method must be one of {METHODS}, got {method!r}")
    if preactivation and method != "grad_x_act":
        raise ValueError(f"attribute.preactivation is defined for grad_x_act only, not {method!r}")


def target_logit(adapter: LMAdapter, batch: PrefixBatch, targets: Sequence[int],
                 embeds: Float[Tensor, "batch seq d_model"] | None = None) -> Float[Tensor, "batch"]:
    """y^c of every row (``[batch]``, model dtype, attached to the graph if any) at the position
    that predicts c (the row's last real position); logits only at those positions."""
    dev = batch.inputs_embeds.device
    keep = sorted({n - 1 for n in batch.lengths})
    col = torch.tensor([keep.index(n - 1) for n in batch.lengths], device=dev)
    out = adapter.model(inputs_embeds=batch.inputs_embeds if embeds is None else embeds,
                        attention_mask=batch.attention_mask, logits_to_keep=torch.tensor(keep, device=dev))
    rows = torch.arange(len(targets), device=dev)
    return out.logits[rows, col, torch.tensor(list(targets), device=dev)]


def _clean_acts(plm: ImagePrefixLM, soft: Tensor, texts: list[list[int]], targets: list[int],
                layers: Sequence[int]) -> tuple[Tensor, list[Tensor], slice]:
    """One forward, no graph: ``(y [b] fp32, A at the image positions per layer [b, P, U], slice)``."""
    ad = plm.adapter
    batch = plm.build(soft.detach(), texts)
    sl = batch.image_slice
    with torch.no_grad(), TraceDict({str(l): ad.act_module(l) for l in layers}, retain_input=True,
                                    detach=True) as tr:
        y = target_logit(ad, batch, targets)
    return y.float(), [tr[str(l)].input[:, sl, :] for l in layers], sl


def direct_logit_weights(adapter: LMAdapter, targets: Sequence[int], layers: Sequence[int]
                         ) -> list[Float[Tensor, "batch d_mlp"]]:
    """W_U[c] · W_out^k for every unit of each layer: one ``Float[Tensor, "batch d_mlp"]`` (fp32) per layer."""
    w_u = adapter.unembed_weight()[torch.tensor(list(targets), device=adapter.device)].float()  # [b, d_model]
    return [w_u @ adapter.w_out(l).float() for l in layers]


def direct_logit_pass(plm: ImagePrefixLM, soft: Float[Tensor, "batch patches d_model"], texts: list[list[int]],
                      targets: list[int], layers: Sequence[int]
                      ) -> tuple[Float[Tensor, "batch"], list[Float[Tensor, "batch patches d_mlp"]],
                                 list[Float[Tensor, "batch patches d_mlp"]]]:
    """``(y, A, M)`` with M = W_U[c]·W_out^k broadcast over the image positions (``[b, P, U]``
    views, A's dtype); one forward, no backward."""
    y, acts, _ = _clean_acts(plm, soft, texts, targets, layers)
    w = direct_logit_weights(plm.adapter, targets, layers)
    return y, acts, [wl.to(a.dtype)[:, None, :].expand_as(a) for wl, a in zip(w, acts)]


def _replace_image(leaf: Tensor, sl: slice):
    """Edit fn: the module input with its image positions replaced by ``leaf`` (``[rows, P, U]``)."""

    def edit(x: Tensor) -> Tensor:
        return torch.cat([x[:, : sl.start], leaf.to(x.dtype), x[:, sl.stop:]], dim=1)

    return edit


def ig_path_logits(plm: ImagePrefixLM, soft: Float[Tensor, "1 patches d_model"], text: list[int], target: int,
                   acts: Sequence[Float[Tensor, "patches d_mlp"]], layers: Sequence[int], alphas: Float[Tensor, "rows"],
                   grad: bool = True
                   ) -> tuple[Float[Tensor, "rows"], list[Float[Tensor, "rows patches d_mlp"]] | None]:
    """y^c with every listed layer's image-position A replaced by α·A (one row per α).

    ``soft``: ``[1, P, d_model]``; ``acts[j]``: ``[P, U]`` clean A of ``layers[j]``; ``alphas``:
    ``Float[Tensor, "rows"]``. Returns ``(y [rows] fp32, dy/d(αA) per layer [rows, P, U] fp32 or None)``.
    """
    ad = plm.adapter
    n = int(alphas.numel())
    batch = plm.build(soft.detach().expand(n, -1, -1), [list(text)] * n)
    sl = batch.image_slice
    a = alphas.to(ad.device, torch.float32)[:, None, None]
    leaves = [(a * x.float()[None]).to(x.dtype).requires_grad_(grad) for x in acts]
    edits = {str(l): _replace_image(z, sl) for l, z in zip(layers, leaves)}
    with torch.set_grad_enabled(grad), TraceDict({str(l): ad.act_module(l) for l in layers}, edit_input=edits):
        y = target_logit(ad, batch, [target] * n)
        grads = torch.autograd.grad(y.sum(), leaves) if grad else None
    return y.detach().float(), None if grads is None else [g.float() for g in grads]


def integrated_gradients_pass(plm: ImagePrefixLM, soft: Float[Tensor, "batch patches d_model"],
                              texts: list[list[int]], targets: list[int], layers: Sequence[int], steps: int,
                              rows: int | None = None
                              ) -> tuple[Float[Tensor, "batch"], list[Float[Tensor, "batch patches d_mlp"]],
                                         list[Float[Tensor, "batch patches d_mlp"]]]:
    """``(y, A, M)`` with M the path-averaged gradient (midpoint rule, ``steps`` points, all
    layers scaled together; see the module docstring). ``rows``: path points per forward
    (default: all ``steps`` of an image in one forward + backward)."""
    if steps < 1:
        raise ValueError(f"attribute.ig_steps must be >= 1, got {steps}")
    y, acts, _ = _clean_acts(plm, soft, texts, targets, layers)
    alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    mult = [torch.zeros(a.shape, dtype=torch.float32, device=a.device) for a in acts]
    for i in range(len(texts)):
        for chunk in alphas.split(rows or steps):
            _, grads = ig_path_logits(plm, soft[i: i + 1], texts[i], targets[i], [a[i] for a in acts], layers,
                                      chunk.float())
            for m, g in zip(mult, grads):
                m[i] += g.sum(0)
    return y, acts, [(m / steps).to(a.dtype) for m, a in zip(mult, acts)]


def unit_score_map(plm: ImagePrefixLM, soft: Float[Tensor, "1 patches d_model"], text: list[int], target: int,
                   method: str, *, layers: Sequence[int] | None = None, ig_steps: int = 16, rows: int | None = None
                   ) -> tuple[float, Float[Tensor, "layers d_mlp"], float]:
    """One image's per-unit score, max over image positions of A·M:
    ``(y, Float[Tensor, "L d_mlp"], total)`` with ``total`` = Σ A·M over every attributed
    layer, image position and unit (integrated gradients: ≈ y(A) − y(0) by completeness;
    the others: their linear estimate of it).

    Layers outside ``layers`` (default: all) score -inf. For ``grad_x_act`` the scores are
    :func:`mmn.neurons.ablation.unit_scores` of the full maps.
    """
    from mmn.neurons.attribution import method_pass

    ad = plm.adapter
    layers = list(range(ad.n_layers)) if layers is None else sorted(set(layers))
    y, acts, mult = method_pass(plm, soft, [list(text)], [int(target)], layers, method, ig_steps=ig_steps,
                                rows=rows)
    out = torch.full((ad.n_layers, ad.d_mlp), float("-inf"))
    total = 0.0
    for l, a, m in zip(layers, acts, mult):
        g = a[0].detach().float() * m[0].detach().float()  # [P, U]
        out[l] = g.amax(dim=0).cpu()
        total += float(g.double().sum())
    return float(y[0]), out, total
