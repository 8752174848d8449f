"""The image-prefix LM: [BOS] + projected soft tokens + prompt text (+ caption text).

Every image has the same prefix length (``n_prefix``), so a batch of prefixes needs
no padding; texts after the prefix are right-padded, which leaves every real
position's logits unchanged in a causal model (tested).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from mmn.hooks import EditFn, TraceDict
from mmn.models.adapters import LMAdapter
from mmn.models.projection import Projection


@runtime_checkable
class ImageEncoder(Protocol):
    """What :class:`ImagePrefixLM` needs of its encoder (a :class:`mmn.models.vision.PatchEncoder` or a stand-in)."""

    def encode(self, images: Sequence[Any]) -> Float[Tensor, "batch patches d_enc"]: ...


@dataclass
class PrefixBatch:
    """A right-padded batch of prefix + text sequences."""

    inputs_embeds: Float[Tensor, "batch seq d_model"]
    attention_mask: Int[Tensor, "batch seq"]
    lengths: list[int]  # real length of each row
    n_prefix: int  # BOS + soft tokens + prompt tokens
    image_slice: slice  # positions of the soft tokens


@dataclass
class TargetForward:
    """What :meth:`ImagePrefixLM.target_forward` read: the logits at the position that predicts
    each row's target c (graph attached when grad is on) and the retained activations."""

    logits: Tensor  # [rows, vocab incl. any padded head rows], model dtype
    targets: Tensor  # Long[rows]: c of each row
    vocab_size: int  # the real vocabulary (padded head rows excluded from p)
    acts: dict[int, Tensor]  # layer -> A (Z under preactivation) [rows, seq, d_mlp], as the model saw it

    @property
    def y(self) -> Tensor:
        """y^c: the target's logit per row (``[rows]``, model dtype)."""
        return self.logits[torch.arange(self.logits.shape[0], device=self.logits.device), self.targets]

    def probs(self) -> Tensor:
        """p(c) per row (``[rows]``, fp32): softmax over the real vocabulary."""
        p = torch.softmax(self.logits[:, : self.vocab_size].float(), -1)
        return p[torch.arange(p.shape[0], device=p.device), self.targets]


