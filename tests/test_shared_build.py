"""The suite's shared DAG is built once per session across pytest-xdist workers
(helpers.shared.build_once under a file lock), and the first test that needs it runs first
(conftest's collection hook), so one worker builds it while the other runs the rest."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import DAG_FIXTURE, pytest_collection_modifyitems
from helpers.shared import build_once, session_root

TESTS = Path(__file__).resolve().parent

_BUILDER = """
import sys, time
from pathlib import Path
from helpers.shared import build_once
root, log = Path(sys.argv[1]), Path(sys.argv[2])
def build(folder):
    with log.open("a") as f:
        f.write("built\\n")
    time.sleep(1.0)  # long enough for the other process to reach the lock
    (folder / "out.txt").write_text("x")
    return {"n": 1}
folder, rec = build_once(root, "dag", build)
print(folder, rec["n"], (folder / "out.txt").read_text())
"""


def test_two_processes_build_once_and_share_the_result(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    log = tmp_path / "builds.log"
    procs = [subprocess.Popen([sys.executable, "-c", _BUILDER, str(tmp_path / "root"), str(log)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert log.read_text() == "built\n"  # one build, not two
    assert outs[0] == outs[1] == [str(tmp_path / "root" / "dag"), "1", "x"]


def test_a_build_that_raised_is_built_again_from_an_empty_folder(tmp_path):
    calls = []

    def failing(folder: Path) -> dict:
        (folder / "half.txt").write_text("partial")
        raise RuntimeError("killed")

    def good(folder: Path) -> dict:
        calls.append(sorted(p.name for p in folder.iterdir()))
        return {"ok": True}

    with pytest.raises(RuntimeError):
        build_once(tmp_path, "dag", failing)
    assert not (tmp_path / "dag.json").exists()
    assert build_once(tmp_path, "dag", good) == (tmp_path / "dag", {"ok": True})
    assert build_once(tmp_path, "dag", good)[1] == {"ok": True}
    assert calls == [[]]  # built once more, from an empty folder; then reused


def test_session_root_is_shared_by_workers_only(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    assert session_root(tmp_path_factory, "master") == base
    assert session_root(tmp_path_factory, "gw1") == base.parent


class _Item:
    def __init__(self, name: str, fixturenames: list[str]):
        self.name, self.fixturenames = name, fixturenames


def test_the_first_dag_test_goes_first_and_the_other_dag_tests_last():
    items = [_Item("a", ["tmp_path"]), _Item("b", ["tiny_adapters"]), _Item("c", ["pipeline_repo", DAG_FIXTURE]),
             _Item("d", [DAG_FIXTURE]), _Item("e", []), _Item("f", [DAG_FIXTURE]), _Item("g", [])]
    pytest_collection_modifyitems(None, items)
    assert [i.name for i in items] == ["c", "a", "b", "e", "g", "d", "f"]
    none = [_Item("a", []), _Item("b", [])]
    pytest_collection_modifyitems(None, none)
    assert [i.name for i in none] == ["a", "b"]


def test_pytest_config_runs_two_workers():
    opts = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    assert opts.split()[:2] == ["-n", "2"]
