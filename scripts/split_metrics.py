"""One-off conversion of full-results metrics files into summary/ + headline metrics/.

Before mmn/headline.py, each stage wrote its full results (CI bounds, per-row n, per-k and
per-category detail) to ``metrics/<name>.json``. This moves each such file's bytes unchanged
to ``summary/<name>.json`` and rewrites ``metrics/<name>.json`` as its headline
(:func:`mmn.headline.headline`, formatted by :func:`mmn.io.write_json`), which is what the
stages write themselves through :func:`mmn.headline.write_metrics`. A metrics file that is
already the headline of its summary file is left alone, so rerunning it is harmless.

    python scripts/split_metrics.py [--root .]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmn.headline import HEADLINE, headline
from mmn.io import atomic_file, write_json


def split(root: Path) -> list[str]:
    done = []
    for name in HEADLINE:
        m, s = root / "metrics" / f"{name}.json", root / "summary" / f"{name}.json"
        if not m.is_file():
            continue
        raw = m.read_bytes()
        obj = json.loads(raw)
        if s.is_file() and obj == headline(name, json.loads(s.read_bytes())):
            continue  # already split
        head = headline(name, obj)  # raises before anything is written when a path is missing
        with atomic_file(s) as tmp:
            tmp.write_bytes(raw)
        write_json(head, m)
        done.append(name)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("."))
    args = ap.parse_args(argv)
    done = split(args.root)
    print(f"split: {', '.join(done) or 'nothing to do'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
