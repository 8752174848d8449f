"""Build something once per test session, however many pytest-xdist workers need it.

A ``scope="session"`` fixture is built once per *worker* process; the shared end-to-end DAG is
too slow for that. :func:`build_once` builds it under a file lock in a folder every worker of
the session sees (:func:`session_root`): the first worker to ask builds it, the others wait for
it, then all read the same folder and record. Gotchas: the built folder is shared, so tests must
treat it as read-only (take a copy to change it); a build that raised leaves no record, so the
next worker to ask builds again from an empty folder.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock


def session_root(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """A folder shared by every worker of this session: the parent of the workers' base temp
    folders under xdist (``.../pytest-N/popen-gwK``), this process's own base temp without it
    (``worker_id == "master"``: the parent would be shared with other, concurrent sessions)."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


def build_once(root: Path, name: str, build: Callable[[Path], dict]) -> tuple[Path, dict]:
    """``(root/name, record)``: ``build(folder)`` runs once per ``root`` across processes and
    returns a JSON-able record, stored beside the folder (written atomically, after the build)."""
    root.mkdir(parents=True, exist_ok=True)
    folder, record = root / name, root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not record.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a build that raised left a partial folder
            folder.mkdir()
            rec = build(folder)
            tmp = record.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(rec))
            tmp.replace(record)
    return folder, json.loads(record.read_text())
