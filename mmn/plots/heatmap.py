"""Activation maps of a unit drawn over an image (pure numpy/PIL, no pyplot).

A unit's activations at the image positions are reshaped row-major onto the encoder's
patch grid and bilinearly upsampled to the picture with
:func:`mmn.metrics.iou.receptive_field` — the same map the IoU experiment thresholds —
so a heatmap shows exactly the receptive field that Fig. 5 scores.

Gotchas:

* The encoders squash images to a square (no crop); overlays squash the photo alike, so
  grid cell ``(r, c)`` covers the same part of the picture the encoder saw.
* Maps are min-max normalised per (unit, image): colours compare positions within one
  map, not units or images (the paper's heatmaps are per-image too).
* ``quantile`` keeps the pixels strictly above the map's quantile
  (:func:`mmn.metrics.iou.threshold_map`), the paper's "0.95 percentile" heatmaps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from PIL import Image

from mmn.metrics.iou import receptive_field, threshold_map

# Distinct colours for superimposed units (Fig. 2): tab10 without grey/olive.
UNIT_COLORS: tuple[tuple[int, int, int], ...] = (
    (214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189),
    (23, 190, 207), (227, 119, 194), (140, 86, 75),
)


def square_image(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """``UInt8[ndarray, "size size 3"]``: the photo squashed to ``size``² like the encoders do."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    return np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8)


def activation_map(acts: np.ndarray, size: int) -> np.ndarray:
    """``Float[ndarray, "size size"]`` in [0, 1]: ``acts`` ([P] row-major or [g, g]) upsampled
    bilinearly and min-max normalised (a constant map gives zeros)."""
    m = receptive_field(np.asarray(acts, dtype=np.float64), (size, size))
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def overlay_heatmap(
    image: Image.Image | np.ndarray,
    acts: np.ndarray,
    *,
    size: int = 224,
    quantile: float | None = None,
    cmap: str = "jet",
    alpha: float = 0.65,
    dim: float = 0.5,
) -> np.ndarray:
    """``UInt8[ndarray, "size size 3"]``: the photo with the unit's heatmap blended over it.

    ``quantile=None``: continuous heatmap, opacity proportional to the normalised
    activation (cold positions leave the photo untouched). ``quantile=q``: only the
    pixels above the map's q-quantile are coloured; the rest of the photo is darkened
    by ``dim`` so the receptive field stands out (the paper's Fig. 4 style).
    """
    base = square_image(image, size).astype(np.float64)
    m = activation_map(acts, size)
    colors = colormaps[cmap](m)[..., :3] * 255.0
    if quantile is None:
        a = (alpha * m)[..., None]
        out = base * (1 - a) + colors * a
    else:
        keep = threshold_map(m, quantile)[..., None]
        out = np.where(keep, base * (1 - alpha) + colors * alpha, base * dim)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def overlay_masks(
    image: Image.Image | np.ndarray,
    maps: Sequence[np.ndarray],
    *,
    size: int = 224,
    quantile: float = 0.95,
    colors: Sequence[tuple[int, int, int]] = UNIT_COLORS,
    alpha: float = 0.55,
    dim: float = 0.6,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Superimpose several units' thresholded receptive fields (Fig. 2), one colour each.

    Returns the ``UInt8[ndarray, "size size 3"]`` picture and the bool masks (in order;
    where masks overlap, the earlier — higher-ranked — unit is drawn on top).
    """
    base = square_image(image, size).astype(np.float64)
    out = base * dim
    masks = [threshold_map(activation_map(a, size), quantile) for a in maps]
    covered = np.zeros((size, size), dtype=bool)
    for i, mk in enumerate(masks):
        col = np.asarray(colors[i % len(colors)], dtype=np.float64)
        draw = mk & ~covered
        out[draw] = base[draw] * (1 - alpha) + col * alpha
        covered |= mk
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), masks
