"""The suite runs on two xdist workers; every test that needs the session's reproduced DAG must
share one worker, or each worker would run the whole DAG again (conftest's collection hook)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from conftest import DAG_GROUP, pytest_collection_modifyitems

REPO = Path(__file__).resolve().parent.parent


class _Item:
    def __init__(self, fixturenames: list[str]):
        self.fixturenames = fixturenames
        self.marks: list[pytest.Mark] = []

    def add_marker(self, mark) -> None:
        self.marks.append(mark.mark)


def test_tests_on_the_reproduced_dag_share_one_group_and_no_other_does():
    direct = _Item(["reproduced_pipeline"])
    through = _Item(["tmp_path", "pipeline_repo", "reproduced_pipeline"])  # a fixture built on it
    other = _Item(["tmp_path", "tiny_adapters"])
    pytest_collection_modifyitems(None, [direct, through, other])
    for item in (direct, through):
        assert [(m.name, m.args) for m in item.marks] == [("xdist_group", (DAG_GROUP,))]
    assert other.marks == []


def test_the_collected_dag_tests_carry_the_group(request):
    """On the real collection: every collected test that uses the DAG has the group's marker."""
    dag = [i for i in request.session.items if "reproduced_pipeline" in i.fixturenames]
    for item in dag:
        assert any(m.args == (DAG_GROUP,) for m in item.iter_markers("xdist_group")), item.nodeid


def test_pytest_config_groups_by_xdist_group():
    opts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    assert "--dist loadgroup" in opts  # without it xdist ignores the groups
