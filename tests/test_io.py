"""Atomic outputs: nothing with the final name until the write completed; debris cleared."""

from __future__ import annotations

import os
import stat

import pytest

from mmn.io import atomic_dir, atomic_file


def test_atomic_file_keeps_old_content_on_error(tmp_path):
    out = tmp_path / "x.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_atomic_file_mode_and_debris(tmp_path):
    out = tmp_path / "x.txt"
    debris = tmp_path / ".tmp-x.txt-abc"
    debris.write_text("left by a SIGKILLed run")
    with atomic_file(out) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new" and not debris.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_atomic_dir_replaces_whole_dir(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "stale").write_text("s")
    (tmp_path / ".old-d-999").mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("a")
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    with pytest.raises(ValueError):
        with atomic_dir(out) as tmp:
            (tmp / "b").write_text("b")
            raise ValueError
    assert sorted(p.name for p in out.iterdir()) == ["a"]


def test_atomic_dir_replaces_a_symlink_and_keeps_its_target(tmp_path):
    """``out`` as a symlink to a folder (e.g. data/coco linked elsewhere): the link is replaced
    by the new folder, the folder it pointed to is left alone."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("k")
    out = tmp_path / "d"
    out.symlink_to(target, target_is_directory=True)
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("a")
    assert not out.is_symlink() and sorted(p.name for p in out.iterdir()) == ["a"]
    assert (target / "keep").read_text() == "k"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "elsewhere"]
