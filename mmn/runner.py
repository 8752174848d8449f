"""The stage runner: what every stage repeats, in one place.

A stage file is its docstring and one function decorated with :func:`stage`; the function gets
a :class:`Run` and does the science. The runner, from the stage's declaration in
:mod:`mmn.stage_specs`:

- builds the command-line options (``--params`` and one ``--<name>`` per declared path, the
  declared path as default), so the click defaults are the declaration;
- makes the stage the active one (params reads it did not declare raise), loads the params,
  seeds (``seeded`` stages) and checks that every declared input exists before any model loads;
- reads inputs and writes outputs by name (:meth:`Run.read_parquet`, :meth:`Run.write_json`, ...),
  every write atomic (:mod:`mmn.io`), so a failed stage leaves no half-written output;
- writes the info JSON by one convention (:meth:`Run.write_info`): the stage, the values of the
  params keys it declares, its output paths, then the stage's own description;
- turns every expected failure (:class:`mmn.errors.MMNError`) into one ``[stage] error: ...``
  line naming the file or key, and exit status 1, with no traceback.

Distributed stages (``torchrun``) call :func:`mmn.distributed.distributed` themselves and return
early on ranks other than the main one; only the main rank writes.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from mmn import io
from mmn.errors import DataError, MMNError
from mmn.stage_params import reset_active_stage, set_active_stage
from mmn.stage_specs import ACTIVE_PROFILE, MISSING_HINTS, STAGES, StageSpec

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__all__ = ["Run", "log", "stage"]


def log(stage: str, msg: str) -> None:
    """One progress line on stderr, prefixed with the stage name."""
    click.echo(f"[{stage}] {msg}", err=True)


def flag(name: str) -> str:
    """The command-line option of a declared path: ``categories_out`` -> ``--categories-out``."""
    return "--" + name.replace("_", "-")


def settings(params: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """The values of the declared params ``keys`` (sections as dicts), keyed by their dotted
    path with the active profile's name in place of ``${profile}``."""
    from pydantic import BaseModel

    out: dict[str, Any] = {}
    for key in keys:
        if key == "profile":
            out[key] = params.profile
            continue
        if key.startswith(ACTIVE_PROFILE + "."):
            obj, parts = params.model, key[len(ACTIVE_PROFILE) + 1:].split(".")
            key = f"profiles.{params.profile}." + ".".join(parts)
        else:
            obj, parts = params, key.split(".")
        for p in parts:
            obj = getattr(obj, p)
        out[key] = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj
    return out


@dataclass
class Run:
    """One run of a stage: its params (a checking view), its paths, and the read/write helpers.

    ``paths`` holds every declared input and output (and extra option) by name, as given on
    the command line or by default. Writes are atomic; reads raise :class:`DataError` naming
    the file."""

    spec: StageSpec
    params: Any
    paths: dict[str, Path]
    extra: dict[str, Any] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    def path(self, name: str) -> Path:
        return self.paths[name]

    def log(self, msg: str) -> None:
        log(self.name, msg)

    # -- inputs ------------------------------------------------------------------------------
    def read_parquet(self, name: str) -> Any:
        return io.read_parquet(self.paths[name])

    def read_csv(self, name: str, **kwargs: Any) -> Any:
        return io.read_csv(self.paths[name], **kwargs)

    def read_json(self, name: str) -> Any:
        return io.read_json(self.paths[name])

    # -- outputs -----------------------------------------------------------------------------
    def _wrote(self, name: str) -> Path:
        path = self.paths[name]
        self.written.append(path)
        return path

    def write_parquet(self, name: str, df: Any) -> None:
        io.write_parquet(df, self._wrote(name))

    def write_csv(self, name: str, df: Any, **kwargs: Any) -> None:
        """Polars frame -> CSV, atomically (``kwargs`` go to ``write_csv``, e.g. float_precision)."""
        with io.atomic_file(self._wrote(name)) as tmp:
            df.write_csv(tmp, **kwargs)

    def write_json(self, name: str, obj: object) -> None:
        io.write_json(obj, self._wrote(name))

    def write_metrics(self, full: dict, headline: Callable[[str, dict], dict]) -> None:
        """The stage's numbers: ``full`` (numbers or null; CIs, n, per-k detail) to the ``results``
        output and ``headline(name, full)`` (:func:`mmn.headline.headline`, ``name`` = the declared
        metrics file's stem) to the ``metrics`` output. The headline is built first: a path that
        ``full`` lacks writes neither. (The stage passes ``headline`` so that only the stages that
        write metrics depend on mmn/headline.py.)"""
        head = headline(Path(self.spec.outputs["metrics"]).stem, full)
        self.write_json("results", full)
        self.write_json("metrics", head)

    def write_info(self, description: dict) -> None:
        """The ``info`` output, one convention for every stage: ``stage``, ``settings`` (the value
        of every params key the stage declares), ``outputs`` (name -> path), then the stage's
        own description (definitions, models, counts, reasons; strings allowed)."""
        info = {"stage": self.name,
                "settings": settings(getattr(self.params, "_obj", self.params), self.spec.params),
                "outputs": {k: str(self.paths[k]) for k in self.spec.outputs},
                **description}
        self.write_json("info", info)

    @contextmanager
    def out_dir(self, name: str) -> Iterator[Path]:
        """A temporary folder that replaces the output folder ``name`` only if the block succeeds."""
        with io.atomic_dir(self._wrote(name)) as tmp:
            yield tmp

    def wrote(self) -> str:
        """The paths written so far, for the closing log line."""
        return ", ".join(str(p) for p in self.written)


