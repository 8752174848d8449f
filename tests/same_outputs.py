"""Compare two runs' output files: byte for byte, else equal up to float noise.

Reruns on one machine are meant to be bit-identical, and usually are. On the CI machine
a fresh process occasionally lands in a different numeric state (logits move by a few
1e-4, about 1e-5 relative; cause not found, see the README's stability section), so a
rerun can rewrite a float column with different low bits. These helpers accept that
and nothing more: every non-float value (captions, token ids, unit ids, column names,
row order, JSON keys) must be equal, and every float within ``RTOL``/``ATOL``. A file
that is not byte-identical is reported through a ``UserWarning``, so CI's warnings
summary still shows when it happened.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import polars as pl

RTOL = 2e-3  # measured worst case: p_target 4e-4 relative (captions.parquet, one CI run)
ATOL = 1e-5


def _close(a: float, b: float) -> bool:
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= ATOL + RTOL * abs(b)


def _json_diff(a, b, where: str = "$") -> str | None:
    """First difference between two JSON trees beyond float noise, else None."""
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return f"{where}: keys {list(a)} vs {list(b)}"
        return next((d for k in a if (d := _json_diff(a[k], b[k], f"{where}.{k}"))), None)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: length {len(a)} vs {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _json_diff(x, y, f"{where}[{i}]"))), None)
    if isinstance(a, float) or isinstance(b, float):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) or v is None for v in (a, b))
        return None if numeric and _close(a, b) else f"{where}: {a!r} vs {b!r}"
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def _frame_diff(a: pl.DataFrame, b: pl.DataFrame) -> str | None:
    if a.schema != b.schema or a.height != b.height:
        return f"schema/height {dict(a.schema)}x{a.height} vs {dict(b.schema)}x{b.height}"
    for col in a.columns:
        x, y = a[col], b[col]
        if x.dtype.is_float():
            xa, ya = x.to_numpy().astype(np.float64), y.to_numpy().astype(np.float64)
            if not np.allclose(xa, ya, rtol=RTOL, atol=ATOL, equal_nan=True):
                i = int(np.nanargmax(np.abs(xa - ya)))
                return f"column {col!r} row {i}: {xa[i]!r} vs {ya[i]!r}"
        elif not x.equals(y, check_names=True):
            return f"column {col!r} differs (not a float column)"
    return None


def _tensors_diff(a: Path, b: Path) -> str | None:
    from safetensors.torch import load_file

    ta, tb = load_file(a), load_file(b)
    if ta.keys() != tb.keys():
        return f"tensors {sorted(ta)} vs {sorted(tb)}"
    for k in ta:
        x, y = ta[k].double().numpy(), tb[k].double().numpy()
        if x.shape != y.shape or not np.allclose(x, y, rtol=RTOL, atol=ATOL):
            return f"tensor {k!r} differs beyond float noise"
    return None


def output_diff(a: Path, b: Path) -> str | None:
    """``None`` when ``a`` and ``b`` hold the same content up to float noise, else what differs."""
    if a.suffix == ".parquet":
        return _frame_diff(pl.read_parquet(a), pl.read_parquet(b))
    if a.suffix == ".csv":
        return _frame_diff(pl.read_csv(a), pl.read_csv(b))
    if a.suffix == ".json":
        return _json_diff(json.loads(a.read_text()), json.loads(b.read_text()))
    if a.suffix == ".safetensors":
        return _tensors_diff(a, b)
    return None if a.read_bytes() == b.read_bytes() else "bytes differ"


def assert_same_outputs(pairs: dict[str, tuple[Path, Path]]) -> list[str]:
    """Assert each ``name: (a, b)`` pair is byte-identical or equal up to float noise.

    Returns the names that were not byte-identical (each also raised as a ``UserWarning``).
    """
    noisy, bad = [], []
    for name, (a, b) in pairs.items():
        if a.read_bytes() == b.read_bytes():
            continue
        diff = output_diff(a, b)
        if diff is None:
            noisy.append(name)
        else:
            bad.append(f"{name}: {diff}")
    assert not bad, f"outputs differ beyond float noise (rtol {RTOL:g}, atol {ATOL:g}): {bad}"
    if noisy:
        warnings.warn(f"not byte-identical, equal up to float noise (rtol {RTOL:g}): {noisy}", stacklevel=2)
    return noisy