@dataclass
class ImagePrefixLM:
    """Glue between a frozen LM (through its adapter), a linear projection and (optionally)
    the image encoder whose patch features the projection maps: images → soft tokens → LM."""

    adapter: LMAdapter
    tokenizer: PreTrainedTokenizerBase
    projection: Projection | nn.Linear  # both expose .weight; Projection standardises first
    prompt: str = "A picture of"
    encoder: ImageEncoder | None = None  # features for image_soft_tokens (soft_tokens takes features)
    _prompt_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self._prompt_ids = self.tokenizer(self.prompt, add_special_tokens=False).input_ids
        if self.adapter.prepend_bos and self.tokenizer.bos_token_id is None:
            raise ValueError("adapter wants a BOS token but the tokenizer has none")

    @property
    def bos_ids(self) -> list[int]:
        return [self.tokenizer.bos_token_id] if self.adapter.prepend_bos else []

    @property
    def prompt_ids(self) -> list[int]:
        return list(self._prompt_ids)

    def n_prefix(self, n_patches: int) -> int:
        return len(self.bos_ids) + n_patches + len(self._prompt_ids)

    def soft_tokens(self, features: Float[Tensor, "batch patches d_enc"]
                    ) -> Float[Tensor, "batch patches d_model"]:
        """Project encoder patch features to soft tokens (the LM's dtype)."""
        p = self.projection.weight
        return self.projection(features.to(p.device, p.dtype)).to(self.adapter.dtype)

    @torch.no_grad()
    def image_soft_tokens(self, images: Sequence[Any]) -> Float[Tensor, "batch patches d_model"]:
        """Encode ``images`` (PIL images, or whatever ``encoder.encode`` takes) in ONE encoder call
        and project them to soft tokens (no autograd graph; attribution differentiates from the
        soft tokens onwards)."""
        if self.encoder is None:
            raise ValueError("this ImagePrefixLM has no image encoder: construct it with encoder=...")
        return self.soft_tokens(self.encoder.encode(images))

    def build(self, soft: Float[Tensor, "batch patches d_model"], texts: list[list[int]] | None = None) -> PrefixBatch:
        """Embed ``[BOS] + soft + prompt + text`` per row, right-padded to the longest row."""
        b, n_patch, _ = soft.shape
        texts = texts if texts is not None else [[] for _ in range(b)]
        if len(texts) != b:
            raise ValueError(f"{len(texts)} texts for {b} images")
        emb = self.adapter.embed
        dev = soft.device
        nb = len(self.bos_ids)
        n_prefix = nb + n_patch + len(self._prompt_ids)
        lengths = [n_prefix + len(t) for t in texts]
        t_max = max(lengths)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        tail = torch.full((b, t_max - n_prefix + len(self._prompt_ids)), pad, dtype=torch.long, device=dev)
        for i, t in enumerate(texts):
            row = self._prompt_ids + list(t)
            tail[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=dev)
        parts = []
        if nb:
            parts.append(emb(torch.tensor(self.bos_ids, device=dev)).unsqueeze(0).expand(b, -1, -1))
        parts.append(soft.to(emb.weight.dtype))
        parts.append(emb(tail))
        x = torch.cat(parts, dim=1)
        mask = torch.zeros(b, t_max, dtype=torch.long, device=dev)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        return PrefixBatch(x, mask, lengths, n_prefix, slice(nb, nb + n_patch))

    def target_forward(self, batch: PrefixBatch, targets: Sequence[int], *, embeds: Tensor | None = None,
                       edits: Mapping[int, EditFn] | None = None, retain: Sequence[int] = (),
                       preactivation: bool = False) -> TargetForward:
        """THE forward that reads y^c: run the LM on ``batch`` (or ``embeds`` in place of its
        input embeddings) and keep the logits only at each row's last real position, the one
        that predicts ``targets[row]`` (one LM-head row per distinct length).

        Through :class:`mmn.hooks.TraceDict`: ``edits`` (layer -> fn) replace the input of
        that layer's W_out (the unit activations A) by ``fn(A)`` (ablation, IG's path);
        ``retain`` keeps those layers' A (or, with ``preactivation``, the pre-nonlinearity Z)
        attached to the graph in :attr:`TargetForward.acts`. Grad mode is the caller's.
        """
        ad = self.adapter
        dev = batch.inputs_embeds.device
        keep = sorted({n - 1 for n in batch.lengths})
        col = torch.tensor([keep.index(n - 1) for n in batch.lengths], device=dev)
        edits = dict(edits or {})
        retain = list(retain)
        act_layers = sorted(set(edits) | (set() if preactivation else set(retain)))
        with ExitStack() as stack:
            act = stack.enter_context(TraceDict({str(l): ad.act_module(l) for l in act_layers},
                                                retain_input=bool(retain) and not preactivation,
                                                edit_input={str(l): fn for l, fn in edits.items()}))
            pre = (stack.enter_context(TraceDict({str(l): ad.preact_module(l) for l in retain}, retain_output=True))
                   if preactivation else {})
            out = ad.model(inputs_embeds=batch.inputs_embeds if embeds is None else embeds,
                           attention_mask=batch.attention_mask, logits_to_keep=torch.tensor(keep, device=dev))
        acts = {l: pre[str(l)].output if preactivation else act[str(l)].input for l in retain}
        rows = torch.arange(len(batch.lengths), device=dev)
        return TargetForward(out.logits[rows, col], torch.tensor(list(targets), device=dev), ad.vocab_size, acts)

    def logits(self, batch: PrefixBatch, start: int = 0) -> Float[Tensor, "batch seq_from_start vocab"]:
        """Logits of positions ``start..`` (all by default) restricted to the generation vocabulary
        (``adapter.vocab_size``): row ``j`` of the result is position ``start + j``. The LM head
        runs only there (``logits_to_keep``): with Gemma's 262k vocabulary it costs more than the
        blocks, so the caption loss skips the image and prompt positions."""
        seq = batch.inputs_embeds.shape[1]
        if not 0 <= start < seq:
            raise ValueError(f"logits from position {start}: the batch has {seq} positions")
        out = self.adapter.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                 logits_to_keep=seq - start)
        return out.logits[..., : self.adapter.vocab_size]

    def caption_loss(self, soft: Float[Tensor, "batch patches d_model"], captions: list[list[int]]
                     ) -> Float[Tensor, ""]:
        """Mean cross-entropy of ``caption + EOS`` after the prompt (LiMBeR's objective)."""
        eos = self.tokenizer.eos_token_id
        texts = [list(c) + ([eos] if eos is not None else []) for c in captions]
        batch = self.build(soft, texts)
        start = batch.n_prefix - 1  # position p predicts token p + 1: the prompt's last predicts the caption's first
        logits = self.logits(batch, start)  # only the caption's positions (right padding after them)
        labels = torch.full(logits.shape[:2], -100, dtype=torch.long, device=logits.device)
        for i, t in enumerate(texts):
            labels[i, : len(t)] = torch.tensor(t, device=logits.device)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least; fp64 stays fp64
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    @torch.no_grad()
    def generate(
        self, soft: Float[Tensor, "batch patches d_model"], max_new_tokens: int, stop_ids: set[int]
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Batched greedy decoding with a KV cache, never emitting ``adapter.banned_ids``.

        Returns, per image, the generated ids (stop token excluded) and the softmax
        probability of each generated token at the step that produced it (over the tokens it
        may emit).
        """
        batch = self.build(soft)
        model = self.adapter.model
        v = self.adapter.vocab_size
        kw = _cache_kwarg(model)
        out = model(
            inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, use_cache=True, logits_to_keep=1
        )
        b = soft.shape[0]
        done = torch.zeros(b, dtype=torch.bool, device=soft.device)
        stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=soft.device)
        toks, probs = [], []
        mask = batch.attention_mask
        banned = self.adapter.banned_ids.to(soft.device)
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1, :v].float()
            if banned.numel():  # control tokens (Gemma's <start_of_image>): never part of a caption
                logits[:, banned] = -torch.inf
            nxt = logits.argmax(-1)
            p = torch.softmax(logits, -1).gather(1, nxt[:, None])[:, 0]
            toks.append(torch.where(done, -1, nxt))
            probs.append(p)
            done = done | torch.isin(nxt, stop)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=mask.device)], dim=1)
            cache = getattr(out, kw)
            out = model(input_ids=nxt[:, None], attention_mask=mask, use_cache=True, **{kw: cache})
        ids = torch.stack(toks, 1).tolist()
        ps = torch.stack(probs, 1).tolist()
        res_ids, res_p = [], []
        for row, prow in zip(ids, ps):
            keep_ids, keep_p = [], []
            for t, q in zip(row, prow):
                if t < 0 or t in stop_ids:
                    break
                keep_ids.append(t)
                keep_p.append(q)
            res_ids.append(keep_ids)
            res_p.append(keep_p)
        return res_ids, res_p


def _cache_kwarg(model: nn.Module) -> str:
    """transformers >= 5 renamed ``past_key_values`` to ``cache`` (argument and output)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_at_newline: bool) -> set[int]:
    """EOS (and, optionally, every token whose text contains a newline)."""
    stop = {i for i in (tokenizer.eos_token_id,) if i is not None}
    if stop_at_newline:
        for tok_id in range(vocab_size):
            if "\n" in tokenizer.decode([tok_id]):
                stop.add(tok_id)
    return stop
