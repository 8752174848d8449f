"""Decode what a unit writes: the unembedding applied to its W_out column.

decoder(W_out[:, k]) = U · norm(W_out[:, k]) (+ b), restricted to the real vocabulary
rows. All units of a layer are decoded as one matrix product. Gotcha: applying the
final norm to a lone weight vector (logit-lens style) adds the norm's bias/gain, which
is the default here as in the logit lens; ``final_norm=False`` uses the raw column.
"""

from __future__ import annotations

import polars as pl
import torch
from transformers import PreTrainedTokenizerBase

from mmn.models.adapters import LMAdapter

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


@torch.no_grad()
def decode_layer(
    adapter: LMAdapter, layer: int, units: list[int], top_n: int = 10, final_norm: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``top_n`` (logits, token ids) per unit: two ``[len(units), top_n]`` tensors."""
    w = adapter.w_out(layer)[:, units].T  # [n, d_model]
    if final_norm:
        w = adapter.final_norm(w)
    w = w.float()
    u = adapter.unembed_weight().float()  # [vocab, d_model]
    logits = w @ u.T
    b = adapter.unembed_bias()
    if b is not None:
        logits = logits + b.float()
    vals, ids = torch.topk(logits, top_n, dim=1)
    return vals, ids


def decode_units(
    adapter: LMAdapter,
    tokenizer: PreTrainedTokenizerBase,
    units: pl.DataFrame,
    *,
    top_n: int = 10,
    final_norm: bool = True,
) -> pl.DataFrame:
    """``units`` has columns (layer, unit); returns one row per distinct unit (schema above)."""
    pairs = units.select("layer", "unit").unique().sort(["layer", "unit"])
    rows = []
    for (layer,), grp in pairs.group_by(["layer"], maintain_order=True):
        us = grp["unit"].to_list()
        vals, ids = decode_layer(adapter, int(layer), us, top_n, final_norm)
        for u, v, i in zip(us, vals.tolist(), ids.tolist()):
            toks = [clean_token(tokenizer, t) for t in i]
            rows.append({"layer": int(layer), "unit": u, "token_ids": i, "tokens": toks, "logits": v,
                         "decoded": ", ".join(toks)})
    return pl.DataFrame(rows, schema=NEURON_SCHEMA)


@torch.no_grad()
def top_token_ids_all_units(
    adapter: LMAdapter, top_n: int = 10, final_norm: bool = True, chunk: int = 4096
) -> torch.Tensor:
    """``Long[Tensor, "layers d_mlp top_n"]``: top decoded token ids of every unit (chunked matmuls)."""
    out = torch.empty(adapter.n_layers, adapter.d_mlp, top_n, dtype=torch.long)
    for layer in range(adapter.n_layers):
        for s in range(0, adapter.d_mlp, chunk):
            units = list(range(s, min(s + chunk, adapter.d_mlp)))
            out[layer, s : s + len(units)] = decode_layer(adapter, layer, units, top_n, final_norm)[1].cpu()
    return out
