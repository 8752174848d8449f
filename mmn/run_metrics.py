"""Numeric leaves of a metrics JSON, for comparing runs (scripts/seeds.py, scripts/compare_runs.py,
benchmarks/projection_stability.py)."""

from __future__ import annotations


def flatten(obj: object, prefix: str = "") -> dict[str, float]:
    """Numeric leaves as ``{"a.b.c": value}`` (nulls, strings and booleans left out)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = float(obj)
    return out
