"""mmn.provenance and the committed record of the machine behind dvc.lock."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import torch

from mmn.provenance import KERNEL_FLAGS, cpu_flags, cpu_model, describe, environment

REPO = Path(__file__).resolve().parent.parent


def test_cpu_facts_match_proc_cpuinfo():
    """Independent read: grep over /proc/cpuinfo (Linux machines of this kind)."""
    grep = subprocess.run(["grep", "-m1", "^model name", "/proc/cpuinfo"], capture_output=True, text=True)
    assert cpu_model() == grep.stdout.split(":", 1)[1].strip()
    flags = subprocess.run(["grep", "-m1", "^flags", "/proc/cpuinfo"], capture_output=True, text=True).stdout.split()
    assert cpu_flags() == [f for f in KERNEL_FLAGS if f in flags]


def test_environment_is_stable_and_names_versions():
    a, b = environment(), environment()
    assert a == b  # no timestamps: one machine + one environment -> one record
    assert a["versions"]["torch"] == torch.__version__.split("+")[0]  # dist version, no local tag
    assert a["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert json.loads(json.dumps(a)) == a
    line = describe(a)
    assert a["cpu_model"] in line and a["versions"]["torch"] in line


def test_committed_results_record_belongs_to_dvc_lock():
    """results-environment.json names the machine that produced the committed dvc.lock: it is
    refreshed (scripts/record_env.py) whenever dvc.lock or requirements.lock changes."""
    rec = json.loads((REPO / "results-environment.json").read_text())
    sha = lambda p: hashlib.sha256((REPO / p).read_bytes()).hexdigest()  # noqa: E731
    assert rec["dvc_lock_sha256"] == sha("dvc.lock"), "dvc.lock changed: run scripts/record_env.py"
    assert rec["requirements_lock_sha256"] == sha("requirements.lock"), "requirements.lock changed: rerun dvc repro"
    assert set(environment()) <= set(rec) and rec["cpu_model"]