def _check_inputs(spec: StageSpec, paths: dict[str, Path]) -> None:
    """Every declared input exists, before any model loads (one line naming the first missing one)."""
    missing = [k for k in spec.inputs if not paths[k].exists()]
    if missing:
        k = missing[0]
        more = f"; {len(missing) - 1} more input(s) missing" if len(missing) > 1 else ""
        hint = MISSING_HINTS.get(spec.inputs[k])
        if hint:
            raise DataError(f"{paths[k]}: {hint} (input '{k}' of stage {spec.name}){more}")
        raise DataError(f"{paths[k]}: input does not exist (input '{k}' of stage {spec.name}; `dvc repro "
                        f"{spec.name}` runs the stages that produce it){more}")


def stage(name: str, *, extra: Callable[[Callable], Callable] | None = None
          ) -> Callable[[Callable[[Run], None]], click.Command]:
    """Decorator: turn ``body(run)`` into the click command of stage ``name`` (see module doc).

    ``extra``: a decorator adding stage-specific non-path options (their values in ``run.extra``).
    The command's help is the stage module's docstring."""
    spec = STAGES[name]

    def deco(body: Callable[[Run], None]) -> click.Command:
        def command(params_path: str, **kwargs: Any) -> None:
            t0 = time.perf_counter()
            token = set_active_stage(name)
            try:
                from mmn.params import load_params

                named = {**spec.inputs, **spec.outputs, **spec.options}
                paths = {k: Path(kwargs.pop(k)) for k in named}
                params = load_params(params_path)
                _check_inputs(spec, paths)
                if spec.seeded:
                    from mmn.numerics import seed_everything

                    seed_everything(params.seed)
                body(Run(spec, params, paths, extra=kwargs))
            except (MMNError, FileNotFoundError) as err:
                click.echo(f"[{name}] error: {err}", err=True)
                sys.exit(1)
            finally:
                reset_active_stage(token)
            log(name, f"done in {time.perf_counter() - t0:.1f} s")

        command.__doc__ = sys.modules[body.__module__].__doc__
        if extra is not None:
            command = extra(command)
        for opt, default in reversed([*spec.inputs.items(), *spec.outputs.items(), *spec.options.items()]):
            kind = "input" if opt in spec.inputs else "output" if opt in spec.outputs else "cache, not tracked"
            command = click.option(flag(opt), opt, default=default, show_default=True, type=click.Path(),
                                   help=kind)(command)
        command = click.option("--params", "params_path", default="params.yaml", show_default=True,
                               type=click.Path())(command)
        return click.command(name=name, help=command.__doc__)(command)

    return deco
