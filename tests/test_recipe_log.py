"""scripts/run_coco_mini_dag.py's live log: a one-stage DVC repo whose command prints a stage
runner's lines; the log holds every line as written, the echo only the "done in", WARNING and
error lines, and the exit code is the command's."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from helpers.pipeline import env

sys.path.insert(0, str(REPO))  # `scripts` as `python -m scripts.run_coco_mini_dag` finds it
from scripts.run_coco_mini_dag import repro_live  # noqa: E402


@pytest.mark.parametrize("code", [0, 3])
def test_repro_log_is_written_as_it_comes_and_keeps_the_exit_code(tmp_path, capsys, code):
    repo = tmp_path / "repo"
    repo.mkdir()
    lines = ["[caption] loading", "[caption] WARNING: own vs shuffled not significant", "[caption] done in 1.5 s"]
    (repo / "stage.py").write_text("".join(f"print({ln!r})\n" for ln in lines) + f"raise SystemExit({code})\n")
    (repo / "dvc.yaml").write_text(f"stages:\n  caption:\n    cmd: {sys.executable} stage.py\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True, env=env())
    got, out = repro_live(repo, tmp_path / "repro.log")
    assert (got == 0) == (code == 0)  # a failed stage command: dvc repro exits non-zero (255)
    log = (tmp_path / "repro.log").read_text()
    assert log == out and all(ln in log for ln in lines)
    echoed = [ln.split(" ", 1)[1] for ln in capsys.readouterr().out.splitlines()]
    want = lines[1:]
    assert echoed[: len(want)] == want
    if code:
        assert any("error" in ln.lower() for ln in echoed[len(want):])  # DVC's failure line is echoed too
    else:
        assert echoed == want


def test_a_refreshed_copy_keeps_its_results_and_takes_the_new_code(tmp_path):
    """Rerunning the recipe on the same DIR: copy_repo updates the code but keeps the copy's
    dvc.lock and stage outputs (else DVC would rerun every finished stage: stages with
    ``cache: false`` metrics are not in its run cache)."""
    from helpers.pipeline import copy_repo

    dst = copy_repo(tmp_path / "repo")
    assert (dst / "dvc.lock").read_bytes() == (REPO / "dvc.lock").read_bytes()
    (dst / "dvc.lock").write_text("# the copy's own lock\n")
    (dst / "metrics" / "captions.json").write_text('{"own": 1}\n')
    (dst / "stages" / "caption.py").write_text("# stale code\n")
    copy_repo(dst)
    assert (dst / "dvc.lock").read_text() == "# the copy's own lock\n"
    assert (dst / "metrics" / "captions.json").read_text() == '{"own": 1}\n'
    assert (dst / "stages" / "caption.py").read_bytes() == (REPO / "stages" / "caption.py").read_bytes()


def test_a_mirror_serves_on_the_port_it_is_given_again_after_closing(tmp_path):
    """The recipe's continuation keeps its mirrors' URLs: serve() binds the port it is given,
    and the same port again once the first server has closed."""
    import socket
    import urllib.request

    from coco_server import serve

    (tmp_path / "a.txt").write_text("hello")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for _ in range(2):
        with serve(tmp_path, port) as httpd:
            assert httpd.server_address[1] == port
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/a.txt", timeout=10) as r:
                assert r.read() == b"hello"
