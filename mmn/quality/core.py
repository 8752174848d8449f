"""Run Great Expectations suites over pandas/polars frames, offline and quietly.

Suites are plain data: a list of ``{"type": "expect_...", "kwargs": {...}}`` dicts
(build them with :func:`expect`), or ready-made ``great_expectations.expectations``
objects. :func:`run_suite` validates a frame against one and raises
:class:`QualityError` listing every unmet expectation with sample offending rows.

Gotchas (GX 1.x, checked with great_expectations 1.24 + pandas 3):

* ``great_expectations`` takes ~2 s to import, so it is imported lazily on the first
  validation; the ephemeral context is built once per process and cached.
* ``GX_ANALYTICS_ENABLED=false`` is set before the import (setdefault: an explicit
  value wins) and the context is created with ``analytics_enabled=False``; progress
  bars are turned off through the context's ``progress_bars`` variable. Nothing is
  written to disk and nothing touches the network.
* Types: use ``expect_column_values_to_be_of_type`` — on pandas it compares the
  dtype's scalar type, so ``"int64"`` accepts ``int64`` and nullable ``Int64``,
  ``"str"`` accepts pandas 3 ``str``/``string`` dtypes and object columns of str,
  ``"bool"`` accepts ``bool`` and ``boolean``. ``..._in_type_list`` compares dtypes
  themselves and rejects pandas 3 ``str`` columns even for ``["str"]``.
* A pandas integer column holding nulls is float64 (e.g. ``pd.read_parquet``
  without ``dtype_backend="numpy_nullable"``) and fails an ``"int64"`` type check.
  Polars frames are converted with nullable pandas dtypes, so their integer columns
  keep an integer type.
* Row conditions: GX >= 1.9 deprecates string ``row_condition`` +
  ``condition_parser`` (DeprecationWarning; still works) in favour of Condition
  objects; :func:`when` builds their dict form, which stays plain data:
  ``expect("expect_column_values_to_be_null", column="noun",
  row_condition=when("has_noun", "==", False))``.
* An ``ExpectationSuite`` can only be built once a context exists (GX keeps a global
  "current project"); :func:`validate` creates the cached context first.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

# Before any great_expectations import (ours or anyone's).
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import pandas as pd

from mmn import errors as _errors

__all__ = [
    "QualityError",
    "Failure",
    "expect",
    "when",
    "validate",
    "run_suite",
    "to_pandas",
]

MAX_SAMPLES = 5
_MAX_CELL = 40  # characters shown per cell of a sample row

_LOCK = threading.Lock()


# --------------------------------------------------------------------------- data


def expect(type: str, **kwargs: Any) -> dict:
    """One expectation as data: ``expect("expect_column_values_to_be_unique", column="id")``.

    ``type`` is the snake_case GX expectation name; ``kwargs`` are its arguments
    (``column``, ``min_value``, ``row_condition``, ``condition_parser``, ``mostly``,
    ``description``, ...).
    """
    if not type.startswith("expect_"):
        raise ValueError(f"expectation type must start with 'expect_', got {type!r}")
    return {"type": type, "kwargs": dict(kwargs)}


@dataclass
class Failure:
    """One unmet expectation of one suite."""

    suite: str
    type: str
    kwargs: dict
    unexpected_count: int | None = None
    element_count: int | None = None
    unexpected_values: list = field(default_factory=list)
    observed_value: Any = None
    sample_rows: str = ""  # the offending rows, rendered as a small table
    exception: str | None = None
    description: str | None = None
    skipped: list = field(default_factory=list)  # types not evaluated: column missing

    @property
    def column(self) -> str | None:
        return self.kwargs.get("column")

    def describe(self) -> str:
        shown = {k: v for k, v in self.kwargs.items() if k not in ("column", "batch_id")}
        args = [f"column={self.column!r}"] if self.column is not None else []
        args += [f"{k}={_short(v)}" for k, v in shown.items()]
        lines = [f"  FAILED {self.type}({', '.join(args)})"]
        if self.description:
            lines.append(f"    why: {self.description}")
        if self.exception:
            lines.append(f"    could not evaluate: {self.exception}")
        if self.unexpected_count is not None:
            of = f" of {self.element_count}" if self.element_count is not None else ""
            lines.append(f"    {self.unexpected_count}{of} rows unexpected")
        if self.unexpected_values:
            lines.append(
                f"    unexpected values (first {len(self.unexpected_values)}): "
                f"{_short(self.unexpected_values, 300)}"
            )
        if self.observed_value is not None:
            lines.append(f"    observed: {_short(self.observed_value, 300)}")
        if self.type == "expect_column_to_exist" and self.column is not None:
            lines.append(f"    column {self.column!r} is missing")
        if self.skipped:
            lines.append(f"    so {len(self.skipped)} more expectations on it were not "
                         f"evaluated: {', '.join(sorted(set(self.skipped)))}")
        if self.sample_rows:
            lines.append("    sample offending rows:")
            lines += ["      " + ln for ln in self.sample_rows.splitlines()]
        return "\n".join(lines)


class QualityError(_errors.QualityError):
    """A data-quality gate failed.

    ``suite``: the suite name; ``failures``: the :class:`Failure` list (empty for
    structural problems found before GX runs); ``path``: the offending file, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        suite: str,
        failures: Sequence[Failure] = (),
        path: Any = None,
    ) -> None:
        super().__init__(message)
        self.suite = suite
        self.failures = list(failures)
        self.path = path


