"""Activation maps of selected units over images (the only part of ``plot`` needing models).

Everything else in the plot stage takes a :data:`MapProvider`: a function from image ids
and units to ``{image_id: Float[ndarray, "n_units P"]}`` (activations at the image
positions, row-major patch order), so figures and the report can be built and tested
from synthetic maps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

MapProvider = Callable[[Sequence[int], Sequence[tuple[int, int]]], dict[int, np.ndarray]]


def model_maps(plm, load_image: Callable[[int], Image.Image], progress: bool = False) -> MapProvider:
    """A :data:`MapProvider` running the image-prefix LM (with its encoder): one forward pass per
    image (:func:`mmn.neurons.activations.activations_of_image`), keeping only the requested
    units (a full ``[layers, P, d_mlp]`` tensor per image would be 360 MB for GPT-J)."""
    from mmn.neurons.activations import activations_of_image

    def provide(image_ids: Sequence[int], units: Sequence[tuple[int, int]]) -> dict[int, np.ndarray]:
        layers = torch.tensor([l for l, _ in units], dtype=torch.long)
        cols = torch.tensor([u for _, u in units], dtype=torch.long)
        out: dict[int, np.ndarray] = {}
        for img in tqdm(list(image_ids), desc="activation maps", disable=not progress):
            acts = activations_of_image(plm, load_image(img))  # [L, P, d]
            out[img] = acts[layers, :, cols].numpy().astype(np.float32)  # [n_units, P]
        return out

    return provide


def top_activating(maps: dict[int, np.ndarray], units: Sequence[tuple[int, int]], n: int
                   ) -> dict[tuple[int, int], list[tuple[int, float]]]:
    """Per unit, its ``n`` images with the highest max-over-positions activation:
    ``[(image_id, max activation), ...]`` best first (ties by image id)."""
    out: dict[tuple[int, int], list[tuple[int, float]]] = {}
    ids = sorted(maps)
    for j, unit in enumerate(units):
        scored = [(i, float(maps[i][j].max())) for i in ids]
        scored.sort(key=lambda t: (-t[1], t[0]))
        out[unit] = scored[:n]
    return out
