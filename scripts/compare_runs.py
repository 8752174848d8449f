"""How far two runs of the pipeline differ: the projection, the captions and every headline metric.

For the stability checks of docs/stability.md (another thread count, another machine, another seed,
``projection.train.dtype``): run ``dvc repro`` in two copies of the repository, then

    python scripts/compare_runs.py RUN_A RUN_B [--all]

prints the projection's largest weight difference and best step, how many captions (and
target nouns) are identical, and, for each number in the full results ``summary/*.json`` (each
``mean`` of a CI, each ``diff``/``p`` of a comparison), both values and their difference. A run
made before summary/ existed (its ``metrics/*.json`` then held the full results) is read from
metrics/. ``--all`` lists every numeric leaf, CI bounds and counts included. Exit status 0; it
only reports.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl
from safetensors.torch import load_file

from mmn.run_metrics import flatten


def metrics(run: Path) -> dict[str, float]:
    """Every numeric leaf of the run's full results, keyed ``<file>:<dotted key>``."""
    out: dict[str, float] = {}
    folder = run / "summary" if (run / "summary").is_dir() else run / "metrics"
    for f in sorted(folder.glob("*.json")):
        out.update({f"{f.stem}:{k}": v for k, v in flatten(json.loads(f.read_text())).items()})
    return out


def _headline(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last in ("mean", "diff", "p", "D") or "." not in key.split(":", 1)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--all", action="store_true", help="every numeric leaf, not only means, diffs and p-values")
    args = ap.parse_args()
    wa = load_file(str(args.a / "data/projection/projection.safetensors"))
    wb = load_file(str(args.b / "data/projection/projection.safetensors"))
    dw = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    ma, mb = (json.loads((r / "data/projection/meta.json").read_text()) for r in (args.a, args.b))
    print(f"projection: max |dW| {dw:.3g} (max |W| {float(wa['weight'].abs().max()):.3g}); best step "
          f"{ma.get('best_step')} vs {mb.get('best_step')}; best val loss {ma.get('best_val_loss')} vs "
          f"{mb.get('best_val_loss')}")
    ca, cb = (pl.read_parquet(r / "data/captions.parquet").sort("image_id") for r in (args.a, args.b))
    same = int((ca["caption"] == cb["caption"]).sum())
    nouns = int((ca["noun"].fill_null("") == cb["noun"].fill_null("")).sum())
    print(f"captions identical: {same}/{ca.height}; target nouns identical: {nouns}/{ca.height}")
    for a, b in zip(ca.iter_rows(named=True), cb.iter_rows(named=True), strict=True):
        if a["caption"] != b["caption"]:
            print(f"  {a['image_id']}: {a['caption']!r}\n  {' ' * len(str(a['image_id']))}  {b['caption']!r}")
    va, vb = metrics(args.a), metrics(args.b)
    print("\n| metric | A | B | B - A |\n| --- | --- | --- | --- |")
    for k in sorted(set(va) | set(vb)):
        if not (args.all or _headline(k)):
            continue
        x, y = va.get(k), vb.get(k)
        d = "" if x is None or y is None else f"{y - x:+.4g}"
        print(f"| {k} | {'' if x is None else f'{x:.4g}'} | {'' if y is None else f'{y:.4g}'} | {d} |")


if __name__ == "__main__":
    main()
