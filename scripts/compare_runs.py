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

``--paired`` (two runs on the same images, e.g. two LMs: ``-S profiles.<name>.lm=...``) adds, per
image, each value the stages average (caption BERTScore, kept fraction, Table 1/2 and IoU
differences to their random controls, ablation at k = 50/100/400, the grad_x_act Spearman;
:mod:`mmn.per_image`) and the paired test of B − A over the images both runs evaluated, with
95% bootstrap CIs. ``--layers NA NB`` (the LMs' depths) adds the top units' relative depth;
``--json F`` writes the comparison, ``--csv F`` the per-image values (metric, image_id, a, b).
Projections of different shapes (LMs of another width) get no weight difference.
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


def _fmt_ci(c: dict | None, key: str = "mean") -> str:
    if c is None:
        return ""
    if c["lo"] is None:
        return f"{c[key]:.3g}"
    return f"{c[key]:.3g} [{c['lo']:.3g}, {c['hi']:.3g}]"


def paired_report(a: Path, b: Path, layers: tuple[int | None, int | None], out_json: Path | None,
                  out_csv: Path | None) -> None:
    """Print (and optionally write) the per-image paired comparison of runs ``a`` and ``b``."""
    from mmn.metrics.stats import format_p
    from mmn.per_image import metrics, paired

    results: dict = {}
    rows: list[dict] = []
    print("\n| per image | A | B | B − A | n |\n| --- | --- | --- | --- | --- |")
    for name, (desc, read) in metrics().items():
        va, vb = read(a, layers[0]), read(b, layers[1])
        if va is None or vb is None:
            why = "no --layers" if name == "relative_depth" else "a stage output is missing in " + " and ".join(
                r for r, v in (("A", va), ("B", vb)) if v is None)
            print(f"| {name} | not computed: {why} | | | |")
            results[name] = {"description": desc, "not_computed": why}
            continue
        r = paired(va, vb)
        results[name] = {"description": desc, **r}
        rows += [{"metric": name, "image_id": i, "a": va[i], "b": vb[i]} for i in sorted(set(va) & set(vb))]
        t = r["b_minus_a"]
        diff = "" if t is None else f"{_fmt_ci(t, 'diff')}, {format_p(t['p'])}"
        print(f"| {name} | {_fmt_ci(r['a'])} | {_fmt_ci(r['b'])} | {diff} | {r['n']} |")
    if out_json is not None:
        out_json.write_text(json.dumps(results, indent=1, sort_keys=True, allow_nan=False) + "\n")
    if out_csv is not None:
        pl.DataFrame(rows, schema={"metric": pl.Utf8, "image_id": pl.Int64, "a": pl.Float64,
                                   "b": pl.Float64}).write_csv(out_csv, float_precision=6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--all", action="store_true", help="every numeric leaf, not only means, diffs and p-values")
    ap.add_argument("--paired", action="store_true", help="per-image paired tests of B - A on the shared images")
    ap.add_argument("--layers", type=int, nargs=2, metavar=("NA", "NB"), default=(None, None),
                    help="the two LMs' layer counts (for the top units' relative depth)")
    ap.add_argument("--json", type=Path, default=None, help="write the paired comparison here")
    ap.add_argument("--csv", type=Path, default=None, help="write the per-image values here")
    args = ap.parse_args()
    wa = load_file(str(args.a / "data/projection/projection.safetensors"))
    wb = load_file(str(args.b / "data/projection/projection.safetensors"))
    ma, mb = (json.loads((r / "data/projection/meta.json").read_text()) for r in (args.a, args.b))
    if all(wa[k].shape == wb[k].shape for k in wa):
        dw = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
        head = f"max |dW| {dw:.3g} (max |W| {float(wa['weight'].abs().max()):.3g})"
    else:
        head = f"shapes differ ({tuple(wa['weight'].shape)} vs {tuple(wb['weight'].shape)}): no weight difference"
    print(f"projection: {head}; best step "
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
    if args.paired:
        paired_report(args.a, args.b, tuple(args.layers), args.json, args.csv)


if __name__ == "__main__":
    main()
