"""Small valid stage tables, for the quality gates' tests."""

from __future__ import annotations

import polars as pl


def good_captions() -> pl.DataFrame:
    """Four rows of a captions table that passes ``check_captions`` (one image without a noun)."""
    return pl.DataFrame(
        {
            "image_id": [7001, 7002, 7003, 7004],
            "file_name": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"],
            "caption": ["a dog on grass", "very nice", "a cat on a mat", "two zebras"],
            "has_noun": [True, False, True, True],
            "noun": ["dog", None, "cat", "zebras"],
            "target_token_id": [5325, None, 3797, 1976],
            "target_token": [" dog", None, " cat", " zeb"],
            "target_pos": [1, None, 1, 1],
            "p_target": [0.31, None, 0.92, 0.0],
            "n_caption_tokens": [4, 2, 5, 3],
        },
        schema_overrides={"target_token_id": pl.Int64, "target_pos": pl.Int64},
    )
