"""A planted multimodal neuron: a positive control with a known answer.

One unit of the loaded LM is overwritten (:meth:`mmn.models.adapters.LMAdapter.set_unit`) so
that it detects a concept in the image positions and writes the concept word:

* **input**: ``s = w · x`` with x the MLP input of layer l at an image position. ``w`` is the
  concept's direction, estimated from the *training* images only (never an evaluated one):
  d = mean x over images whose captions name the word (or its plural) − mean x over the others
  (each image's mean over its positions, so images weigh equally); w = d minus its component
  along the mean input μ of all training positions, so that s has mean 0 over them (the MLPs
  have no bias to centre with: this makes s > 0 mean "more concept than average"); w is scaled
  so that the concept images' mean s is 1. The unit reads ``gain · s`` (:data:`GAIN`), so A is
  about 0 where s < 0.
* **output**: its W_out column is ``strength · u / A1`` with u the unit vector along
  ``γ ⊙ W_U[c]`` (γ: the final norm's weight, so the final norm maps it onto the word's
  unembedding row; c: the first token of " word") and A1 the planted unit's mean activation
  at the concept images' positions: at the concept's mean activation the unit adds a vector of
  norm ``strength`` to the residual stream. ``residual_norm`` (the mean norm of the residual
  stream entering layer l at those positions) puts it on a scale.
* **write mix** (``write_mix`` m > 0): the output direction is ``(1 − m) u + m v``, renormed,
  with v the unit vector along the mean gradient of the word's logit y (``gradient_of: logit``,
  the quantity attribution's g explains) or of log p(word) (``logprob``) w.r.t. the layer's MLP
  output at the image positions, each position weighted by the planted unit's activation there
  (:func:`gradient_direction`; from the training images naming the word, the word predicted
  where a reference caption names it). Gotcha: u alone is read at the image positions only
  through attention, and in SmolLM2 zeroing it *raises* p(word) at the text position that
  predicts it; v is what, to first order, raises y (or p) there, but it need not decode to the word.

Gotcha: the plant is a property of (LM, projection, training images); it is recomputed when
any of them changes (stage ``plant``), and every stage that builds the LM applies it
(:func:`mmn.pipeline.build_lm`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from mmn.hooks import TraceDict
from mmn.models.adapters import LMAdapter
from mmn.models.planted import Plant, PlantError
from mmn.models.prefix_lm import ImagePrefixLM

GAIN = 8.0  #: the planted unit reads gain·s: act(8·s) is about 0 for s < -0.25 (SiLU, GELU)


def concept_pattern(word: str) -> re.Pattern:
    """The word or its plural (``s``/``es``) as a whole word, any case."""
    return re.compile(rf"\b{re.escape(word)}(?:s|es)?\b", re.IGNORECASE)


def split_by_concept(captions: Mapping[int, Sequence[str]], word: str) -> tuple[list[int], list[int]]:
    """``(concept ids, other ids)``, sorted: an image is a concept image when ANY of its captions names the word."""
    pat = concept_pattern(word)
    yes = sorted(i for i, caps in captions.items() if any(pat.search(c) for c in caps))
    no = sorted(i for i in captions if i not in set(yes))
    return yes, no


@torch.no_grad()
def mlp_inputs(plm: ImagePrefixLM, soft: Float[Tensor, "1 patches d_model"], layer: int
               ) -> tuple[Float[Tensor, "patches d_model"], Float[Tensor, "patches"]]:
    """The MLP input x of ``layer`` at the image positions (what its units read), fp32 CPU,
    and the norm of the residual stream entering the layer there."""
    ad = plm.adapter
    batch = plm.build(soft)
    with TraceDict({"x": ad.preact_module(layer)}, retain_input=True, detach=True) as tr:
        out = ad.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                       output_hidden_states=True)
    sl = batch.image_slice
    return tr["x"].input[0, sl].float().cpu(), out.hidden_states[layer][0, sl].float().norm(dim=-1).cpu()


def concept_direction(concept: Sequence[Tensor], other: Sequence[Tensor]) -> Float[Tensor, "d_model"]:
    """w from per-image MLP inputs (each ``[patches, d_model]``): the mean difference, minus its
    component along the mean of all images, scaled to a mean s of 1 on the concept images."""
    if not concept or not other:
        raise PlantError(f"the concept direction needs images with and without the word: got {len(concept)} "
                         f"with and {len(other)} without")
    mc = torch.stack([x.double().mean(0) for x in concept]).mean(0)
    mo = torch.stack([x.double().mean(0) for x in other]).mean(0)
    n_c, n_o = len(concept), len(other)
    mu = (n_c * mc + n_o * mo) / (n_c + n_o)
    d = mc - mo
    mu_hat = mu / mu.norm()
    w = d - (d @ mu_hat) * mu_hat
    scale = float(w @ mc)
    if scale <= 0:
        raise PlantError("the concept images' mean input does not project above the others' (degenerate direction)")
    return (w / scale).float()


def write_direction(adapter: LMAdapter, token_id: int) -> Float[Tensor, "d_model"]:
    """Unit vector along γ ⊙ W_U[c] (γ = the final norm's weight, when it has one)."""
    u = adapter.unembed_weight()[token_id].detach().float().cpu()
    gamma = adapter.final_norm_gain()
    if gamma is not None:
        u = u * gamma.float().cpu()
    return u / u.norm()


def word_prefix(caption: str, word: str, tokenizer) -> list[int] | None:
    """Token ids of a caption's text before its first mention of ``word`` (the continuation of
    the prompt, as the training sees it), or None when no whole-word mention follows a space
    (or the caption's start)."""
    from mmn.text import caption_target_text

    text = caption_target_text(caption)
    m = concept_pattern(word).search(text)
    if m is None or text[m.start() - 1] != " ":
        return None
    before = text[: m.start() - 1]
    return tokenizer(before, add_special_tokens=False).input_ids if before else []


def word_gradient(plm: ImagePrefixLM, soft: Float[Tensor, "1 patches d_model"], prefix: list[int], token_id: int,
                  layer: int, of: str = "logit") -> Float[Tensor, "patches d_model"]:
    """d y / d (``layer``'s MLP output) at the image positions (fp32 CPU), y = the token's logit
    (``of="logit"``) or log p(token) (``"logprob"``) after image, prompt and ``prefix``: through a
    zero tensor added to that output, so the frozen LM needs no grads."""
    if of not in ("logit", "logprob"):
        raise ValueError(f"gradient of {of!r}: logit or logprob")
    ad = plm.adapter
    batch = plm.build(soft, [prefix])
    e = batch.inputs_embeds
    delta = torch.zeros(e.shape, dtype=e.dtype, device=e.device, requires_grad=True)
    with torch.enable_grad(), TraceDict({"o": ad.act_module(layer)}, edit_output={"o": lambda o: o + delta}):
        out = ad.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, logits_to_keep=1)
        last = out.logits[0, -1, : ad.vocab_size].float()
        y = last[token_id] if of == "logit" else torch.log_softmax(last, -1)[token_id]
        (grad,) = torch.autograd.grad(y, delta)
    return grad[0, batch.image_slice].float().cpu()


