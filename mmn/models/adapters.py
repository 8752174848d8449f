"""The LM adapter: the only place that names a model's module paths, one :class:`Family`
row per LM family in :data:`FAMILIES`.

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

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmn.errors import ModelError


@dataclass(frozen=True)
class Family:
    """Where one LM family keeps its parts, as dotted paths for ``nn.Module.get_submodule``.

    Input and output embeddings come from HF's ``get_input_embeddings`` /
    ``get_output_embeddings``, which every family implements.
    """

    blocks: str  #: the list of transformer blocks, from the model
    mlp: str  #: a block's MLP, from the block
    act: str  #: the MLP's W_out: its INPUT is the unit activation A (after the nonlinearity), from the MLP
    preact: str  #: the module whose OUTPUT is the pre-activation Z, from the MLP
    final_norm: str  #: the norm before the LM head, from the model
    w_out_transposed: bool = False  #: W_out stored as ``[d_mlp, d_model]`` (GPT-2's ``Conv1D``)
    prepend_bos: bool = False  #: the image-prefix sequence starts with the tokenizer's BOS token
    up: str | None = None  #: gated MLPs: the module whose output multiplies act(Z) (A = act(Z) * up), from the MLP
    norm_offset: float = 0.0  #: RMSNorm gain = weight + offset (Gemma stores gain - 1: ``x * (1 + weight)``)
    #: the tokenizer's special added tokens (control tokens: Gemma's ``<start_of_image>``, ``<unusedN>``) are
    #: not real tokens: never decoded to, never generated (except EOS). Off for the others: their few special
    #: tokens stay as before
    drop_control_tokens: bool = False


_GPT = {"blocks": "transformer.h", "mlp": "mlp", "final_norm": "transformer.ln_f"}
#: Llama-family gated MLPs (Llama, Mistral, Qwen2, SmolLM2): A = act(gate) * up; trained with a leading BOS
_LLAMA = Family(blocks="model.layers", mlp="mlp", act="down_proj", preact="gate_proj", final_norm="model.norm",
                prepend_bos=True, up="up_proj")

#: ``model.config.model_type`` → its :class:`Family`; a new family is one entry here
FAMILIES: dict[str, Family] = {
    "gptj": Family(**_GPT, act="fc_out", preact="fc_in"),
    "gpt2": Family(**_GPT, act="c_proj", preact="c_fc", w_out_transposed=True),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    # Gemma 3 (text): gated MLP A = gelu_tanh(gate) * up, the down_proj input; inputs embedded x sqrt(d_model)
    # inside the embedding module (soft tokens bypass it: the projection learns that scale); tied unembedding;
    # every RMSNorm scales by (1 + weight); the MLP output passes post_feedforward_layernorm before the residual
    "gemma3_text": Family(blocks="model.layers", mlp="mlp", act="down_proj", preact="gate_proj", final_norm="model.norm",
                          prepend_bos=True, up="up_proj", norm_offset=1.0, drop_control_tokens=True),
}


@dataclass
class LMAdapter:
    """A HF causal LM seen through its family's module paths (:data:`FAMILIES`)."""

    model: PreTrainedModel
    vocab_size: int
    #: sorted ids of real (base-vocabulary) tokens (default: every id); see :func:`real_token_ids`
    real_token_ids: Int[Tensor, "n_real"] = field(default=None)  # type: ignore[assignment]
    #: the ``model_type`` key of :data:`FAMILIES` (default: the model's own)
    family: str = ""
    #: ids greedy generation never emits (the family's control tokens, :attr:`Family.drop_control_tokens`)
    banned_ids: Int[Tensor, "n_banned"] = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.real_token_ids is None:
            self.real_token_ids = torch.arange(self.vocab_size, dtype=torch.long)
        if self.banned_ids is None:
            self.banned_ids = torch.zeros(0, dtype=torch.long)
        self.family = self.family or self.model.config.model_type
        if self.family not in FAMILIES:
            raise ModelError(f"no adapter for model_type {self.family!r}; supported: {sorted(FAMILIES)} "
                             "(add one to FAMILIES in mmn/models/adapters.py)")

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]

    @property
    def prepend_bos(self) -> bool:
        """Whether the image-prefix sequence starts with the tokenizer's BOS token."""
        return self.spec.prepend_bos

    # --- module paths ---------------------------------------------------------------
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.spec.blocks)

    def mlp(self, layer: int) -> nn.Module:
        return self.blocks()[layer].get_submodule(self.spec.mlp)

    def act_module(self, layer: int) -> nn.Module:
        return self.mlp(layer).get_submodule(self.spec.act)

    def preact_module(self, layer: int) -> nn.Module:
        return self.mlp(layer).get_submodule(self.spec.preact)

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.spec.final_norm)

    # --- derived --------------------------------------------------------------------
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

    def final_norm_gain(self) -> Float[Tensor, "d_model"] | None:
        """The final norm's per-dimension gain (its weight, plus the family's ``norm_offset``), or None."""
        w = getattr(self.final_norm, "weight", None)
        return None if w is None else w.detach() + self.spec.norm_offset

    def w_out(self, layer: int) -> Float[Tensor, "d_model d_mlp"]:
        """W_out of ``layer`` (column k = unit k's value)."""
        w = self.act_module(layer).weight
        return w.T if self.spec.w_out_transposed else w

    @torch.no_grad()
    def set_unit(self, layer: int, unit: int, read: Float[Tensor, "d_model"], gain: float,
                 write: Float[Tensor, "d_model"]) -> None:
        """Overwrite one unit in place (a planted unit, :mod:`mmn.controls.plant`): it reads
        ``s = read · x`` from the MLP input x and its value vector (W_out column) is ``write``.

        Plain MLPs: Z = gain·s (its bias set to 0), A = act(Z). Gated MLPs: the gate reads
        gain·s and the up projection s, so A = act(gain·s)·s. Either way A is large where
        s > 0 and about 0 where s < 0 (for a large ``gain``). Nothing else of the model changes.
        """
        t = self.spec.w_out_transposed  # Conv1D (GPT-2) stores every MLP weight as [in, out]

        def set_row(mod: nn.Module, v: Tensor) -> None:
            w = mod.weight
            (w[:, unit] if t else w[unit]).copy_(v.to(w))
            if getattr(mod, "bias", None) is not None:
                mod.bias[unit] = 0

        set_row(self.preact_module(layer), gain * read)
        if self.spec.up:
            set_row(self.mlp(layer).get_submodule(self.spec.up), read)
        self.w_out(layer)[:, unit] = write.to(self.dtype)

    def act_modules(self) -> dict[str, nn.Module]:
        return {str(l): self.act_module(l) for l in range(self.n_layers)}

    def preact_modules(self) -> dict[str, nn.Module]:
        return {str(l): self.preact_module(l) for l in range(self.n_layers)}

    def unembed_weight(self) -> Float[Tensor, "vocab d_model"]:
        """The generation rows (``< vocab_size``, added
        tokens included); decoding and nearest-token search index ``real_token_ids`` instead."""
        return self.unembed.weight[: self.vocab_size]

    def unembed_bias(self) -> Float[Tensor, "vocab"] | None:
        b = getattr(self.unembed, "bias", None)
        return None if b is None else b[: self.vocab_size]


