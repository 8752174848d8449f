"""Benchmark: all ablation rows of an image in one forward vs one forward per k.

Runs on the real embedded models (SmolLM2-135M + EfficientNet-lite0, 7×7 patches,
a seeded random ``Linear(1280, 576)`` projection) and real images, and prints, side by
side, images/s and peak RSS of :func:`mmn.neurons.ablation.target_probs` (p(c) with
the top-k units zeroed at the image positions) called, per image,

* ``batched``: once, with one row per k of ``--ks`` (ONE forward per image, as the
  ``ablate`` stage's :func:`mmn.experiments.ablation.ablate_images` batches its rows;
  the stage also has the ``filtered`` and ``random`` kinds and a clean row, 28 rows
  with the default ks: every row costs the same whatever units it zeroes, so ``--ks``
  with repeated values mimics that shape);
* ``per-k``: once per k, with a single row (one forward per k);

after the same per-image unit ranking (one :func:`attribution_maps` pass, ranked by
:func:`unit_scores` / :func:`rank_units`, the ``unfiltered`` kind of the stage).
Each method runs in its own fresh subprocess (this script re-invoked with
``--method``), so its peak RSS is its own; the two processes take turns on the same
images, one image at a time (lockstep, see ``_common.run_lockstep``). The timed
region covers encoding + projection + unit ranking + the ablation forward(s) of every
image (images are read from disk before it); the ablation forwards alone are also
timed (``ablation s``). An untimed warm-up on each method's first image runs first.
The script exits non-zero when the unit rankings differ beyond float noise
(``_common.topk_agree``, ``--tol``: near-tied units may swap when float sums differ in
the low bits) or some p(c) differs by more than
``--atol``; it also prints how many rankings agree exactly.

    python benchmarks/bench_ablate.py --images 8
    python benchmarks/bench_ablate.py --smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import (  # shared plumbing of the benchmark scripts, in this folder
    MODELS_LINE,
    add_common_args,
    common_argv,
    int_list,
    load_average,
    load_images,
    markdown_table,
    print_header,
    run_lockstep,
    seq_lens,
    serve,
    start_worker,
    texts_and_targets,
    topk_agree,
)

METHODS = ("batched", "per-k")
KS = (0, 50, 100, 200, 400, 800, 1600, 3200, 6400)  # params.yaml ablate.ks
SMOKE_KS = (0, 100, 1600)
ATOL = 1e-5
TOL = 1e-3  # unit scores, relative to the largest; see _common.topk_agree


def ablate_one(plm, image, text: list[int], target: int, ks: list[int], batched: bool) -> dict:
    """Rank units by one attribution pass, then p(c) with the top k zeroed, for every k."""
    import torch

    from mmn.neurons.ablation import rank_units, target_probs, unit_masks
    from mmn.neurons.attribution import attribution_maps
    from mmn.neurons.scoring import unit_scores

    ad = plm.adapter
    with torch.no_grad():
        soft = plm.image_soft_tokens([image])
    _, a, grad = attribution_maps(plm, soft, [text], [target])
    scores = unit_scores(a[0], grad[0])
    order = rank_units(scores)[: max(ks)]
    del a, grad
    masks = unit_masks([order[:k] for k in ks], ad.n_layers, ad.d_mlp)
    t0 = time.perf_counter()
    if batched:
        p = target_probs(plm, soft, text, target, masks)
    else:
        p = torch.cat([target_probs(plm, soft, text, target, masks[:, i : i + 1]) for i in range(len(ks))])
    t_ablate = time.perf_counter() - t0
    return {"p": p.tolist(), "ranking": [list(u) for u in order],
            "scores": [float(scores[l, u]) for l, u in order],
            "forwards": 1 if batched else len(ks), "ablation_seconds": t_ablate}


def worker(args: argparse.Namespace) -> None:
    plm = start_worker(args)
    images, source = load_images(args.images)
    texts, targets = texts_and_targets(plm.tokenizer, args.images)
    batched = args.method == "batched"

    def run(i: int, j: int) -> list[dict]:
        return [ablate_one(plm, images[n], texts[n], targets[n], args.ks, batched) for n in range(i, j)]

    if args.warmup:  # untimed: the method's first image (first calls at a new shape are slow)
        run(0, 1)
    meta = {"method": args.method, "rows": len(args.ks) if batched else 1, "source": source,
            "seq_lens": seq_lens(plm, texts)}
    serve(run, args.result, meta)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8, help="number of images (default 8)")
    p.add_argument("--ks", type=int_list("--ks", 0), default=list(KS),
                   help=f"comma-separated numbers of top units to ablate, one row each "
                        f"(default {','.join(map(str, KS))}, as params.yaml ablate.ks)")
    p.add_argument("--atol", type=float, default=ATOL,
                   help=f"largest |p_batched(c) - p_per-k(c)| still counted as equal (default {ATOL:g})")
    p.add_argument("--tol", type=float, default=TOL,
                   help=f"float noise allowed between the rankings' unit scores, relative (default {TOL:g})")
    add_common_args(p, METHODS)
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny run: 2 images, ks {','.join(map(str, SMOKE_KS))}, no warm-up")
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.ks, args.warmup = 2, list(SMOKE_KS), False
    if args.images < 1:
        p.error("--images must be >= 1")
    if args.method:
        worker(args)
        return 0

    print_header("ablation benchmark: batched (one forward per image, one row per k) vs per-k (one forward per k)",
                 args.threads)
    fwd = ["--images", str(args.images), "--ks", ",".join(map(str, args.ks)), *common_argv(args)]
    res = run_lockstep(Path(__file__).resolve(), METHODS, fwd, args.images, 1)
    bat, one = res["batched"], res["per-k"]
    print(f"{MODELS_LINE}, seed {args.seed}, fp32")
    print(f"images: {bat['images']} from {bat['source']}; sequence lengths {sorted(set(bat['seq_lens']))}; "
          f"ks = {','.join(map(str, args.ks))} (top-k units by max-over-patches g, zeroed at the image positions); "
          f"timed: encode + project + rank units (1 attribution pass) + ablation forward(s)"
          f"{' (after an untimed warm-up of each method on its first image)' if args.warmup else ' (no warm-up)'}")
    print(f"load average after the run: {load_average()}")
    rows = []
    for m in METHODS:
        r = res[m]
        rows.append([m, r["images"], r["rows"], sum(x["forwards"] for x in r["results"]), f"{r['seconds']:.2f}",
                     f"{r['images'] / r['seconds']:.3f}", f"{sum(x['ablation_seconds'] for x in r['results']):.2f}",
                     f"{r['cpu_seconds']:.1f}", f"{r['load_1m']:.2f}",
                     f"{r['rss_ready_mb']:.0f}", f"{r['peak_rss_mb']:.0f}"])
    print()
    print(markdown_table(["method", "images", "rows", "forwards", "seconds", "images/s", "ablation s", "CPU s",
                          "load 1m", "RSS ready MB", "peak RSS MB"], rows))
    print()
    abl = {m: sum(x["ablation_seconds"] for x in res[m]["results"]) for m in METHODS}
    print(f"speed ratio (batched / per-k images/s): {one['seconds'] / bat['seconds']:.2f}x "
          f"(CPU time ratio {one['cpu_seconds'] / bat['cpu_seconds']:.2f}x; "
          f"ablation forwards alone {abl['per-k'] / abl['batched']:.2f}x)")
    n_exact = sum(x["ranking"] == y["ranking"] for x, y in zip(bat["results"], one["results"]))
    n_rank = sum(not topk_agree(list(zip(x["ranking"], x["scores"])), list(zip(y["ranking"], y["scores"])), args.tol)
                 for x, y in zip(bat["results"], one["results"]))
    pairs = [(u, v) for x, y in zip(bat["results"], one["results"]) for u, v in zip(x["p"], y["p"])]
    dp = max(abs(u - v) for u, v in pairs)
    rel = max(abs(u - v) / max(abs(u), 1e-30) for u, v in pairs)
    n_far = sum(abs(u - v) > args.atol for u, v in pairs)
    for i, x in enumerate(bat["results"][:2]):
        print(f"p(c) image {i}: " + ", ".join(f"k={k}: {v:.4g}" for k, v in zip(args.ks, x["p"])))
    print(f"unit rankings: {n_exact} of {bat['images']} images identical, "
          f"{n_rank} differ beyond float noise (tol {args.tol:g}); "
          f"max |dp(c)| over {len(pairs)} (image, k) = {dp:.2e}, {n_far} beyond {args.atol:g}, "
          f"max |dp(c)| / p(c) = {rel:.2e}")
    if n_rank or n_far:
        print("same p(c): no")
        return 1
    print("same p(c): yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
