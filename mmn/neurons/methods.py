"""Attribution methods besides the paper's gradient × activation, on the same hooks.

Every method gives, per image, a multiplier M_{l,p,k} at each image position p so that a
unit's score there is A_{l,p,k} · M_{l,p,k}; units are then ranked exactly as the paper's
g (max over image positions, top k distinct units; :mod:`mmn.neurons.attribution`):

* ``grad_x_act`` (Schwettmann et al. 2023, Eq. 2): M = ∂y^c/∂A, one forward + backward.
* ``direct_logit`` (MM_Neurons, Pan et al. 2023, "Finding and Editing Multi-Modal Neurons
  in Pre-Trained Transformers"): M = W_U[c] · W_out^k, the unit's direct contribution to
  the logit of c per unit of activation (raw unembedding row, no final norm, as the
  paper's decoder(W_out^k)). Gradient-free: one forward.
* ``integrated_gradients`` (Sundararajan et al. 2017; per neuron and per layer as in
  Knowledge Neurons, Dai et al. 2022): for each attributed layer l, M_l = ∫_0^1 ∂y^c/∂A_l
  dα along the path that scales ONLY layer l's image-position activations, A_l → α·A_l,
  while every later layer computes from it (its MLPs at the image positions respond, as
  they do when a unit of l is ablated: the effect a unit has through later MLPs is in M_l).
  Completeness holds per layer: Σ_{p,k} A_l·M_l ≈ y(A) − y(A_l = 0 at the image positions).
  Midpoint Riemann sum over ``steps`` points, batched as rows: ``steps`` forwards +
  backwards per image AND per attributed layer.

  (Replacing every layer's A by α·A at once, the variant before, makes M a partial
  derivative that leaves out the path through later layers' MLPs at the image positions,
  a different quantity from the exact single-unit effect it is compared with.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mmn.models.adapters import LMAdapter
from mmn.models.prefix_lm import ImagePrefixLM
from mmn.neurons.scoring import unit_scores

from mmn.neurons.names import METHODS, Method  # noqa: E402,F401 - re-exported: the one list of methods


def check_method(method: str, preactivation: bool = False) -> None:
    """Raise a clear error for an unknown method or one that has no pre-activation form."""
    if method not in METHODS:
        raise ValueError(f"attribute.method must be one of {METHODS}, got {method!r}")
    if preactivation and method != "grad_x_act":
        raise ValueError(f"attribute.preactivation is defined for grad_x_act only, not {method!r}")


def grad_x_act_pass(
    plm: ImagePrefixLM, soft: Tensor, texts: list[list[int]], targets: list[int], preactivation: bool,
    layers: Sequence[int] | None = None,
) -> tuple[Tensor, list[Tensor], tuple[Tensor, ...], slice]:
    """One forward + one backward: ``(y [batch], A per layer, dy/dA per layer, image slice)``.

    The input embeddings are made to require grad, so the whole graph is recorded while no
    parameter needs (or gets) a gradient; each layer's A stays attached to the graph
    (:meth:`ImagePrefixLM.target_forward`'s ``retain``) and ``torch.autograd.grad(Σ_b y_b,
    [A_0..A_L])`` gives every layer's gradient at once (rows do not interact: causal LM,
    right padding). Only ``layers`` (default: all) are traced and differentiated; the lists
    follow their order.
    """
    ad = plm.adapter
    layers = list(range(ad.n_layers)) if layers is None else list(layers)
    bad = [x for x in layers if not 0 <= x < ad.n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range 0..{ad.n_layers - 1}")
    batch = plm.build(soft.detach(), texts)
    embeds = batch.inputs_embeds.detach().requires_grad_(True)
    with torch.enable_grad():
        fwd = plm.target_forward(batch, targets, embeds=embeds, retain=layers, preactivation=preactivation)
        acts = [fwd.acts[l] for l in layers]
        y = fwd.y
        if acts and acts[0].dtype == torch.float16:
            grads = _loss_scaled_grad(y.sum(), acts)
        else:
            grads = torch.autograd.grad(y.sum(), acts)
    return y.detach().float(), acts, grads, batch.image_slice


FP16_LOSS_SCALE = 2.0 ** 16


def _loss_scaled_grad(out: Tensor, inputs: list[Tensor], scale: float = FP16_LOSS_SCALE) -> tuple[Tensor, ...]:
    """d out / d inputs for an fp16 graph, as mixed-precision training does it: the backward of
    ``scale · out`` (gradients below fp16's 6e-8 would otherwise flush to 0 and tie), divided back
    in fp32; on an overflow (inf/nan) ``scale`` is divided by 2**4 and the backward redone, down
    to 1. Returns fp32 gradients (unscaled in fp16 they would underflow again)."""
    while True:
        grads = torch.autograd.grad(out * scale, inputs, retain_graph=scale > 1)
        if scale <= 1 or all(bool(torch.isfinite(g).all()) for g in grads):
            return tuple(g.float() / scale for g in grads)
        scale = max(1.0, scale / 16)


def _clean_acts(plm: ImagePrefixLM, soft: Tensor, texts: list[list[int]], targets: list[int],
                layers: Sequence[int]) -> tuple[Tensor, list[Tensor], slice]:
    """One forward, no graph: ``(y [b] fp32, A at the image positions per layer [b, P, U], slice)``."""
    batch = plm.build(soft.detach(), texts)
    sl = batch.image_slice
    with torch.no_grad():
        fwd = plm.target_forward(batch, targets, retain=layers)
    return fwd.y.float(), [fwd.acts[l][:, sl, :] for l in layers], sl


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


def _replace_image(leaf: Tensor, sl: slice, rows: Tensor | None = None):
    """Edit fn: the module input with its image positions replaced by ``leaf`` (``[rows, P, U]``),
    in the rows where ``rows`` (``Bool[Tensor, "rows"]``, default all) is true; the other rows
    keep what the layer computed (their ``leaf`` entries get no gradient)."""

    def edit(x: Tensor) -> Tensor:
        img = leaf.to(x.dtype) if rows is None else torch.where(rows[:, None, None], leaf.to(x.dtype), x[:, sl])
        return torch.cat([x[:, : sl.start], img, x[:, sl.stop:]], dim=1)

    return edit


def ig_path_logits(plm: ImagePrefixLM, soft: Float[Tensor, "1 patches d_model"], text: list[int], target: int,
                   acts: Sequence[Float[Tensor, "patches d_mlp"]], layers: Sequence[int], alphas: Float[Tensor, "rows"],
                   grad: bool = True, row_layer: Sequence[int] | None = None,
                   ) -> tuple[Float[Tensor, "rows"], list[Float[Tensor, "rows patches d_mlp"]] | None]:
    """y^c with listed layers' image-position A replaced by α·A (one row per α); the layers
    not replaced compute as usual. ``row_layer`` (default: every listed layer in every row,
    one joint path): row r replaces only ``layers[row_layer[r]]``, so one forward carries the
    path points of several layers, each layer's later layers computing (integrated gradients).

    ``soft``: ``[1, P, d_model]``; ``acts[j]``: ``[P, U]`` clean A of ``layers[j]``; ``alphas``:
    ``Float[Tensor, "rows"]``. Returns ``(y [rows] fp32, dy/d(αA) per layer [rows, P, U] fp32 or None)``;
    with ``row_layer`` the gradient of layer j is 0 in the rows that do not replace it.
    """
    ad = plm.adapter
    n = int(alphas.numel())
    batch = plm.build(soft.detach().expand(n, -1, -1), [list(text)] * n)
    sl = batch.image_slice
    a = alphas.to(ad.device, torch.float32)[:, None, None]
    leaves = [(a * x.float()[None]).to(x.dtype).requires_grad_(grad) for x in acts]
    owner = None if row_layer is None else torch.as_tensor(list(row_layer), device=ad.device)
    edits = {l: _replace_image(z, sl, None if owner is None else owner == j)
             for j, (l, z) in enumerate(zip(layers, leaves))}
    with torch.set_grad_enabled(grad):
        y = plm.target_forward(batch, [target] * n, edits=edits).y
        grads = torch.autograd.grad(y.sum(), leaves) if grad else None
    return y.detach().float(), None if grads is None else [g.float() for g in grads]


def integrated_gradients_pass(plm: ImagePrefixLM, soft: Float[Tensor, "batch patches d_model"],
                              texts: list[list[int]], targets: list[int], layers: Sequence[int], steps: int,
                              rows: int | None = None
                              ) -> tuple[Float[Tensor, "batch"], list[Float[Tensor, "batch patches d_mlp"]],
                                         list[Float[Tensor, "batch patches d_mlp"]]]:
    """``(y, A, M)`` with M_l the path-averaged gradient of layer l alone (midpoint rule,
    ``steps`` points; later layers compute from the scaled A_l; see the module docstring).
    ``rows``: path points per forward (default ``steps``); one forward carries the points of
    consecutive layers (``rows`` in all, a row scaling one layer), so an image costs
    ``ceil(steps · n_layers / rows)`` forwards + backwards."""
    if steps < 1:
        raise ValueError(f"attribute.ig_steps must be >= 1, got {steps}")
    y, acts, _ = _clean_acts(plm, soft, texts, targets, layers)
    alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    # every (layer index, alpha) path point of one image, in chunks of `rows`
    points = [(j, float(a)) for j in range(len(layers)) for a in alphas]
    size = rows or steps
    mult = [torch.zeros(a.shape, dtype=torch.float32, device=a.device) for a in acts]
    for i in range(len(texts)):
        for start in range(0, len(points), size):
            chunk = points[start: start + size]
            js = sorted({j for j, _ in chunk})
            local = {j: n for n, j in enumerate(js)}
            _, grads = ig_path_logits(plm, soft[i: i + 1], texts[i], targets[i], [acts[j][i] for j in js],
                                      [layers[j] for j in js], torch.tensor([a for _, a in chunk]),
                                      row_layer=[local[j] for j, _ in chunk])
            for j, g in zip(js, grads):
                mult[j][i] += g.sum(0)  # rows of other layers hold 0
    return y, acts, [(m / steps).to(a.dtype) for m, a in zip(mult, acts)]


def method_pass(
    plm: ImagePrefixLM, soft: Tensor, texts: list[list[int]], targets: list[int], layers: Sequence[int],
    method: str = "grad_x_act", *, preactivation: bool = False, ig_steps: int = 16, rows: int | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``(y [batch], A per layer, M per layer)`` at the image positions (``[batch, P, U]`` each,
    model dtype; ``layers`` in order) for ``method`` (:data:`METHODS`): g = A·M.
    ``grad_x_act``: M = ∂y/∂A (:func:`grad_x_act_pass`); ``rows``: IG path points per
    forward (default all ``ig_steps``)."""
    check_method(method, preactivation)
    if method == "direct_logit":
        return direct_logit_pass(plm, soft, texts, targets, layers)
    if method == "integrated_gradients":
        return integrated_gradients_pass(plm, soft, texts, targets, layers, ig_steps, rows)
    y, acts, grads, sl = grad_x_act_pass(plm, soft, texts, targets, preactivation, layers)
    return y, [a[:, sl, :].detach() for a in acts], [g[:, sl, :] for g in grads]


def unit_score_maps(plm: ImagePrefixLM, soft: Float[Tensor, "1 patches d_model"], text: list[int], target: int,
                    method: str, *, layers: Sequence[int] | None = None, ig_steps: int = 16, rows: int | None = None,
                    aggregates: Sequence[str] = ("max",)) -> tuple[float, dict[str, Tensor], float]:
    """One image's per-unit scores from ONE pass of ``method``: ``(y, {aggregate:
    Float[Tensor, "L d_mlp"]}, total)``, each map :func:`mmn.neurons.scoring.unit_scores` of
    A·M over the image positions (``max``: the paper's g; ``sum``: Σ_p A·M, the first-order
    estimate of zeroing the unit at every image position), ``total`` = Σ A·M over every
    attributed layer, image position and unit (integrated gradients, per layer complete:
    ≈ Σ_l [y(A) − y(A_l = 0)]; the others: a linear estimate of that and of y(A) − y(0)). Layers outside ``layers``
    (default: all) score -inf."""
    ad = plm.adapter
    layers = list(range(ad.n_layers)) if layers is None else sorted(set(layers))
    y, acts, mult = method_pass(plm, soft, [list(text)], [int(target)], layers, method, ig_steps=ig_steps,
                                rows=rows)
    out = {agg: torch.full((ad.n_layers, ad.d_mlp), float("-inf")) for agg in aggregates}
    total = 0.0
    for l, a, m in zip(layers, acts, mult):
        a0, m0 = a[0].detach().float(), m[0].detach().float()  # [P, U]
        for agg in aggregates:
            out[agg][l] = unit_scores(a0, m0, agg).cpu()
        total += float((a0 * m0).double().sum())
    return float(y[0]), out, total


def unit_score_map(plm: ImagePrefixLM, soft: Float[Tensor, "1 patches d_model"], text: list[int], target: int,
                   method: str, *, layers: Sequence[int] | None = None, ig_steps: int = 16, rows: int | None = None
                   ) -> tuple[float, Float[Tensor, "layers d_mlp"], float]:
    """:func:`unit_score_maps` with the paper's aggregate (max over image positions of A·M):
    ``(y, Float[Tensor, "L d_mlp"], total)``."""
    y, maps, total = unit_score_maps(plm, soft, text, target, method, layers=layers, ig_steps=ig_steps, rows=rows)
    return y, maps["max"], total
