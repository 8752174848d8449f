"""Shared plumbing for the stage entrypoints: error reporting and logging."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable

import click

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


class StageError(RuntimeError):
    """An error a stage reports as one clear line (no traceback)."""


def _expected_errors() -> tuple[type[BaseException], ...]:
    from mmn.data.layout import LayoutError
    from mmn.models.projection import ProjectionError
    from mmn.params import ParamsError

    errs: list[type[BaseException]] = [StageError, ParamsError, LayoutError, ProjectionError, FileNotFoundError]
    try:
        from mmn.quality import QualityError

        errs.append(QualityError)
    except ImportError:  # pragma: no cover - quality package always present
        pass
    try:
        from mmn.metrics.bertscore import BertScoreUnavailable
        from mmn.metrics.clipscore import ClipUnavailable

        errs += [ClipUnavailable, BertScoreUnavailable]
    except ImportError:  # pragma: no cover
        pass
    try:
        from mmn.models.lm import ModelLoadError

        errs.append(ModelLoadError)
    except ImportError:  # pragma: no cover - transformers always present
        pass
    try:
        from mmn.data.coco import CocoDownloadError

        errs.append(CocoDownloadError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


def log(stage: str, msg: str) -> None:
    click.echo(f"[{stage}] {msg}", err=True)


def _fixed_hash_seed() -> None:
    """Re-exec once with ``PYTHONHASHSEED=0`` so set/dict-of-str ordering is the same in
    every run (bert_score orders sentences through a set; without this, batch makeup and
    so the last float bits of BERTScore change from run to run)."""
    if os.environ.get("PYTHONHASHSEED") == "0" or "WORLD_SIZE" in os.environ:
        return
    argv = getattr(sys, "orig_argv", None)
    if argv:
        os.execve(sys.executable, [sys.executable, *argv[1:]], {**os.environ, "PYTHONHASHSEED": "0"})


def stage_main(name: str) -> Callable:
    """Decorator: run the stage body, turn expected errors into ``error: ...`` + exit 1."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            _fixed_hash_seed()
            t0 = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            except _expected_errors() as err:
                click.echo(f"[{name}] error: {err}", err=True)
                sys.exit(1)
            log(name, f"done in {time.perf_counter() - t0:.1f} s")
            return result

        return wrapper

    return deco
