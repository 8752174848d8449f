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


def test_a_corrupt_or_missing_input_is_one_line_naming_the_file(tmp_path):
    """A truncated Parquet input makes the stage exit 1 with one line naming the file and the
    stage (no polars traceback), before any model is loaded; a missing one likewise."""
    import subprocess
    import sys
    from pathlib import Path

    import polars as pl

    repo = Path(__file__).resolve().parents[1]
    good = tmp_path / "attributions.parquet"
    pl.DataFrame({"layer": list(range(50)), "unit": list(range(50))}).write_parquet(good)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    from mmn.models.planted import save_plant

    save_plant(tmp_path / "plant", None)  # decode's other input (a fresh clone has no data/plant)
    for path, what in ((bad, "not a readable Parquet file"), (tmp_path / "none.parquet", "input does not exist")):
        r = subprocess.run([sys.executable, "-m", "stages.decode", "--attributions", str(path), "--plant",
                            str(tmp_path / "plant"), "--out", str(tmp_path / "out.parquet")], cwd=repo,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 1, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert lines[-1].startswith(f"[decode] error: {path}: {what}"), r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "out.parquet").exists()


def test_read_helpers_raise_data_errors(tmp_path):
    from mmn.errors import DataError
    from mmn.io import read_csv, read_json, read_parquet

    (tmp_path / "x.json").write_text("{not json")
    (tmp_path / "x.csv").write_bytes(b"a,b\n1,2\n3\n\xff\xfe")
    with pytest.raises(DataError, match=r"x\.json: not a readable JSON file"):
        read_json(tmp_path / "x.json")
    with pytest.raises(DataError, match="does not exist"):
        read_csv(tmp_path / "nope.csv")
    with pytest.raises(DataError, match=r"x\.csv: not a readable CSV file"):
        read_csv(tmp_path / "x.csv")
    with pytest.raises(DataError, match=r"x\.json: not a readable Parquet file"):
        read_parquet(tmp_path / "x.json")
