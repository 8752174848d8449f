"""Benchmark: batched greedy captioning vs one image at a time.

Runs on the real embedded models (SmolLM2-135M + EfficientNet-lite0, 7×7 patches,
a seeded random ``Linear(1280, 576)`` projection) and real images, and prints, side by
side, captions/s and peak RSS of :meth:`mmn.models.prefix_lm.ImagePrefixLM.generate`
(greedy, KV cache, stop at EOS or any newline token) called

* ``batched``: on batches of ``--batch-size`` images;
* ``one-by-one``: on one image at a time (same function, batch of 1);

with the same images and ``--max-new-tokens``. Each method runs in its own fresh
subprocess (this script re-invoked with ``--method``), so its peak RSS is its own; the
two processes take turns on the same chunks of ``--batch-size`` images (lockstep, see
``_common.run_lockstep``). The timed region covers encoding + projection +
generation + decoding of every image (images are read from disk before it); an
untimed warm-up on each method's first batch runs first. The script exits non-zero
when the captions differ.

    python benchmarks/bench_caption.py --images 8 --batch-size 8
    python benchmarks/bench_caption.py --smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import (  # shared plumbing of the benchmark scripts, in this folder
    MODELS_LINE,
    add_common_args,
    common_argv,
    load_average,
    load_images,
    markdown_table,
    print_header,
    run_lockstep,
    serve,
    start_worker,
)

METHODS = ("batched", "one-by-one")


def caption(plm, images, max_new_tokens: int, batch_size: int, stop: set[int]) -> list[dict]:
    import torch

    res = []
    for s in range(0, len(images), batch_size):
        with torch.no_grad():
            soft = plm.image_soft_tokens(images[s : s + batch_size])
        ids, probs = plm.generate(soft, max_new_tokens, stop)
        for row, p in zip(ids, probs):
            res.append({"ids": row, "text": plm.tokenizer.decode(row), "p": p})
    return res


def worker(args: argparse.Namespace) -> None:
    from mmn.models.prefix_lm import stop_token_ids

    plm = start_worker(args)
    images, source = load_images(args.images)
    stop = stop_token_ids(plm.tokenizer, plm.adapter.vocab_size, stop_at_newline=True)
    bs = args.batch_size if args.method == "batched" else 1

    def run(i: int, j: int) -> list[dict]:
        return caption(plm, images[i:j], args.max_new_tokens, bs, stop)

    if args.warmup:  # untimed: the method's first batch
        run(0, bs)
    serve(run, args.result, {"method": args.method, "batch_size": bs, "source": source})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8, help="number of images (default 8)")
    p.add_argument("--batch-size", type=int, default=8, help="batched method's batch size (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens per caption (default 16)")
    add_common_args(p, METHODS)
    p.add_argument("--smoke", action="store_true", help="tiny run: 4 images, batch 4, 5 tokens, no warm-up")
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.batch_size, args.max_new_tokens, args.warmup = 4, 4, 5, False
    if args.images < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        p.error("--images, --batch-size and --max-new-tokens must be >= 1")
    if args.method:
        worker(args)
        return 0

    print_header("caption benchmark: batched vs one-by-one greedy generation (KV cache)", args.threads)
    fwd = ["--images", str(args.images), "--batch-size", str(args.batch_size),
           "--max-new-tokens", str(args.max_new_tokens), *common_argv(args)]
    res = run_lockstep(Path(__file__).resolve(), METHODS, fwd, args.images, args.batch_size)
    bat, one = res["batched"], res["one-by-one"]
    print(f"{MODELS_LINE}, seed {args.seed}, fp32")
    print(f"images: {bat['images']} from {bat['source']}; max_new_tokens = {args.max_new_tokens}, stop at EOS/newline; "
          f"timed: encode + project + generate + decode"
          f"{' (after an untimed warm-up of each method on its first batch)' if args.warmup else ' (no warm-up)'}")
    print(f"load average after the run: {load_average()}")
    rows = []
    for m in METHODS:
        r = res[m]
        n_tok = sum(len(x["ids"]) for x in r["results"])
        rows.append([m, r["images"], r["batch_size"], f"{r['seconds']:.2f}", f"{r['images'] / r['seconds']:.3f}",
                     f"{r['cpu_seconds']:.1f}", f"{r['load_1m']:.2f}",
                     n_tok, f"{r['rss_ready_mb']:.0f}", f"{r['peak_rss_mb']:.0f}"])
    print()
    print(markdown_table(
        ["method", "images", "batch", "seconds", "captions/s", "CPU s", "load 1m", "caption tokens", "RSS ready MB",
         "peak RSS MB"], rows))
    print()
    print(f"speed ratio (batched / one-by-one captions/s): {one['seconds'] / bat['seconds']:.2f}x "
          f"(CPU time ratio {one['cpu_seconds'] / bat['cpu_seconds']:.2f}x)")
    for i, x in enumerate(bat["results"][:3]):
        print(f"caption {i}: {x['text']!r}")
    n_diff = sum(x["ids"] != y["ids"] for x, y in zip(bat["results"], one["results"]))
    dp = max((abs(u - v) for x, y in zip(bat["results"], one["results"]) if x["ids"] == y["ids"]
              for u, v in zip(x["p"], y["p"])), default=0.0)
    print(f"max |dp(token)| over identical captions = {dp:.2e}")
    if n_diff:
        print(f"same captions: no ({n_diff} of {bat['images']} differ)")
        return 1
    print("same captions: yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
