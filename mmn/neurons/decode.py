"""Decode what a unit writes: the unembedding applied to its W_out column.

The paper (§2.2): "To decode the *language contribution* of u_k to model output, we can
directly compute decoder(W_out^k), following the simplifying assumption that
representations at any layer can be transformed into a distribution over the token
vocabulary using the output embeddings", with "y = softmax(W_d h^L), which we refer to
as decoder(h^L)" (§2.1).

* ``lens="unembed"`` (default, as the paper writes it): logits = W_d · W_out[:, k], the
  unembedding matrix times the **raw** column: no final-norm gain/bias, no lm_head bias.
* ``lens="logit_lens"``: logits = W_d · norm(W_out[:, k]) + b (the logit-lens reading;
  the final norm's gain/bias and the head's bias are added to a lone weight vector).

Only the tokenizer's real tokens (``adapter.real_token_ids``: no added
``<|extratoken_n|>`` fillers, no padded head rows) can be returned. All units of a layer
are decoded as one fp32 matrix product.
"""

from __future__ import annotations

import copy
from typing import Literal

import polars as pl
import torch
from jaxtyping import Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from mmn.models.adapters import LMAdapter

Lens = Literal["unembed", "logit_lens"]
LENSES: tuple[str, ...] = ("unembed", "logit_lens")

NEURON_SCHEMA = {
    "layer": pl.Int64,
    "unit": pl.Int64,
    "token_ids": pl.List(pl.Int64),
    "tokens": pl.List(pl.Utf8),
    "logits": pl.List(pl.Float64),
    "decoded": pl.Utf8,
}


def clean_token(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """Token text without tokenizer markers (Ġ, ▁) or surrounding whitespace."""
    return tokenizer.decode([token_id]).strip()


class _Decoder:
    """fp32 copies of what decoding needs, made once: the real-token rows of W_d
    (``[n_real, d_model]``), their ids, the head bias and (logit lens) an fp32 final norm."""

    def __init__(self, adapter: LMAdapter, lens: Lens) -> None:
        if lens not in LENSES:
            raise ValueError(f"decode.lens must be one of {LENSES}, got {lens!r}")
        self.adapter, self.lens = adapter, lens
        dev = adapter.device
        self.ids = adapter.real_token_ids.to(dev)  # [n_real]
        self.u = adapter.unembed.weight.detach().index_select(0, self.ids).float()  # [n_real, d_model]
        b = getattr(adapter.unembed, "bias", None)
        self.bias = None if (b is None or lens == "unembed") else b.detach().index_select(0, self.ids).float()
        self.norm = copy.deepcopy(adapter.final_norm).float() if lens == "logit_lens" else None

    @torch.no_grad()
    def __call__(self, layer: int, units: list[int] | Tensor, top_n: int) -> tuple[Tensor, Tensor]:
        w = self.adapter.w_out(layer)[:, units].detach().T.float()  # [n, d_model]
        if self.norm is not None:
            w = self.norm(w)
        logits = w @ self.u.T  # [n, n_real]
        if self.bias is not None:
            logits = logits + self.bias
        vals, idx = torch.topk(logits, min(top_n, logits.shape[1]), dim=1)
        return vals, self.ids[idx]


def decode_units(
    adapter: LMAdapter,
    tokenizer: PreTrainedTokenizerBase,
    units: pl.DataFrame,
    *,
    top_n: int = 10,
    lens: Lens = "unembed",
) -> pl.DataFrame:
    """``units`` has columns (layer, unit); returns one row per distinct unit (schema above)."""
    dec = _Decoder(adapter, lens)
    pairs = units.select("layer", "unit").unique().sort(["layer", "unit"])
    rows = []
    for (layer,), grp in pairs.group_by(["layer"], maintain_order=True):
        us = grp["unit"].to_list()
        vals, ids = dec(int(layer), us, top_n)
        for u, v, i in zip(us, vals.tolist(), ids.tolist()):
            toks = [clean_token(tokenizer, t) for t in i]
            rows.append({"layer": int(layer), "unit": u, "token_ids": i, "tokens": toks, "logits": v,
                         "decoded": ", ".join(toks)})
    return pl.DataFrame(rows, schema=NEURON_SCHEMA)


@torch.no_grad()
def top_token_ids_all_units(
    adapter: LMAdapter, top_n: int = 10, lens: Lens = "unembed", chunk: int = 4096
) -> Int[Tensor, "layers d_mlp top_n"]:
    """``Long[Tensor, "layers d_mlp top_n"]``: top decoded token ids of every unit (chunked
    fp32 matmuls on the adapter's device), the same decoding as :func:`decode_units`."""
    dec = _Decoder(adapter, lens)
    out = torch.empty(adapter.n_layers, adapter.d_mlp, top_n, dtype=torch.long)
    for layer in range(adapter.n_layers):
        for s in range(0, adapter.d_mlp, chunk):
            units = list(range(s, min(s + chunk, adapter.d_mlp)))
            out[layer, s : s + len(units)] = dec(layer, units, top_n)[1].cpu()
    return out
