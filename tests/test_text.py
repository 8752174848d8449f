"""First-noun selection (spaCy) and mapping the noun onto its first LM token."""

from __future__ import annotations

import pytest

from mmn.text import first_noun, token_at_char

PROMPT = "A picture of"


@pytest.mark.parametrize(
    ("caption", "noun"),
    [
        (" a cat sitting on a red couch.", "cat"),
        (" two giraffes standing next to a tree", "giraffes"),
        (" a young boy riding a skateboard down the street", "boy"),
        (" an old red bus parked by the road", "bus"),
        (" a plate of food with broccoli", "plate"),
        (" a very large elephant walking through the grass", "elephant"),
    ],
)
def test_first_noun(caption, noun):
    n = first_noun(caption, PROMPT)
    assert n is not None and n.text == noun
    assert caption[n.start : n.start + len(noun)] == noun


def test_prompt_noun_is_never_chosen():
    # "picture" is a noun of the prompt, not of the caption
    n = first_noun(" a dog", PROMPT)
    assert n is not None and n.text == "dog" and n.start == 3


@pytest.mark.parametrize("caption", [" the", " very quickly and then", " ", ""])
def test_no_noun(caption):
    assert first_noun(caption, PROMPT) is None


def test_token_at_char_maps_multi_token_noun(tokenizer):
    caption = " a hippopotamus in the water"
    ids = tokenizer(caption, add_special_tokens=False).input_ids
    n = first_noun(caption, PROMPT)
    assert n.text == "hippopotamus"
    i = token_at_char(ids, tokenizer, n.start)
    # c is the token covering the noun's first character (it carries the leading space)
    assert tokenizer.decode(ids[i]).strip() and "hippopotamus".startswith(tokenizer.decode(ids[i]).strip())
    assert tokenizer.decode(ids[:i]) == " a"


def test_token_at_char_out_of_range(tokenizer):
    ids = tokenizer(" a cat", add_special_tokens=False).input_ids
    with pytest.raises(ValueError):
        token_at_char(ids, tokenizer, 50)
