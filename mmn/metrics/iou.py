"""Receptive fields of units vs COCO instance masks (the paper's Fig. 5, after Bau et al.).

A unit's activation at each image position, reshaped row-major onto the encoder's patch
grid (14×14 for BEiT-16/224), bilinearly upsampled to the image size, thresholded at its
own 0.95 quantile on that image (strictly above it: see :func:`threshold_map`; the paper:
"We then threshold activations above the 0.95 percentile") or, as in NetDissect, at the
quantile of the unit's raw activations over all evaluated images (:func:`dataset_threshold`),
and compared by IoU with the union of the COCO instance masks of the image's category.

Gotchas:

* Sizes are ``(H, W)`` everywhere here (numpy/torch order), unlike PIL's ``(W, H)``.
* The encoders squash images to 224×224 (no crop), so masks are squashed alike
  (nearest-neighbour on pixel centres, PIL ``NEAREST``) — not cropped.
* Row-major reshape: position ``p`` is grid cell ``(p // gw, p % gw)``, the order ViT/BEiT
  patch tokens and flattened CNN feature maps use.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from PIL import Image


def receptive_field(
    acts: Float[torch.Tensor, "patches"] | Float[torch.Tensor, "gh gw"] | np.ndarray,
    size: tuple[int, int] = (224, 224),
    grid: tuple[int, int] | None = None,
) -> np.ndarray:
    """``Float[ndarray, "H W"]`` (float64): ``acts`` upsampled bilinearly to ``size``.

    ``acts`` is ``[gh*gw]`` (row-major positions; square grid unless ``grid`` is given) or
    ``[gh, gw]``. Upsampling is ``F.interpolate(mode="bilinear", align_corners=False)``.
    """
    if isinstance(acts, torch.Tensor):
        a = acts.detach().to("cpu", torch.float64)  # also bf16/fp16 and GPU tensors
    else:
        a = torch.as_tensor(np.asarray(acts, dtype=np.float64))
    if a.ndim == 1:
        if grid is None:
            side = math.isqrt(a.numel())
            if side * side != a.numel():
                raise ValueError(f"{a.numel()} activations are not a square grid; pass grid=(gh, gw)")
            grid = (side, side)
        if grid[0] * grid[1] != a.numel():
            raise ValueError(f"grid {grid} does not hold {a.numel()} activations")
        a = a.reshape(grid)
    elif a.ndim != 2:
        raise ValueError(f"acts must be [gh*gw] or [gh, gw], got shape {tuple(a.shape)}")
    elif grid is not None and tuple(a.shape) != tuple(grid):
        raise ValueError(f"acts shape {tuple(a.shape)} != grid {grid}")
    up = F.interpolate(a[None, None], size=tuple(size), mode="bilinear", align_corners=False)
    return up[0, 0].numpy()


def threshold_map(m: np.ndarray, quantile: float = 0.95, inclusive: bool = False) -> np.ndarray:
    """Bool mask of the pixels "above the 0.95 percentile" (the paper's words) of this map:
    ``m > t`` with ``t = numpy.quantile(m, quantile)`` (linear interpolation);
    ``inclusive=True`` gives ``m >= t``.

    Ties decide the area, which is ``1 - quantile`` of the pixels only for a map without
    ties at ``t``. When most of the map is tied at its minimum (e.g. one hot patch on a
    zero background) the strict rule keeps just the pixels above that floor, while ``>=``
    would keep the whole image; a constant map gives all False (IoU 0) strictly, all True
    inclusively. When more than ``1 - quantile`` of the pixels tie at the maximum, the
    strict mask is empty.
    """
    m = np.asarray(m, dtype=np.float64)
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    if m.size == 0 or not np.isfinite(m).all():
        raise ValueError("threshold_map needs a non-empty map of finite values")
    t = np.quantile(m, quantile)
    return m >= t if inclusive else m > t


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two same-shape bool masks; 0.0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 0.0
    return float(np.logical_and(a, b).sum() / union)


def coco_mask(coco, image_id: int, category_id: int, size: tuple[int, int] = (224, 224),
              include_crowd: bool = True) -> np.ndarray:
    """``Bool[ndarray, "H W"]``: union of ``category_id``'s instance masks in ``image_id``
    (``coco.annToMask``), squashed to ``size`` = (H, W) with nearest-neighbour.

    Raises KeyError for an unknown image and ValueError when the image has no annotation of
    that category (an empty mask would silently give IoU 0).
    """
    img = coco.imgs[image_id]
    ann_ids = coco.getAnnIds(imgIds=[image_id], catIds=[category_id], iscrowd=None)
    anns = [a for a in coco.loadAnns(ann_ids) if include_crowd or not a.get("iscrowd", 0)]
    if not anns:
        raise ValueError(f"image {image_id} has no annotation of category {category_id}")
    full = np.zeros((img["height"], img["width"]), dtype=bool)
    for a in anns:
        full |= coco.annToMask(a).astype(bool)
    h, w = size
    small = Image.fromarray(full.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)
    return np.asarray(small) > 0


def _category_ids(coco, category_names: list[str]) -> dict[str, int]:
    by_name = {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}
    unknown = [n for n in category_names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown COCO categories {unknown}; valid names: {sorted(by_name)}")
    return by_name


def single_instance_images(coco, category_names: list[str]) -> dict[str, list[int]]:
    """``{name: sorted image ids}`` of images with exactly one non-crowd instance of that
    category and no crowd annotation of it (other categories may be present).
    This is ``iou.single: one_instance``.

    Raises ValueError naming any unknown category and listing the valid names.
    """
    by_name = _category_ids(coco, category_names)
    out: dict[str, list[int]] = {}
    for name in category_names:
        cid = by_name[name]
        counts: Counter[int] = Counter()
        crowded: defaultdict[int, bool] = defaultdict(bool)
        for a in coco.loadAnns(coco.getAnnIds(catIds=[cid], iscrowd=None)):
            if a.get("iscrowd", 0):
                crowded[a["image_id"]] = True
            else:
                counts[a["image_id"]] += 1
        out[name] = sorted(i for i, n in counts.items() if n == 1 and not crowded[i])
    return out


def only_object_images(coco, category_names: list[str]) -> dict[str, list[int]]:
    """``{name: sorted image ids}`` of images whose ONLY instance annotation (any category,
    crowd or not) is one non-crowd object of that category — our reading of the paper's
    "12 COCO categories with single object annotations" (``iou.single: only_object``).

    Raises ValueError naming any unknown category and listing the valid names.
    """
    by_name = _category_ids(coco, category_names)
    per_image: defaultdict[int, list[dict]] = defaultdict(list)
    for a in coco.loadAnns(coco.getAnnIds(iscrowd=None)):
        per_image[a["image_id"]].append(a)
    wanted = {by_name[n]: n for n in category_names}
    out: dict[str, list[int]] = {n: [] for n in category_names}
    for img, anns in per_image.items():
        if len(anns) == 1 and not anns[0].get("iscrowd", 0) and anns[0]["category_id"] in wanted:
            out[wanted[anns[0]["category_id"]]].append(img)
    return {n: sorted(v) for n, v in out.items()}


SINGLE_MODES = ("only_object", "one_instance")


def category_images(coco, category_names: list[str], single: str = "only_object") -> dict[str, list[int]]:
    """The images of each category scored for Fig. 5: :func:`only_object_images` or
    :func:`single_instance_images` (``single`` = ``only_object`` | ``one_instance``)."""
    if single == "only_object":
        return only_object_images(coco, category_names)
    if single == "one_instance":
        return single_instance_images(coco, category_names)
    raise ValueError(f"single must be one of {SINGLE_MODES}, got {single!r}")


def dataset_threshold(acts: np.ndarray | Float[torch.Tensor, "..."], quantile: float = 0.95) -> float:
    """NetDissect's per-unit threshold (Bau et al. 2017; ``iou.threshold: dataset``): the
    ``quantile`` (numpy linear interpolation) of ALL of one unit's raw activations, every
    position of every evaluated image (``acts``: any shape, e.g. ``[n_images, P]``).
    The unit's upsampled map on an image is then thresholded strictly above it
    (:func:`threshold_at`)."""
    a = np.asarray(acts.detach().cpu().double() if isinstance(acts, torch.Tensor) else acts,
                   dtype=np.float64).ravel()
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    if a.size == 0 or not np.isfinite(a).all():
        raise ValueError("dataset_threshold needs a non-empty set of finite activations")
    return float(np.quantile(a, quantile))


def threshold_at(m: np.ndarray, t: float) -> np.ndarray:
    """Bool mask ``m > t`` (strict, as :func:`threshold_map`) for a given threshold ``t``."""
    return np.asarray(m, dtype=np.float64) > t
