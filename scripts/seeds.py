"""Run the pipeline under N seeds as DVC experiments and aggregate every headline metric as
mean ± spread across seeds: the honest error bar for the projection's randomness.

    .venv/bin/python scripts/seeds.py --seeds 0 1 2 3 4              # dvc exp run -S seed=N, N = 0..4
    .venv/bin/python scripts/seeds.py --seeds 0 1 2 -S profile=laptop  # extra -S overrides for every run
    .venv/bin/python scripts/seeds.py --aggregate seeds/              # only aggregate earlier runs

For each seed it runs ``dvc exp run --name seed-<N> -S seed=<N> [-S ...]`` (the experiment is
also kept in ``dvc exp show``), then copies the workspace's full results ``summary/*.json`` to
``<out>/seed-<N>/`` (``metrics/*.json`` when there is no summary/: a checkout made before it). ``seed`` drives everything seeded (the training/validation split, view
augmentation and initialisation of the projection, the shuffled-reference baseline, random
units and random baselines), so the spread is that of a full rerun with other random choices,
the same code and data. The aggregate (``<out>/aggregate.json`` and a Markdown table on stdout)
gives, per metric leaf (``file.key.subkey``; CI bounds and counts left out): the number of
seeds, mean, sample standard deviation, min and max across seeds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from mmn.run_metrics import flatten

REPO = Path(__file__).resolve().parents[1]
SKIP_SUFFIXES = (".lo", ".hi", ".n")


def seed_metrics(folder: Path) -> dict[str, float]:
    """Every ``<folder>/<name>.json`` flattened under ``<name>.``."""
    out: dict[str, float] = {}
    for f in sorted(folder.glob("*.json")):
        out.update(flatten(json.loads(f.read_text()), f.stem))
    return out


def aggregate(per_seed: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric: n seeds, mean, sd (sample, n-1; 0 for one seed), min, max."""
    keys = sorted({k for m in per_seed.values() for k in m if not k.endswith(SKIP_SUFFIXES)})
    out = {}
    for k in keys:
        xs = [m[k] for m in per_seed.values() if k in m]
        out[k] = {"n": len(xs), "mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                  "min": min(xs), "max": max(xs)}
    return out


def table(agg: dict[str, dict[str, float]]) -> str:
    rows = ["| metric | seeds | mean ± sd | min .. max |", "|---|---|---|---|"]
    rows += [f"| {k} | {a['n']} | {a['mean']:.4g} ± {a['sd']:.2g} | {a['min']:.4g} .. {a['max']:.4g} |"
             for k, a in agg.items()]
    return "\n".join(rows)


def run_seed(seed: int, overrides: list[str], out: Path) -> None:
    dvc = Path(sys.executable).parent / "dvc"
    cmd = [str(dvc if dvc.exists() else "dvc"), "exp", "run", "--name", f"seed-{seed}", "-S", f"seed={seed}"]
    for o in overrides:
        cmd += ["-S", o]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    dest = out / f"seed-{seed}"
    dest.mkdir(parents=True, exist_ok=True)
    src = REPO / "summary" if (REPO / "summary").is_dir() else REPO / "metrics"
    for f in src.glob("*.json"):
        shutil.copy2(f, dest / f.name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", help="seeds to run")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], help="extra dvc -S override")
    p.add_argument("--out", type=Path, default=REPO / "seeds", help="where each seed's metrics are copied")
    p.add_argument("--aggregate", type=Path, default=None, help="only aggregate the seed-* folders under this")
    args = p.parse_args()
    out = args.aggregate or args.out
    if args.aggregate is None:
        if not args.seeds:
            p.error("give --seeds N [N ...] or --aggregate DIR")
        for s in args.seeds:
            run_seed(s, args.overrides, out)
    folders = sorted(d for d in out.glob("seed-*") if d.is_dir())
    if not folders:
        sys.exit(f"{out}: no seed-* folders with metrics")
    agg = aggregate({d.name: seed_metrics(d) for d in folders})
    (out / "aggregate.json").write_text(json.dumps(agg, indent=2, sort_keys=True) + "\n")
    print(f"{len(folders)} seeds ({', '.join(d.name for d in folders)}); wrote {out / 'aggregate.json'}")
    print(table(agg))


if __name__ == "__main__":
    main()