def gradient_direction(grads: Sequence[Tensor], acts: Sequence[Tensor]) -> Float[Tensor, "d_model"]:
    """Unit vector along the mean over images of ``mean_p A(p) g(p)`` (``grads[i]``: ``[patches,
    d_model]``, ``acts[i]``: ``[patches]``): the direction whose write, scaled by the unit's
    activation at each position, raises the gradient's objective most to first order, averaged over images."""
    if not grads:
        raise PlantError("write_mix: no training caption names the word after a space (no gradient to average)")
    v = torch.stack([(a.double()[:, None] * g.double()).mean(0) for g, a in zip(grads, acts, strict=True)]).mean(0)
    if float(v.norm()) == 0.0:
        raise PlantError("write_mix: the planted unit does not fire where the gradient is (zero direction)")
    return (v / v.norm()).float()


def _auc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P(a concept image's value > another's), ties count half (Mann-Whitney U / n1 n2)."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


def unit_activation(plm: ImagePrefixLM, soft: Float[Tensor, "1 patches d_model"], layer: int, unit: int
                    ) -> Float[Tensor, "patches"]:
    """A of one unit at the image positions (fp32 CPU)."""
    from mmn.neurons.activations import image_activations

    return image_activations(plm, soft)[layer, :, unit]


def estimate_plant(plm: ImagePrefixLM, captions: Mapping[int, Sequence[str]],
                   load_image: Callable[[int], Image.Image], *, layer: int, unit: int, word: str, strength: float,
                   max_images: int, seed: int, write_mix: float = 0.0, gradient_of: str = "logit",
                   progress: bool = False) -> Plant:
    """Estimate the plant from the training images (``captions``: id -> their captions) and
    plant it into ``plm``'s LM (in place). ``max_images``: a seeded sample of them, keeping the
    concept share. ``write_mix``: share of the gradient (of ``gradient_of``) in the write (module doc)."""
    from tqdm import tqdm

    ad = plm.adapter
    if not 0 <= layer < ad.n_layers:
        raise PlantError(f"controls.plant.layer: {layer} is not a layer of the LM (0..{ad.n_layers - 1})")
    if not 0 <= unit < ad.d_mlp:
        raise PlantError(f"controls.plant.unit: {unit} is not a unit of the MLP (0..{ad.d_mlp - 1})")
    ids = sorted(captions)
    if len(ids) > max_images:
        ids = sorted(np.random.default_rng(seed).choice(ids, size=max_images, replace=False).tolist())
    yes, no = split_by_concept({i: captions[i] for i in ids}, word)
    if not yes:
        raise PlantError(f"controls.plant.word: no training image's caption names {word!r} (of {len(ids)} sampled)")
    token_ids = plm.tokenizer(" " + word, add_special_tokens=False).input_ids
    softs = {i: plm.image_soft_tokens([load_image(i)]) for i in tqdm(ids, desc="plant: encode", disable=not progress)}
    xs, norms = {}, {}
    for i in tqdm(ids, desc="plant: MLP inputs", disable=not progress):
        xs[i], norms[i] = mlp_inputs(plm, softs[i], layer)
    w = concept_direction([xs[i] for i in yes], [xs[i] for i in no])
    u = write_direction(ad, token_ids[0])
    ad.set_unit(layer, unit, w, GAIN, torch.zeros_like(u))  # A does not depend on its own W_out column
    acts = {i: unit_activation(plm, softs[i], layer, unit) for i in ids}
    a1 = float(torch.cat([acts[i] for i in yes]).mean())
    if a1 <= 0:
        raise PlantError(f"the planted unit does not fire on the concept images (mean A {a1:.3g})")
    out_dir, cos = u, None
    if write_mix > 0:  # the clean LM but for the unit's zeroed W_out column: A (its read) is already final
        prefixes = {i: next((q for c in captions[i] if (q := word_prefix(c, word, plm.tokenizer)) is not None), None)
                    for i in yes}
        with_prefix = [i for i in yes if prefixes[i] is not None]
        grads = [word_gradient(plm, softs[i], prefixes[i], token_ids[0], layer, gradient_of)
                 for i in tqdm(with_prefix, desc="plant: gradients", disable=not progress)]
        v = gradient_direction(grads, [acts[i] for i in with_prefix])
        cos = float(u @ v)
        mixed = (1 - write_mix) * u + write_mix * v
        out_dir = mixed / mixed.norm()
    ad.set_unit(layer, unit, w, GAIN, strength * out_dir / a1)
    auc = _auc([float(acts[i].max()) for i in yes], [float(acts[i].max()) for i in no]) if no else float("nan")
    return Plant(layer, unit, word, int(token_ids[0]), float(strength), GAIN, w, strength * out_dir / a1, a1,
                 float(torch.cat([norms[i] for i in yes]).mean()), len(yes), len(no), auc, float(write_mix), cos,
                 gradient_of if write_mix > 0 else None)
