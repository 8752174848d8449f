"""The DVC pipeline in a temporary copy of the repository: copy it, set params, run commands.

Imports neither conftest nor a test module: tests import it as ``helpers.pipeline``,
``python -m scripts.run_coco_mini_dag`` as ``tests.helpers.pipeline``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]

STAGES = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])  # dvc.yaml's stage order


def env() -> dict:
    """This process's environment with this interpreter's bin/ (dvc, torchrun) first on PATH."""
    out = dict(os.environ)
    out["PATH"] = f"{Path(sys.executable).parent}:{out['PATH']}"
    out["DVC_NO_ANALYTICS"] = "1"
    return out


_default_env = env  # `run`'s parameter `env` shadows the function


def run(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 1500) -> subprocess.CompletedProcess:
    """Run ``args`` in ``cwd`` (environment: ``env``, else :func:`env`'s), capturing text output."""
    return subprocess.run(args, cwd=cwd, env=env or _default_env(), capture_output=True, text=True, timeout=timeout)


def copy_repo(dst: Path) -> Path:
    """Copy the repository's git-listed files (tracked and untracked, not ignored) and the word list
    into ``dst``, and make it a git repository of one commit with the word list in its DVC cache.

    An existing copy (an earlier, interrupted run) is refreshed in place: the code is updated,
    but its ``dvc.lock``, its stage outputs (``data/``, ``metrics/``, ``summary/``, DVC cache) and
    ``.cache`` (feature store, training checkpoint) stay, so ``dvc repro`` there reruns only the
    stages whose code, params or inputs changed or that had not finished. (Stages with
    ``cache: false`` metrics are not in DVC's run cache: their record is dvc.lock alone.)"""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    refresh = (dst / ".git").is_dir()
    for f in files:
        src = REPO / f
        if refresh and (f == "dvc.lock" or f.startswith(("data/", "metrics/", "summary/"))) and (dst / f).exists():
            continue  # the copy's own results
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    (dst / ".cache").mkdir(exist_ok=True)
    wordlist = "data/wordlist/american-english"  # DVC-tracked input, git-ignored (scripts/setup.sh)
    shutil.copy2(REPO / wordlist, dst / wordlist)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "copy"],
                ["dvc", "commit", "-q", "-f", f"{wordlist}.dvc"]):  # into the copy's cache, as setup.sh does
        subprocess.run(cmd, cwd=dst, check=True, capture_output=True, env=env())
    return dst


def copy_reproduced(src: Path, dst: Path) -> Path:
    """A copy of an already reproduced repository ``src`` (git history, DVC cache, outputs and
    ``dvc.lock``; not ``.dvc/tmp``, DVC's locks and state), so a test can change it freely."""
    def skip(folder: str, names: list[str]) -> list[str]:
        return ["tmp"] if Path(folder) == src / ".dvc" else []

    shutil.copytree(src, dst, symlinks=True, ignore=skip)
    return dst


def small_params(repo: Path, **overrides) -> None:
    """Rewrite ``repo``'s params.yaml for a small, fast run, then apply dotted ``overrides``."""
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["projection"]["train"].update(max_steps=4, batch_size=4, views=2, warmup_steps=1, eval_every=2)
    p["caption"]["max_new_tokens"] = 10
    p["attribute"]["k"] = 25
    p["score"]["random_draws"] = 2
    p["ablate"]["ks"] = [0, 10, 100]
    p["attribute"]["ig_steps"] = 2  # per-layer IG: steps x 30 layers path rows per image
    p["compare"].update(candidates=8, precision_k=4, max_images=3, sample=8)
    p["plot"].update(cards=3, images=4)  # fewer figures: matplotlib is most of the plot stage
    p["controls"].update(cascade=[1, 2], max_images=3)  # one attribution per step and image
    set_keys(p, overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def set_keys(p: dict, overrides: dict) -> None:
    """Set dotted ``overrides`` (``{"a.b.c": value}``) in the params dict ``p``."""
    for path, value in overrides.items():
        node = p
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value


def ran(stdout: str) -> set[str]:
    """The stages a ``dvc repro``/``dvc exp run`` output says it ran."""
    return {s for s in STAGES if f"Running stage '{s}'" in stdout}
