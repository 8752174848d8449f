"""Compare two runs' output files: byte for byte, and say how they differ when they do not.

Reruns on one machine must be bit-identical. When a file is not, the failure message says
whether only float low bits moved (every non-float value — captions, token ids, unit ids,
column names, row order, JSON keys — equal, every float within ``RTOL``/``ATOL``) or more.
The first kind is what MKL VML's first-call race produced before ``mmn.numerics``
(``p_target`` 4e-4 relative off in one CI forced rerun); it points at process-level
numeric state, the second at the pipeline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl

RTOL = 2e-3  # the VML race's worst case: p_target 4e-4 relative (captions.parquet, one CI run)
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


def assert_byte_identical(pairs: dict[str, tuple[Path, Path]]) -> None:
    """Assert each ``name: (a, b)`` pair is byte-identical; the message classifies each difference."""
    diffs = []
    for name, (a, b) in pairs.items():
        if a.read_bytes() != b.read_bytes():
            d = output_diff(a, b)
            diffs.append(f"{name}: " + ("float low bits only (process-level numeric state?)" if d is None else d))
    assert not diffs, f"not byte-identical: {diffs}"
