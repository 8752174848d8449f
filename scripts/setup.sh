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
# The whole environment comes from requirements.lock (uv pip compile, every package pinned with
# its sha256; regenerate it only with scripts/update-lock.sh). --no-deps: the lock is already the
# complete, resolved set, so pip installs exactly it and nothing the registry serves today.
# torch 2.14.1 + torchvision 0.29.1 are in the lock (timm/open_clip need torchvision, which does
# not import beside a CPU-only torch wheel on these machines); pip takes them from the local disk
# where they lie there. The lock is for CPython 3.11 on Linux x86_64.
python scripts/check_env.py --platform
python -m pip install -q --no-deps --require-hashes -r requirements.lock
python -m pip install -q --no-deps --no-build-isolation -e .
# Installed = locked, pip check clean; stops naming the package otherwise.
python scripts/check_env.py
# DVC: no telemetry, no update checks (also set in .dvc/config).
export DVC_NO_ANALYTICS=1
# Word list for the interpretability filter: SCOWL-derived Debian `wamerican`, a DVC-tracked
# input (data/wordlist/american-english.dvc pins its md5; `dvc pull` also fetches it from a
# remote). Fetched from the Debian archive (no root needed) when absent, checked against the
# pin, and saved into the DVC cache so that `dvc push` can upload it.
WL=data/wordlist/american-english
if [ ! -s "$WL" ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download wamerican >/dev/null 2>&1 && dpkg-deb -x wamerican_*.deb x)
  cp "$tmp/x/usr/share/dict/american-english" "$WL"
  rm -rf "$tmp"
fi
want=$(sed -n 's/^- md5: //p' "$WL.dvc")
have=$(md5sum "$WL" | cut -d' ' -f1)
if [ "$have" = "$want" ]; then
  dvc commit -q -f "$WL.dvc"
else
  echo "mmn: WARNING: $WL (md5 $have) is not the pinned word list (md5 $want): Debian's wamerican" \
       "changed. The filter and ablate stages will rerun with it; 'dvc pull $WL.dvc' from a remote" \
       "restores the pinned one." >&2
fi
echo "mmn: word list $WL ($(wc -l < "$WL") entries)"
# Offline `dvc plots show|diff`: vega, vega-lite and vega-embed (pinned; vega-lite v5 specs as DVC
# writes them) from the npm registry, inlined into the HTML template that .dvc/config names
# (plots.html_template = ../.cache/dvc-plots/offline.html). Generated here, git-ignored.
VEGA_PKGS="vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0"
if command -v npm >/dev/null; then
  if [ ! -s .cache/npm/node_modules/vega-embed/build/vega-embed.min.js ] \
     || [ "$(cat .cache/npm/.mmn-pkgs 2>/dev/null)" != "$VEGA_PKGS" ]; then
    # shellcheck disable=SC2086
    npm install --prefix .cache/npm --no-save --no-audit --no-fund --loglevel=error $VEGA_PKGS >/dev/null \
      && echo "$VEGA_PKGS" > .cache/npm/.mmn-pkgs \
      || echo "mmn: npm install of $VEGA_PKGS failed: no offline dvc plots template" >&2
  fi
  python scripts/build_vega_template.py || true
else
  echo "mmn: npm not found: dvc plots show will have no offline template (install Node.js/npm, rerun)" >&2
fi
# Headless Chromium for the report tests (tests/test_report_browser.py): Debian's package,
# installed only when missing and only as root with apt-get available; otherwise those tests skip.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "mmn: could not install chromium; browser tests will skip" >&2
fi
echo "mmn: environment ready in .venv"
