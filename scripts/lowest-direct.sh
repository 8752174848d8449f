#!/usr/bin/env bash
# Test the lower bounds: resolve every direct dependency of pyproject.toml to its LOWEST allowed
# version (uv --resolution lowest-direct), install that into a separate venv and run the suite.
#   bash scripts/lowest-direct.sh [VENV_DIR] [pytest args...]     (default VENV_DIR .venv-lowest)
# The lock it resolves is written to VENV_DIR/requirements-lowest.txt. Needs .venv (for uv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-lowest}; shift || true
[ -x .venv/bin/uv ] || { echo "mmn: run scripts/setup.sh first (it installs uv into .venv)" >&2; exit 1; }
python3.11 -m venv "$VENV"
.venv/bin/uv pip compile pyproject.toml --extra dev --extra embedded --generate-hashes \
  --resolution lowest-direct --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --excludes scripts/lock/excludes.txt -o "$VENV/requirements-lowest.txt"
. "$VENV/bin/activate"
python -m pip install -q --no-deps --require-hashes -r "$VENV/requirements-lowest.txt"
python -m pip install -q --no-deps --no-build-isolation -e .
python scripts/check_env.py --lock "$VENV/requirements-lowest.txt"
MMN_LOCK="$VENV/requirements-lowest.txt" python -m pytest "$@"
