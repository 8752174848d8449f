"""Live training curves with DVCLive, the DVC ecosystem's logger (stage ``load_projection``).

:class:`LiveLog` is the ``log(name, step, value)`` callback of
:func:`mmn.projection_training.train_projection`: every value goes to
``<dir>/plots/metrics/<name>.tsv`` (``dvc plots show``) as it is logged, and ``<dir>/metrics.json``
holds the latest of each (the training's row in ``dvc exp show``) after every evaluation.

Gotchas:

* Written in place while training runs, so that a long training can be watched (``dvc plots
  show``, ``cat <dir>/metrics.json``): the one stage output that is not written atomically; a
  failed stage's log is not committed to dvc.lock.
* ``save_dvc_exp=False, dvcyaml=None``: DVC's own pipeline declares the files (dvc.yaml); DVCLive
  neither creates experiments nor edits dvc.yaml. A DVC Studio token, when a user has one, makes
  DVCLive post live updates; nothing is sent otherwise.
* A resumed training replays its logged values first (train_projection), so the log is
  complete and equal to an uninterrupted run's, timestamps aside.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl

__all__ = ["LiveLog", "empty_live", "read_curves"]


class LiveLog:
    """``log(name, step, value)`` into a fresh DVCLive folder ``dir`` (removed first)."""

    def __init__(self, dir: Path | str):
        from dvclive import Live

        shutil.rmtree(dir, ignore_errors=True)
        self.live = Live(dir=str(dir), resume=False, report=None, save_dvc_exp=False, dvcyaml=None,
                         monitor_system=False)

    def __call__(self, name: str, step: int, value: float) -> None:
        self.live.step = int(step)
        self.live.log_metric(name, float(value))
        if name.startswith("val/"):
            self.live.make_summary()

    def close(self) -> None:
        self.live.make_summary()
        self.live.end()


def empty_live(dir: Path | str) -> None:
    """The DVCLive folder of a stage that trained nothing (a loaded LiMBeR projection): ``{}`` and no curves."""
    shutil.rmtree(dir, ignore_errors=True)
    (Path(dir) / "plots" / "metrics").mkdir(parents=True)
    (Path(dir) / "metrics.json").write_text("{}\n")


def read_curves(plots: Path | str) -> pl.DataFrame | None:
    """``step, train_loss, val_loss`` (null where a step has no such value) from a DVCLive ``plots``
    folder; None when nothing was logged."""
    frames = []
    for split in ("train", "val"):
        tsv = Path(plots) / "metrics" / split / "loss.tsv"
        if tsv.is_file():
            df = pl.read_csv(tsv, separator="\t").select(pl.col("step").cast(pl.Int64),
                                                         pl.col("loss").cast(pl.Float64).alias(f"{split}_loss"))
            frames.append(df)
    if not frames:
        return None
    out = frames[0]
    for df in frames[1:]:
        out = out.join(df, on="step", how="full", coalesce=True)
    for col in ("train_loss", "val_loss"):
        if col not in out.columns:
            out = out.with_columns(pl.lit(None, dtype=pl.Float64).alias(col))
    return out.sort("step").select("step", "train_loss", "val_loss")
