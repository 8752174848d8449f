"""The two download stages run in-process on a copy of params.yaml (tests of the training layouts)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from helpers.pipeline import REPO, set_keys
from mmn.data.split import SPLIT_FILE
from stages import download_coco as stage_coco
from stages import download_train as stage_train


class Run:
    """download_coco then download_train in ``root`` with a modified params.yaml."""

    def __init__(self, root: Path, **over) -> None:
        self.root = root
        raw = yaml.safe_load((REPO / "params.yaml").read_text())
        set_keys(raw, over)
        self.params = root / "params.yaml"
        root.mkdir(parents=True, exist_ok=True)
        self.params.write_text(yaml.safe_dump(raw, sort_keys=False))
        self.eval_dir, self.train_dir, self.cache = root / "data/coco", root / "data/coco_train", root / "cache"

    def coco(self):
        return self._invoke(stage_coco.main, ["--out", str(self.eval_dir)])

    def train(self):
        return self._invoke(stage_train.main, ["--eval", str(self.eval_dir), "--out", str(self.train_dir)])

    def _invoke(self, cmd, args: list[str]):
        return CliRunner().invoke(cmd, ["--params", str(self.params), "--cache", str(self.cache), *args])

    def split_info(self) -> dict:
        return json.loads((self.train_dir / SPLIT_FILE).read_text())


def ok(r) -> str:
    """The command's output; fails the test (showing the output) unless it exited 0."""
    assert r.exit_code == 0, r.output
    return r.output
