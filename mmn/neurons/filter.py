"""The interpretability filter: a unit is interpretable when at least ``min_words`` of
its top ``top_n`` decoded tokens are English dictionary words of ``min_letters``+ letters.

The paper (§3.1): "Restricting analyses to interpretable neurons (where at least 7 of
the top 10 tokens are words in the English dictionary containing ≥ 3 letters) retains
50% of neurons with high g_{k,c}".

The word list is SCOWL-derived Debian ``wamerican`` (what the paper used: SCOWL),
a DVC-tracked input (``data/wordlist/american-english``, fetched by ``scripts/setup.sh``;
the filter and ablate stages declare it in :mod:`mmn.stage_specs`). Entries are
lower-cased; possessives (``cat's``) and non-alphabetic entries are dropped.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
import torch
from jaxtyping import Bool
from torch import Tensor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from mmn.models.adapters import LMAdapter
    from mmn.params import DecodeParams, FilterParams


def load_wordlist(path: Path | str) -> frozenset[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: word list missing; run scripts/setup.sh (fetches Debian wamerican) "
                                f"or `dvc pull {path}.dvc` from a remote")
    words = {w.strip().lower() for w in path.read_text(encoding="utf-8", errors="replace").splitlines()}
    return frozenset(w for w in words if w.isalpha() and w.isascii())


def wordlist_info(path: Path | str) -> dict:
    path = Path(path)
    data = path.read_bytes()
    return {"path": str(path), "source": "Debian wamerican (SCOWL size 50)",
            "sha256": hashlib.sha256(data).hexdigest(), "entries": len(load_wordlist(path))}


def filter_info(wordlist: Path | str, f: FilterParams) -> dict:
    """The filter stage's description (data/info/filter.json): the word list and the definitions."""
    return {
        "wordlist": wordlist_info(wordlist),
        "rule": f">= {f.min_words} of the top {f.top_n} decoded tokens are dictionary words of "
                f">= {f.min_letters} letters",
        "kept_fraction": "per image: interpretable / distinct top units; mean over images with a 95% "
                         "percentile bootstrap CI over images (n = images)",
        "layer_distribution": "counts of (image, layer, unit): each image's distinct top units",
    }


def is_word(token: str, words: frozenset[str], min_letters: int = 3) -> bool:
    t = token.strip()
    return len(t) >= min_letters and t.isalpha() and t.lower() in words


def count_words(tokens: list[str], words: frozenset[str], top_n: int = 10, min_letters: int = 3) -> int:
    return sum(is_word(t, words, min_letters) for t in tokens[:top_n])


def apply_filter(
    neurons: pl.DataFrame, words: frozenset[str], *, min_words: int = 7, top_n: int = 10, min_letters: int = 3
) -> pl.DataFrame:
    """Add ``n_words`` and ``interpretable`` columns to a decoded-neurons table."""
    n = [count_words(t, words, top_n, min_letters) for t in neurons["tokens"].to_list()]
    return neurons.with_columns(
        pl.Series("n_words", n, dtype=pl.Int64),
        pl.Series("interpretable", [x >= min_words for x in n], dtype=pl.Boolean),
    )


def vocab_word_mask(tokenizer, vocab_size: int, words: frozenset[str], min_letters: int = 3) -> Bool[Tensor, "vocab"]:
    """True where the token id decodes (stripped) to a dictionary word."""
    return torch.tensor([is_word(tokenizer.decode([i]), words, min_letters) for i in range(vocab_size)])


def interpretable_units(
    adapter: "LMAdapter",
    tokenizer: "PreTrainedTokenizerBase",
    words: frozenset[str],
    decode: "DecodeParams",
    filt: "FilterParams",
) -> Bool[Tensor, "layers d_mlp"]:
    """CPU: the interpretability of EVERY unit, decided
    exactly as the decode + filter stages decide it for the attributed units.

    decode: the top ``decode.top_n`` real tokens of decoder(W_out[:, k]) with ``decode.lens``
    in fp32 (:func:`mmn.neurons.decode.top_token_ids_all_units`); filter: of their first
    ``filter.top_n``, at least ``filter.min_words`` are dictionary words of
    ``filter.min_letters``+ letters (:func:`is_word` on the stripped token text). For
    bit-identical decisions pass an fp32 adapter on CPU, as the decode stage loads it: a
    bf16/fp16 adapter is upcast (weights already rounded) and GPU matmuls may order
    near-tied logits differently.
    """
    from mmn.neurons.decode import top_token_ids_all_units

    ids = top_token_ids_all_units(adapter, top_n=decode.top_n, lens=decode.lens)[..., : filt.top_n]
    mask = vocab_word_mask(tokenizer, adapter.vocab_size, words, filt.min_letters)
    return mask[ids].sum(-1) >= filt.min_words
