"""Stage I/O. Outputs are atomic: written to a temp name in the same directory, then
``os.replace``d, so a stage killed half-way leaves only ``.tmp-*`` debris, never a file with
the final name that DVC or the next stage would accept. Inputs are read through
:func:`read_parquet`, :func:`read_csv` and :func:`read_json`, which turn a missing or
corrupt file into a :class:`~mmn.errors.DataError` naming it (one line, exit 1 in a stage)
instead of a reader's traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl

from mmn.errors import DataError

_UMASK = os.umask(0)
os.umask(_UMASK)


def _clear_debris(path: Path) -> None:
    """Remove ``.tmp-<name>-*`` / ``.old-<name>-*`` left by a killed earlier run."""
    for stale in path.parent.glob(f".tmp-{path.name}-*"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    for stale in path.parent.glob(f".old-{path.name}-*"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temp path; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_debris(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temp directory; on success it replaces directory ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_debris(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp creates 0700
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".old-{path.name}-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_parquet(df: pl.DataFrame, path: Path | str) -> None:
    """Deterministic Parquet (no statistics timestamps; fixed compression)."""
    with atomic_file(path) as tmp:
        df.write_parquet(tmp, compression="zstd", statistics=True)


def write_json(obj: object, path: Path | str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _unreadable(path: Path, kind: str, err: Exception) -> DataError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DataError(f"{path}: not a readable {kind} file ({first}); rerun the stage that writes it "
                     f"(dvc repro) or restore it (dvc checkout)")


def _existing(path: Path | str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file does not exist; run the stage that writes it first (dvc repro)")
    return path


def read_parquet(path: Path | str) -> pl.DataFrame:
    """A stage input table; a missing or corrupt file is a :class:`DataError` naming it."""
    path = _existing(path)
    try:
        return pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise _unreadable(path, "Parquet", e) from None


def read_csv(path: Path | str, **kwargs) -> pl.DataFrame:
    """A stage input CSV (``kwargs`` go to :func:`polars.read_csv`); errors as :func:`read_parquet`."""
    path = _existing(path)
    try:
        return pl.read_csv(path, **kwargs)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise _unreadable(path, "CSV", e) from None


def read_json(path: Path | str) -> object:
    """A stage input JSON file; errors as :func:`read_parquet`."""
    path = _existing(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise _unreadable(path, "JSON", e) from None
