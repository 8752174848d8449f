"""Which images the projection is trained on, kept apart from the images it is evaluated on.

``projection.train.data`` (resolved by :attr:`mmn.params.Params.train_data`) picks one of:

* ``coco-train``: a seeded subset of COCO 2017 *train* (stage ``download_train``), while
  ``data/coco`` holds val2017 images: disjoint by construction, checked by the gate.
* ``split``: :func:`split_ids` cuts the source's images (the ``sample`` images, or the
  ``data.coco.subset`` images of ``data.coco.split``) into a seeded train part and an
  evaluated part of ``projection.train.holdout``; ``download_coco`` keeps the evaluated
  part in ``data/coco`` and ``download_train`` the rest in ``data/coco_train``. Both stages
  call the same function on the same id set, so the two parts are consistent.
* ``eval``: the evaluated images themselves (nothing held out). LiMBeR trained on CC3M
  and evaluated on COCO, two disjoint sets; ``eval`` is only the offline 7-image default.

``data/coco_train/split.json`` (:data:`SPLIT_FILE`) records the outcome::

    {"mode": "coco-train" | "split" | "eval", "held_out": bool,
     "n_train": int, "n_eval": int, "train_ids": [int, ...]}

``held_out`` is false exactly under ``eval``; ``n_eval`` is the number of images in
``data/coco``. :func:`read_split_info` validates it (errors name the file and key).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from mmn.data.coco_format import read_json_object
from mmn.data.layout import LayoutError

__all__ = [
    "MODES",
    "SPLIT_FILE",
    "Split",
    "SplitError",
    "SplitInfo",
    "n_held_out",
    "read_split_info",
    "seeded_split",
    "split_ids",
    "split_part",
    "write_split_info",
]

Mode = Literal["coco-train", "split", "eval", "captions"]
MODES: tuple[str, ...] = get_args(Mode)
SPLIT_FILE = "split.json"


class SplitError(LayoutError):
    """The images cannot be split, or split.json is malformed; the message says which."""


@dataclass(frozen=True)
class Split:
    """A disjoint cut of an id set: both parts sorted, together the whole set."""

    train: list[int]
    eval: list[int]


def n_held_out(n: int, holdout: float) -> int:
    """Evaluated images out of ``n``: ``holdout * n`` rounded half up, at least 1 and at most n - 1."""
    return min(max(int(np.floor(holdout * n + 0.5)), 1), n - 1)


def seeded_split(ids: Iterable[int], n_held: int, seed: int) -> Split:
    """THE seeded id split of the project (:func:`split_ids` and
    :func:`mmn.projection_training.split_train_val` both cut with it).

    ``random.Random(seed).sample`` draws ``n_held`` of the *sorted distinct* ids: they are held
    out (``eval``), the rest kept (``train``); both parts sorted. The result depends only on
    the id set, ``n_held`` and ``seed``.
    """
    pool = sorted({int(i) for i in ids})
    if not 0 <= n_held <= len(pool):
        raise SplitError(f"cannot hold out {n_held} of {len(pool)} images")
    held = set(random.Random(seed).sample(pool, n_held))
    return Split(train=[i for i in pool if i not in held], eval=sorted(held))


def split_ids(ids: Iterable[int], holdout: float, seed: int) -> Split:
    """Seeded disjoint train/eval split of ``ids`` (duplicates collapse): :func:`seeded_split`
    holding out :func:`n_held_out` of them (evaluated), the rest trained on."""
    pool = sorted({int(i) for i in ids})
    if not 0 < holdout < 1:
        raise SplitError(f"projection.train.holdout must be in (0, 1), got {holdout}")
    if len(pool) < 2:
        raise SplitError(f"projection.train.data: split needs at least 2 images, the source has {len(pool)}")
    return seeded_split(pool, n_held_out(len(pool), holdout), seed)


def split_part(part: Literal["train", "eval"], holdout: float, seed: int) -> Callable[[Iterable[int]], list[int]]:
    """``ids -> split_ids(ids, holdout, seed).<part>``: what each download stage keeps."""
    if part not in ("train", "eval"):
        raise ValueError(f"part must be 'train' or 'eval', got {part!r}")
    return lambda ids: getattr(split_ids(ids, holdout, seed), part)


@dataclass(frozen=True)
class SplitInfo:
    """The content of ``split.json``."""

    mode: Mode
    held_out: bool
    n_train: int
    n_eval: int
    train_ids: list[int]

    def to_json(self) -> dict:
        return {"mode": self.mode, "held_out": self.held_out, "n_train": self.n_train,
                "n_eval": self.n_eval, "train_ids": list(self.train_ids)}


def write_split_info(root: Path, mode: Mode, train_ids: Iterable[int], n_eval: int) -> SplitInfo:
    """Write ``root/split.json`` (``held_out`` = ``mode != "eval"``) and return it."""
    if mode not in MODES:
        raise SplitError(f"unknown projection.train.data {mode!r} (one of {list(MODES)})")
    ids = sorted(int(i) for i in train_ids)
    info = SplitInfo(mode=mode, held_out=mode != "eval", n_train=len(ids), n_eval=int(n_eval), train_ids=ids)
    (Path(root) / SPLIT_FILE).write_text(json.dumps(info.to_json(), indent=1) + "\n", encoding="utf-8")
    return info


def read_split_info(root: Path) -> SplitInfo:
    """Read and check ``root/split.json``; :class:`SplitError` names the file and key."""
    path = Path(root) / SPLIT_FILE
    raw = read_json_object(path, SplitError)
    types = {"mode": str, "held_out": bool, "n_train": int, "n_eval": int, "train_ids": list}
    for key, t in types.items():
        if key not in raw:
            raise SplitError(f"{path}: missing key {key!r}")
        v = raw[key]
        if not isinstance(v, t) or (t is int and isinstance(v, bool)):
            raise SplitError(f"{path}: {key!r} must be {t.__name__}, got {v!r:.80}")
    if raw["mode"] not in MODES:
        raise SplitError(f"{path}: 'mode' must be one of {list(MODES)}, got {raw['mode']!r}")
    if raw["held_out"] != (raw["mode"] != "eval"):
        raise SplitError(f"{path}: 'held_out' is {raw['held_out']} under mode {raw['mode']!r}")
    ids = raw["train_ids"]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise SplitError(f"{path}: 'train_ids' must be integers")
    if len(ids) != raw["n_train"] or len(set(ids)) != len(ids):
        raise SplitError(f"{path}: 'n_train' is {raw['n_train']} but 'train_ids' has {len(ids)} "
                         f"({len(set(ids))} distinct)")
    return SplitInfo(mode=raw["mode"], held_out=raw["held_out"], n_train=raw["n_train"],
                     n_eval=raw["n_eval"], train_ids=list(ids))
