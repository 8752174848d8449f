"""Record which machine and library versions produced the committed results.

    dvc repro && python scripts/record_env.py     # then commit dvc.lock with results-environment.json

Writes ``results-environment.json`` beside ``dvc.lock``: the CPU model and the vector extensions
that choose float kernels, torch's dispatch, the numeric libraries' versions, and the sha256 of
``dvc.lock`` and ``requirements.lock`` it belongs to (tests/test_provenance.py fails when
``dvc.lock`` changed without a new record). A run on another CPU may differ in float low bits
and, at small n, in a borderline test decision; this file tells that apart from a bug.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mmn.io import write_json
from mmn.provenance import environment, sha256_of

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "results-environment.json"


def record() -> dict:
    return {
        "what": "machine and libraries that produced the results pinned in dvc.lock (scripts/record_env.py)",
        "dvc_lock_sha256": sha256_of(REPO / "dvc.lock"),
        "requirements_lock_sha256": sha256_of(REPO / "requirements.lock"),
        **environment(),
    }


def main() -> int:
    rec = record()
    write_json(rec, OUT)
    print(f"wrote {OUT.name}: {rec['cpu_model']}, torch {rec['versions']['torch']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