def real_token_ids(tokenizer: PreTrainedTokenizerBase | None, n_rows: int) -> Int[Tensor, "n_real"]:
    """Sorted ids of the tokenizer's base vocabulary that have a head row.

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
    """The adapter of ``model.config.model_type`` (a :class:`ModelError` naming the supported
    families when it has no :data:`FAMILIES` row); ``vocab_size`` = len(tokenizer).

    With ``tokenizer``, ``real_token_ids`` is its base vocabulary (:func:`real_token_ids`);
    without, every id below ``vocab_size``."""
    rows = model.get_output_embeddings().weight.shape[0]
    if vocab_size is None and tokenizer is not None:
        vocab_size = len(tokenizer)
    vs = rows if vocab_size is None else min(vocab_size, rows)
    real = real_token_ids(tokenizer, vs) if tokenizer is not None else None
    ad = LMAdapter(model=model, vocab_size=vs, real_token_ids=real)
    if tokenizer is not None and ad.spec.drop_control_tokens:
        control = control_token_ids(tokenizer, vs)
        ad.real_token_ids = ad.real_token_ids[~torch.isin(ad.real_token_ids, control)]
        ad.banned_ids = control[control != (tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1)]
    return ad


def control_token_ids(tokenizer: PreTrainedTokenizerBase, n_rows: int) -> Int[Tensor, "n_control"]:
    """Sorted ids below ``n_rows`` of the tokenizer's special added tokens (``added_tokens_decoder``
    entries with ``special=True``: BOS/EOS/PAD and control tokens such as Gemma's ``<unusedN>``)."""
    dec = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return torch.tensor(sorted(i for i, t in dec.items() if getattr(t, "special", False) and 0 <= i < n_rows),
                        dtype=torch.long)
