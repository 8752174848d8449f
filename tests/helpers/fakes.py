"""Seeded stand-ins for a model's inputs: an image encoder and a caption table (no weights, no files)."""

from __future__ import annotations

import polars as pl
import torch


class FakeEncoder:
    """Stands in for a PatchEncoder: an image is its integer id; its ``n_patch`` × ``d_enc``
    features are ``scale`` times standard normals seeded by it."""

    def __init__(self, n_patch: int, d_enc: int, scale: float):
        self.n_patch, self.d_enc, self.scale = n_patch, d_enc, scale

    def encode(self, images):
        return torch.stack([torch.randn(self.n_patch, self.d_enc, generator=torch.Generator().manual_seed(int(i)))
                            * self.scale for i in images])


def captions(tok, n=5) -> pl.DataFrame:
    """``n`` captioned images (ids 10, 11, ...; the caption's last token is the target) and one
    without a noun (id 99), as stage caption writes them; ``tok`` tokenizes the texts."""
    texts = [" a cat on the mat", " two dogs in snow", " a red bus", " the old clock", " one cup of tea"]
    rows = []
    for i in range(n):
        ids = tok(texts[i % len(texts)]).input_ids
        rows.append({"image_id": 10 + i, "caption_token_ids": ids, "target_pos": len(ids) - 1,
                     "target_token_id": ids[-1], "has_noun": True})
    rows.append({"image_id": 99, "caption_token_ids": [1], "target_pos": None, "target_token_id": None,
                 "has_noun": False})
    return pl.DataFrame(rows)