# ---------------------------------------------------------------- GX machinery


@functools.lru_cache(maxsize=1)
def _batch_definition():
    """The cached ephemeral context's whole-dataframe batch definition."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    # Belt and braces: some code paths read the variables rather than the config.
    context.variables.progress_bars = ProgressBarsConfig(
        globally=False, metric_calculations=False
    )
    source = context.data_sources.add_pandas("mmn_frames")
    asset = source.add_dataframe_asset("frame")
    return asset.add_batch_definition_whole_dataframe("whole_frame")


def _build(e: Any):
    """dict spec or GX Expectation -> GX Expectation."""
    from great_expectations.expectations.expectation import Expectation
    from great_expectations.expectations.registry import get_expectation_impl

    if isinstance(e, Expectation):
        return e
    if isinstance(e, Mapping):
        etype = e.get("type") or e.get("expectation_type")
        if not etype:
            raise ValueError(f"expectation spec without 'type': {e!r}")
        return get_expectation_impl(etype)(**dict(e.get("kwargs", {})))
    raise TypeError(f"not an expectation: {e!r}")


def to_pandas(df: Any) -> pd.DataFrame:
    """pandas passes through; polars converts, integer/bool columns with nulls to the
    nullable pandas dtypes (``Int64``, ``boolean``) rather than float64/object."""
    if isinstance(df, pd.DataFrame):
        return df
    if type(df).__module__.split(".")[0] == "polars":
        out = df.to_pandas()
        for name, dtype in df.schema.items():
            s = df.get_column(name)
            if not s.null_count():
                continue
            if dtype.is_integer():
                out[name] = pd.array(s.to_list(), dtype=_nullable_int(str(dtype)))
            elif str(dtype) == "Boolean":
                out[name] = pd.array(s.to_list(), dtype="boolean")
        return out
    raise TypeError(f"expected a pandas or polars DataFrame, got {type(df).__name__}")


def _nullable_int(polars_dtype: str) -> str:
    # polars "Int64"/"UInt8" -> pandas "Int64"/"UInt8"
    return {"Int128": "Int64", "UInt128": "UInt64"}.get(polars_dtype, polars_dtype)


def _short(v: Any, limit: int = 120) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _render_rows(df: pd.DataFrame, index_labels: Iterable, columns: Sequence[str]) -> str:
    labels = [i for i in list(index_labels)[:MAX_SAMPLES] if i in df.index]
    if not labels:
        return ""
    rows = df.loc[labels]
    front = list(dict.fromkeys(c for c in columns if c in rows.columns))  # a key column may also be checked
    rest = [c for c in rows.columns if c not in front]
    rows = rows[front + rest][: MAX_SAMPLES]
    rows = rows.apply(
        lambda col: col.map(lambda x: x if not isinstance(x, str) or len(x) <= _MAX_CELL
                            else x[: _MAX_CELL - 3] + "...")
    )
    with pd.option_context(
        "display.width", 160, "display.max_columns", 10, "display.max_colwidth", _MAX_CELL
    ):
        return rows.to_string()


def _condition_str(rc: Any) -> str:
    """A row condition (dict, GX Condition or legacy string) as readable text."""
    from great_expectations.expectations.row_conditions import (
        PassThroughCondition,
        deserialize_row_condition,
    )

    try:
        cond = deserialize_row_condition(rc)
    except Exception:  # noqa: BLE001 - display only
        return str(rc)
    if isinstance(cond, PassThroughCondition):
        return cond.pass_through_filter
    return cond if isinstance(cond, str) else repr(cond)


def when(column: str, op: str, value: Any = None) -> dict:
    """A row condition as data (GX 1.9+ Condition dict; string conditions are
    deprecated there). ``op``: ``== != < <= > >= IN NOT_IN`` or ``is_null`` /
    ``is_not_null`` (no value)::

        expect("expect_column_values_to_be_null", column="noun",
               row_condition=when("has_noun", "==", False))
    """
    col = {"name": column}
    if op in ("is_null", "is_not_null"):
        return {"type": "nullity", "column": col, "is_null": op == "is_null"}
    return {"type": "comparison", "column": col, "operator": op,
            "parameter": list(value) if op in ("IN", "NOT_IN") else value}


def _columns_of(kwargs: Mapping) -> list[str]:
    cols = [kwargs.get(k) for k in ("column", "column_A", "column_B")]
    cols += list(kwargs.get("column_list") or [])
    return [c for c in cols if isinstance(c, str)]


def _failure(suite: str, r: Any, df: pd.DataFrame, key_columns: Sequence[str]) -> Failure:
    cfg = r.expectation_config
    kwargs = {k: v for k, v in dict(cfg.kwargs).items() if k != "batch_id"}
    if kwargs.get("row_condition") is not None:
        kwargs["row_condition"] = _condition_str(kwargs["row_condition"])
    res = dict(r.result or {})
    exc = None
    info = r.exception_info or {}
    # exception_info is either flat or keyed by metric id
    infos = [info] if "raised_exception" in info else list(info.values())
    for i in infos:
        if isinstance(i, Mapping) and i.get("raised_exception"):
            exc = str(i.get("exception_message")).strip()
            break
    idx = res.get("partial_unexpected_index_list") or res.get("unexpected_index_list") or []
    values = res.get("partial_unexpected_list") or []
    return Failure(
        suite=suite,
        type=cfg.type,
        kwargs=kwargs,
        unexpected_count=res.get("unexpected_count"),
        element_count=res.get("element_count"),
        unexpected_values=list(values)[:MAX_SAMPLES],
        observed_value=res.get("observed_value"),
        sample_rows=(_render_rows(df, idx, [*_columns_of(kwargs), *key_columns])
                     if exc is None else ""),
        exception=exc,
        description=getattr(cfg, "description", None) or None,
    )


DEFAULT_KEY_COLUMNS = ("id", "image_id", "file_name")


def validate(
    df: Any,
    name: str,
    expectations: Sequence[Any],
    *,
    key_columns: Sequence[str] = DEFAULT_KEY_COLUMNS,
) -> list[Failure]:
    """Validate ``df`` against ``expectations``; return the failures (empty: all met).

    Sample offending rows show the expectation's column(s), then ``key_columns``
    (those present), then the rest.
    """
    import great_expectations as gx

    pdf = to_pandas(df)
    with _LOCK:
        batch_definition = _batch_definition()  # creates the context suites need
        suite = gx.ExpectationSuite(name=name)
        for i, e in enumerate(expectations):
            built = _build(e)
            if isinstance(e, Mapping):  # our own object: tag it to report in suite order
                built.meta = {**(built.meta or {}), "mmn_index": i}
            suite.add_expectation(built)
        batch = batch_definition.get_batch(batch_parameters={"dataframe": pdf})
        result = batch.validate(
            suite,
            result_format={
                "result_format": "SUMMARY",
                "partial_unexpected_count": MAX_SAMPLES,
            },
        )
    failed = [r for r in result.results if not r.success]
    failed.sort(key=lambda r: (r.expectation_config.meta or {}).get("mmn_index", 1 << 30))
    return _fold_missing_columns([_failure(name, r, pdf, key_columns) for r in failed])


def _fold_missing_columns(failures: list[Failure]) -> list[Failure]:
    """Expectations on a column that does not exist all fail with a GX exception;
    keep the ``expect_column_to_exist`` failure and fold the rest into it."""
    missing = {f.column: f for f in failures
               if f.type == "expect_column_to_exist" and f.column is not None}
    out = []
    for f in failures:
        owner = missing.get(f.column)
        if owner is not None and f is not owner and f.exception is not None:
            owner.skipped.append(f.type)
            continue
        out.append(f)
    return out


def format_failures(name: str, failures: Sequence[Failure], n_expectations: int,
                    shape: tuple[int, int] | None = None) -> str:
    where = f" on a {shape[0]} x {shape[1]} frame" if shape else ""
    unmet = sum(1 + len(f.skipped) for f in failures)
    head = (f"data-quality suite {name!r} failed{where}: "
            f"{unmet} of {n_expectations} expectations unmet")
    return "\n".join([head] + [f.describe() for f in failures])


def run_suite(
    df: Any,
    name: str,
    expectations: Sequence[Any],
    *,
    key_columns: Sequence[str] = DEFAULT_KEY_COLUMNS,
) -> None:
    """Validate a pandas or polars frame; raise :class:`QualityError` on any failure.

    ``expectations``: :func:`expect` dicts (``{"type": ..., "kwargs": ...}``) and/or
    ``great_expectations.expectations`` objects. ``key_columns``: columns shown first
    (after the failing one) in the sample offending rows.
    """
    failures = validate(df, name, expectations, key_columns=key_columns)
    if failures:
        shape = tuple(df.shape)  # type: ignore[arg-type]
        raise QualityError(
            format_failures(name, failures, len(expectations), shape),
            suite=name,
            failures=failures,
        )
