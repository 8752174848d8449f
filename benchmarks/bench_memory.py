"""Benchmark: peak memory of streaming attribution vs the number of images.

Runs :func:`mmn.neurons.attribution.attribute_captions` (the ``attribute`` stage's
code path: batches of ``--batch-size`` images, one forward + one backward per batch,
each layer cut to its top k by :func:`attribute_topk`, only k rows per image kept,
returned as the stage's DataFrame) on the real embedded models (SmolLM2-135M +
EfficientNet-lite0, 7×7 patches, a seeded random ``Linear(1280, 576)`` projection)
and real images read from disk on demand, once per image count of ``--counts``, each
count in its own fresh subprocess (``_common.run_lockstep`` with a single worker).

For each count it prints the worker's peak RSS (``getrusage``), its peak just before
the run (``RSS ready``: models loaded, captions tokenised, nothing attributed yet),
their difference (``growth``: all that the run added, the autograd graph of one batch
included) and the growth per image. Streaming keeps memory flat: the growth should
not scale with the image count, so the last line compares the growth at the largest
and the smallest count. Every batch gets the same ``--batch-size`` captions (of
different lengths, right-padded), so every batch has the same shape and a larger
count adds images only, not longer sequences.

    python benchmarks/bench_memory.py --counts 4,8,16,32
    python benchmarks/bench_memory.py --smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import (  # shared plumbing of the benchmark scripts, in this folder
    MODELS_LINE,
    add_common_args,
    common_argv,
    image_loader,
    int_list,
    load_average,
    markdown_table,
    print_header,
    run_lockstep,
    serve,
    start_worker,
    texts_and_targets,
)

METHOD = "attribute_captions"
COUNTS = (4, 8, 16, 32)
SMOKE_COUNTS = (2, 4)


def captions_frame(tok, n: int, batch_size: int):
    """A ``captions.parquet``-like frame of ``n`` images: caption ``i % batch_size`` for image ``i``."""
    import polars as pl

    texts, targets = texts_and_targets(tok, batch_size)
    rows = []
    for i in range(n):
        text, target = texts[i % batch_size], targets[i % batch_size]
        rows.append({"image_id": i, "has_noun": True, "caption_token_ids": [*text, target], "target_pos": len(text),
                     "target_token_id": target, "target_token": tok.decode([target])})
    return pl.DataFrame(rows)


def worker(args: argparse.Namespace) -> None:
    from mmn.neurons.attribution import attribute_captions

    plm = start_worker(args)
    load_image, source = image_loader(args.images)
    caps = captions_frame(plm.tokenizer, args.images, args.batch_size)
    kept = {}

    def run(i: int, j: int) -> list[dict]:
        df = attribute_captions(caps.slice(i, j - i), load_image, plm, k=args.k, batch_size=args.batch_size,
                                progress=False)
        kept[i] = df  # kept until the worker ends, as the stage keeps it until it is written
        counts = dict(df.group_by("image_id").len().iter_rows())
        return [{"image_id": int(r), "rows": counts.get(r, 0), "bytes": df.estimated_size() / (j - i)}
                for r in caps["image_id"][i:j].to_list()]

    if args.warmup:  # untimed: one batch, then dropped (moves that batch's allocations into "RSS ready")
        run(0, min(args.batch_size, args.images))
        kept.clear()
    meta = {"method": METHOD, "batch_size": args.batch_size, "source": source}
    serve(run, args.result, meta)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", type=int_list("--counts", 1), default=list(COUNTS),
                   help=f"comma-separated image counts, one fresh process each (default {','.join(map(str, COUNTS))})")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch (default 4, as params.yaml)")
    p.add_argument("--k", type=int, default=100, help="top-k triples kept per image (default 100, as params.yaml)")
    add_common_args(p, (METHOD,))
    p.set_defaults(warmup=False)  # --warmup: one batch before RSS ready is taken (default: growth includes one)
    p.add_argument("--images", type=int, help=argparse.SUPPRESS)  # internal: the worker's count
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny run: counts {','.join(map(str, SMOKE_COUNTS))}, batch 2")
    args = p.parse_args(argv)
    if args.smoke:
        args.counts, args.batch_size = list(SMOKE_COUNTS), 2
    args.counts = sorted(set(args.counts))
    if args.batch_size < 1 or args.k < 1:
        p.error("--batch-size and --k must be >= 1")
    if args.method:
        worker(args)
        return 0

    print_header("memory benchmark: streaming attribution (attribute_captions) vs number of images, "
                 "one fresh process per count", args.threads)
    res = {}
    for n in args.counts:
        fwd = ["--images", str(n), "--batch-size", str(args.batch_size), "--k", str(args.k), *common_argv(args)]
        res[n] = run_lockstep(Path(__file__).resolve(), (METHOD,), fwd, n, n)[METHOD]
    first = res[args.counts[0]]
    print(f"{MODELS_LINE}, seed {args.seed}, fp32")
    print(f"images from {first['source']}, read on demand; batch size {args.batch_size}, k = {args.k}; "
          f"measured: {METHOD} over all images (results kept as the stage's DataFrame)"
          f"{'; RSS ready after an untimed warm-up batch' if args.warmup else '; no warm-up (growth includes one batch)'}")
    print(f"load average after the run: {load_average()}")
    rows, growth = [], {}
    for n in args.counts:
        r = res[n]
        growth[n] = r["peak_rss_mb"] - r["rss_ready_mb"]
        n_rows = sum(x["rows"] for x in r["results"])
        if r["images"] != n or n_rows != n * args.k:
            print(f"error: {n} images gave {r['images']} results and {n_rows} rows (expected {n * args.k})")
            return 1
        rows.append([n, r["batch_size"], n_rows, f"{sum(x['bytes'] for x in r['results']) / 2**20:.2f}",
                     f"{r['seconds']:.2f}", f"{r['images'] / r['seconds']:.3f}",
                     f"{r['rss_ready_mb']:.1f}", f"{r['peak_rss_mb']:.1f}", f"{growth[n]:.1f}",
                     f"{growth[n] * 1024 / n:.0f}"])
    print()
    print(markdown_table(["images", "batch", "rows kept", "result MB", "seconds", "images/s", "RSS ready MB",
                          "peak RSS MB", "growth MB", "growth per image KB"], rows))
    print()
    lo, hi = args.counts[0], args.counts[-1]
    ratio = f"{growth[hi] / growth[lo]:.2f}x" if growth[lo] > 0 else "n/a (no growth at the smallest count)"
    slope = (growth[hi] - growth[lo]) * 1024 / (hi - lo) if hi > lo else 0.0
    print(f"growth ratio ({hi} vs {lo} images, {hi / lo:g}x the images): {ratio}; "
          f"peak RSS ratio {res[hi]['peak_rss_mb'] / res[lo]['peak_rss_mb']:.2f}x; "
          f"marginal growth {slope:.0f} KB per extra image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
