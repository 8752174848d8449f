"""Unit activations A (the input of W_out, after the nonlinearity) at the image positions.

One forward pass of the image-prefix LM (no caption text) with every layer's
``act_module`` traced; used for receptive fields (IoU), category selectivity and the
plot stage's activation maps.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mmn.hooks import TraceDict
from mmn.models.prefix_lm import ImagePrefixLM


@torch.no_grad()
def image_activations(plm: ImagePrefixLM, soft: Float[Tensor, "1 patches d_model"]
                      ) -> Float[Tensor, "layers patches d_mlp"]:
    """A of every unit of every layer at the image positions: ``Float[Tensor, "layers P d_mlp"]``
    (fp32, CPU) for ``soft`` = ``Float[Tensor, "1 P d_model"]``."""
    ad = plm.adapter
    batch = plm.build(soft)
    with TraceDict(ad.act_modules(), retain_input=True, detach=True) as tr:
        plm.logits(batch, batch.inputs_embeds.shape[1] - 1)  # the head's output is not needed: one position
    sl = batch.image_slice
    return torch.stack([tr[str(l)].input[0, sl].float().cpu() for l in range(ad.n_layers)])


def activations_of_image(plm: ImagePrefixLM, image: Any) -> Float[Tensor, "layers patches d_mlp"]:
    """:func:`image_activations` of one image (PIL, or what ``plm.encoder`` takes) through the
    prefix LM's encoder."""
    return image_activations(plm, plm.image_soft_tokens([image]))
