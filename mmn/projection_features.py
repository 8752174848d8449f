"""Encoder features of the projection's training views, computed once and kept on disk.

:func:`build_feature_store` encodes every view of every training image (the encoder is frozen)
into ``<dir>/features.bin`` (rows ``[P, d]`` back to back, C order, in the store's dtype) with
``<dir>/meta.json`` (key, shape, dtype, the image of every row). A store whose key matches the
request is reused as it is: a rerun (e.g. after a killed training) does not encode again.
:class:`FeatureStore` reads the rows a batch needs from the file, so training memory does not
grow with the number of images; :func:`feature_stats` streams over it in chunks.

Gotchas:

* The key must name everything the rows depend on (encoder, image contents, views, seed,
  dtype): :func:`store_key` hashes what the caller passes; a stale store is rebuilt, never
  patched.
* float16 storage halves disk and reads; the rows come back in the store's dtype, the caller
  casts them (``rows(...).to(dtype)``).
* The store is written into ``<dir>.tmp`` and renamed into place: a killed build leaves no
  store that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["FeatureStore", "build_feature_store", "feature_stats", "store_key"]

_NP = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
_NAMES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def store_key(**parts: object) -> str:
    """sha256 of the JSON of ``parts`` (sorted keys): what a store's rows depend on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class FeatureStore:
    """``Float[Tensor, "rows P d"]`` on disk; ``store[idx]`` reads rows (a list or a slice) in the store's dtype."""

    def __init__(self, root: Path):
        self.root = Path(root)
        meta = json.loads((self.root / "meta.json").read_text())
        self.key: str = meta["key"]
        self.dtype: torch.dtype = _NAMES[meta["dtype"]]
        self.shape: tuple[int, int, int] = tuple(meta["shape"])  # type: ignore[assignment]
        self.owner: list[int] = meta["owner"]
        self._np = _NP[self.dtype]
        self._row = self.shape[1] * self.shape[2]
        self._bytes = self._row * np.dtype(self._np).itemsize
        self._fd = os.open(self.root / "features.bin", os.O_RDONLY)
        size = os.fstat(self._fd).st_size
        if size != self.shape[0] * self._bytes:
            os.close(self._fd)
            raise ValueError(f"{self.root}/features.bin has {size} bytes, meta.json says {self.shape} "
                             f"{meta['dtype']} ({self.shape[0] * self._bytes} bytes)")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: Sequence[int] | slice) -> Tensor:
        rows = range(*idx.indices(self.shape[0])) if isinstance(idx, slice) else [int(i) for i in idx]
        out = np.empty((len(rows), self._row), dtype=self._np)
        for k, r in enumerate(rows):
            if not 0 <= r < self.shape[0]:
                raise IndexError(f"row {r} of a store of {self.shape[0]} rows")
            buf = os.pread(self._fd, self._bytes, r * self._bytes)
            out[k] = np.frombuffer(buf, dtype=self._np)
        return torch.from_numpy(out).view(len(rows), self.shape[1], self.shape[2])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def build_feature_store(root: Path, key: str, views: Iterator[tuple[int, Tensor]], dtype: torch.dtype) -> FeatureStore:
    """The store at ``root`` when its key is ``key``; else write ``views`` (``(image id,
    Float[Tensor, "v P d"])`` per image) into a new one and return it."""
    root = Path(root)
    if (root / "meta.json").is_file():
        try:
            store = FeatureStore(root)
            if store.key == key and store.dtype == dtype:
                return store
            store.close()
        except (ValueError, KeyError, json.JSONDecodeError, OSError):
            pass  # unreadable or stale: rebuilt below
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    owner: list[int] = []
    shape: tuple[int, int] | None = None
    with open(tmp / "features.bin", "wb") as f:
        for image_id, feats in views:
            if shape is None:
                shape = tuple(feats.shape[1:])  # type: ignore[assignment]
            f.write(np.ascontiguousarray(feats.detach().cpu().to(dtype).numpy()).tobytes())
            owner += [int(image_id)] * feats.shape[0]
    if shape is None:
        raise ValueError("no training views to store")
    name = next(k for k, v in _NAMES.items() if v == dtype)
    (tmp / "meta.json").write_text(json.dumps({"key": key, "dtype": name, "shape": [len(owner), *shape],
                                               "owner": owner}))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return FeatureStore(root)


def feature_stats(features: Tensor | FeatureStore, chunk_rows: int = 256) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std (unbiased; ``[d]`` each, std clamped to >= 1e-6) of
    ``Float[Tensor, "rows P d"]``, streamed in chunks of rows and merged in float64 (Chan et al.),
    returned in float64 when the features are float64, else float32."""
    n_rows = features.shape[0]
    count, mean, m2 = 0, None, None
    for s in range(0, n_rows, chunk_rows):
        x = features[s: s + chunk_rows].reshape(-1, features.shape[-1]).to(torch.float64)
        n_b, mean_b = x.shape[0], x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        if mean is None:
            count, mean, m2 = n_b, mean_b, m2_b
            continue
        delta = mean_b - mean
        total = count + n_b
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta ** 2 * (count * n_b / total)
        count = total
    if mean is None:
        raise ValueError("no features")
    std = (m2 / max(count - 1, 1)).sqrt().clamp_min(1e-6)
    out = torch.float64 if features.dtype == torch.float64 else torch.float32
    return mean.to(out), std.to(out)
