"""One adapter per LM family: the only place that names a model's module paths.

An adapter answers, for a HF causal LM:

* ``n_layers``, ``d_model``, ``d_mlp`` (units per layer), ``vocab_size`` (the
  generation logits: ``min(len(tokenizer), head rows)``; added/special tokens such as an
  EOS stay generable);
* ``real_token_ids``: the ids of the tokenizer's *base* vocabulary, i.e. without tokens
  added on top of it (GPT-J's 143 ``<|extratoken_n|>`` fillers) and below the head's
  rows: the only rows decoding and nearest-token search may return;
* ``act_module(l)``: the module whose **input** is the unit activation A of layer l
  (GPT-J ``fc_out``, GPT-2 ``c_proj``, Llama ``down_proj`` — i.e. after the
  nonlinearity; for gated MLPs A = act(gate) * up);
* ``preact_module(l)``: the module whose **output** is the pre-activation Z
  (GPT-J ``fc_in``, GPT-2 ``c_fc``, Llama ``gate_proj``);
* ``w_out(l)``: W_out as ``[d_model, d_mlp]`` so that column k is unit k's value
  (gotcha: GPT-2's ``Conv1D`` stores the transpose);
* ``final_norm``, ``unembed`` (the LM head) and ``embed`` (input embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmn.errors import ModelError


@dataclass
class LMAdapter:
    """Base adapter; subclasses fill in the module paths."""

    model: PreTrainedModel
    vocab_size: int
    #: ``Long[Tensor, "n_real"]`` sorted ids of real (base-vocabulary) tokens; see :func:`real_token_ids`
    real_token_ids: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.real_token_ids is None:
            self.real_token_ids = torch.arange(self.vocab_size, dtype=torch.long)

    family: ClassVar[str] = "base"
    #: whether the image-prefix sequence starts with the tokenizer's BOS token
    prepend_bos: ClassVar[bool] = False

    # --- module paths (overridden) -------------------------------------------------
    def blocks(self) -> nn.ModuleList:  # pragma: no cover - abstract
        raise NotImplementedError

    def mlp(self, layer: int) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def act_module(self, layer: int) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def preact_module(self, layer: int) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- shared --------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.blocks())

    @property
    def d_model(self) -> int:
        return self.embed.weight.shape[1]

    @property
    def d_mlp(self) -> int:
        return self.w_out(0).shape[1]

    @property
    def embed(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def unembed(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def w_out(self, layer: int) -> Tensor:
        """W_out of ``layer`` as ``Float[Tensor, "d_model d_mlp"]`` (column k = unit k's value)."""
        return self.act_module(layer).weight

    def act_modules(self) -> dict[str, nn.Module]:
        return {str(l): self.act_module(l) for l in range(self.n_layers)}

    def preact_modules(self) -> dict[str, nn.Module]:
        return {str(l): self.preact_module(l) for l in range(self.n_layers)}

    def unembed_weight(self) -> Tensor:
        """``Float[Tensor, "vocab_size d_model"]``: the generation rows (``< vocab_size``, added
        tokens included); decoding and nearest-token search index ``real_token_ids`` instead."""
        return self.unembed.weight[: self.vocab_size]

    def unembed_bias(self) -> Tensor | None:
        b = getattr(self.unembed, "bias", None)
        return None if b is None else b[: self.vocab_size]


class GPTJAdapter(LMAdapter):
    family = "gptj"

    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.h

    def mlp(self, layer: int) -> nn.Module:
        return self.blocks()[layer].mlp

    def act_module(self, layer: int) -> nn.Module:
        return self.mlp(layer).fc_out

    def preact_module(self, layer: int) -> nn.Module:
        return self.mlp(layer).fc_in

    @property
    def final_norm(self) -> nn.Module:
        return self.model.transformer.ln_f


class GPT2Adapter(LMAdapter):
    family = "gpt2"

    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.h

    def mlp(self, layer: int) -> nn.Module:
        return self.blocks()[layer].mlp

    def act_module(self, layer: int) -> nn.Module:
        return self.mlp(layer).c_proj

    def preact_module(self, layer: int) -> nn.Module:
        return self.mlp(layer).c_fc

    def w_out(self, layer: int) -> Tensor:
        # Conv1D keeps weight as [in, out] = [d_mlp, d_model]
        return self.act_module(layer).weight.T

    @property
    def final_norm(self) -> nn.Module:
        return self.model.transformer.ln_f


class LlamaAdapter(LMAdapter):
    """Llama-family gated MLPs (Llama, Mistral, Qwen2, SmolLM2): A = act(gate) * up."""

    family = "llama"
    prepend_bos = True  # Llama-family models are trained with a leading BOS

    def blocks(self) -> nn.ModuleList:
        return self.model.model.layers

    def mlp(self, layer: int) -> nn.Module:
        return self.blocks()[layer].mlp

    def act_module(self, layer: int) -> nn.Module:
        return self.mlp(layer).down_proj

    def preact_module(self, layer: int) -> nn.Module:
        return self.mlp(layer).gate_proj

    @property
    def final_norm(self) -> nn.Module:
        return self.model.model.norm


_FAMILIES: dict[str, type[LMAdapter]] = {
    "gptj": GPTJAdapter,
    "gpt2": GPT2Adapter,
    "llama": LlamaAdapter,
    "mistral": LlamaAdapter,
    "qwen2": LlamaAdapter,
}


def real_token_ids(tokenizer: PreTrainedTokenizerBase | None, n_rows: int) -> Tensor:
    """``Long[Tensor, "n_real"]``: sorted ids of the tokenizer's base vocabulary that have a head row.

    Tokens *added* on top of the base vocabulary (``tokenizer.add_tokens``; GPT-J's 143
    ``<|extratoken_n|>`` fillers at 50257..50399) are excluded, as are ids ``>= n_rows``.
    Special tokens that belong to the base vocabulary (GPT-2's ``<|endoftext|>``, SmolLM2's
    ``<|im_start|>``) stay. Fast tokenizers: the backend model's vocabulary without added
    tokens; slow ones: ``range(tokenizer.vocab_size)`` (their base size); ``None``: all rows.
    """
    if tokenizer is None:
        return torch.arange(n_rows, dtype=torch.long)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        ids: set[int] = set(backend.get_vocab(with_added_tokens=False).values())
    else:
        ids = set(range(int(tokenizer.vocab_size)))
    out = torch.tensor(sorted(i for i in ids if 0 <= i < n_rows), dtype=torch.long)
    if out.numel() == 0:
        raise ValueError(f"tokenizer has no base-vocabulary token below the LM head's {n_rows} rows")
    return out


def make_adapter(
    model: PreTrainedModel,
    vocab_size: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> LMAdapter:
    """Pick the adapter from ``model.config.model_type``; ``vocab_size`` = len(tokenizer).

    With ``tokenizer``, ``real_token_ids`` is its base vocabulary (:func:`real_token_ids`);
    without, every id below ``vocab_size``."""
    mt = model.config.model_type
    if mt not in _FAMILIES:
        raise ModelError(
            f"no adapter for model_type {mt!r}; supported: {sorted(_FAMILIES)} (add one in mmn/models/adapters.py)"
        )
    rows = model.get_output_embeddings().weight.shape[0]
    if vocab_size is None and tokenizer is not None:
        vocab_size = len(tokenizer)
    vs = rows if vocab_size is None else min(vocab_size, rows)
    real = real_token_ids(tokenizer, vs) if tokenizer is not None else None
    return _FAMILIES[mt](model=model, vocab_size=vs, real_token_ids=real)
