"""Shared plumbing for the stage entrypoints: error reporting and logging."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable

import click

from mmn.errors import MMNError, StageError
from mmn.stage_params import reset_active_stage, set_active_stage

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


__all__ = ["StageError", "log", "stage_main"]


def log(stage: str, msg: str) -> None:
    click.echo(f"[{stage}] {msg}", err=True)


def stage_main(name: str) -> Callable:
    """Decorator: run the stage body, turn expected errors into ``error: ...`` + exit 1.

    Expected errors are :class:`mmn.errors.MMNError` (and ``FileNotFoundError``: an input
    path given on the command line that does not exist). While the body runs, ``name`` is
    the active stage of :mod:`mmn.stage_params`: :func:`mmn.params.load_params` then
    returns a view that refuses params keys the stage does not declare.

    ``PYTHONHASHSEED`` is not set here; the caption stage pins it in its ``cmd`` in dvc.yaml
    as a guard (BERTScore batching no longer follows set order).
    """

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            token = set_active_stage(name)
            try:
                result = fn(*args, **kwargs)
            except (MMNError, FileNotFoundError) as err:
                click.echo(f"[{name}] error: {err}", err=True)
                sys.exit(1)
            finally:
                reset_active_stage(token)
            log(name, f"done in {time.perf_counter() - t0:.1f} s")
            return result

        return wrapper

    return deco
