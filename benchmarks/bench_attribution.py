"""Benchmark: one-pass attribution vs a naive per-layer-backward baseline.

Runs on the real embedded models (SmolLM2-135M + EfficientNet-lite0, 7×7 patches,
a seeded random ``Linear(1280, 576)`` projection) and real images, and prints, side by
side, images/s and peak RSS of

* ``one-pass``: :func:`mmn.neurons.attribution.attribution_maps` + :func:`top_k` on
  batches of ``--batch-size`` images (one forward + ONE backward per batch);
* ``streaming``: :func:`mmn.neurons.attribution.attribute_topk` on the same batches
  (the same single backward, each layer reduced to its own top k; the path
  ``attribute_captions`` takes);
* ``naive``: implemented here, one image at a time: one forward, then one
  ``torch.autograd.grad`` per layer (``retain_graph=True``) for that layer's gradient,
  and an independent top-k.

Each method runs in its own fresh subprocess (this script re-invoked with
``--method``), so its peak RSS is its own; the two processes take turns on the same
chunks of ``--batch-size`` images (lockstep), so background load on a shared machine
falls on both alike. The timed region covers encoding + projection + attribution +
top-k of every image (images are read from disk before it); an untimed warm-up on
each method's first batch runs first. The script exits non-zero when the methods do not
give the same top-k (layer, unit, patch) triples up to float noise (``_common.topk_agree``,
``--tol``: naive runs one image at a time, so its float sums differ in the low bits
(|dy| ~1e-5), which may reorder near ties); it also prints how many images agree exactly.

    python benchmarks/bench_attribution.py --images 8 --batch-size 4
    python benchmarks/bench_attribution.py --smoke
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
    seq_lens,
    serve,
    start_worker,
    texts_and_targets,
    topk_agree,
)

METHODS = ("one-pass", "streaming", "naive")
BATCHED = ("one-pass", "streaming")
TARGET_RATIO = 5.0
TOL = 1e-3  # relative to max |g|; batch vs one image moves g by ~1e-5 relative


# --- the two methods -----------------------------------------------------------------


def one_pass(plm, images, texts, targets, k: int, batch_size: int) -> list[dict]:
    """The library path: batched attribution_maps + top_k."""
    import torch

    from mmn.neurons.attribution import attribution_maps, top_k

    res = []
    for s in range(0, len(images), batch_size):
        with torch.no_grad():
            soft = plm.image_soft_tokens(images[s : s + batch_size])
        y, a, grad = attribution_maps(plm, soft, texts[s : s + batch_size], targets[s : s + batch_size])
        for yi, t in zip(y.tolist(), top_k(a, grad, k)):
            res.append({"y": yi, "triples": torch.stack([t.layer, t.unit, t.patch], 1).tolist(), "g": t.g.tolist()})
    return res


def streaming(plm, images, texts, targets, k: int, batch_size: int) -> list[dict]:
    """The library's streaming path: batched attribute_topk."""
    import torch

    from mmn.neurons.attribution import attribute_topk

    res = []
    for s in range(0, len(images), batch_size):
        with torch.no_grad():
            soft = plm.image_soft_tokens(images[s : s + batch_size])
        y, tops = attribute_topk(plm, soft, texts[s : s + batch_size], targets[s : s + batch_size], k,
                                 rank_by="triple")  # the one-pass reference (top_k) ranks triples
        for yi, t in zip(y.tolist(), tops):
            res.append({"y": yi, "triples": torch.stack([t.layer, t.unit, t.patch], 1).tolist(), "g": t.g.tolist()})
    return res


def naive_one(plm, soft, text: list[int], target: int, k: int) -> dict:
    """One image: one forward, then one backward per layer; plain hooks, plain top-k."""
    import torch

    ad = plm.adapter
    n_layers = ad.n_layers
    batch = plm.build(soft.detach(), [text])
    embeds = batch.inputs_embeds.detach().requires_grad_(True)
    acts: list = [None] * n_layers

    def keeper(layer: int):
        def pre_hook(_mod, args):
            acts[layer] = args[0]

        return pre_hook

    handles = [ad.act_module(l).register_forward_pre_hook(keeper(l)) for l in range(n_layers)]
    try:
        with torch.enable_grad():
            out = ad.model(inputs_embeds=embeds, attention_mask=batch.attention_mask)
            y = out.logits[0, batch.lengths[0] - 1, target]
            grads = [torch.autograd.grad(y, acts[l], retain_graph=True)[0] for l in range(n_layers)]
    finally:
        for h in handles:
            h.remove()
    sl = batch.image_slice
    a = torch.stack([t[0, sl].detach().float() for t in acts])  # [L, P, U]
    g = a * torch.stack([t[0, sl].float() for t in grads])
    n_patch, n_units = a.shape[1], a.shape[2]
    vals, idx = torch.topk(g.reshape(-1), min(k, g.numel()))
    order = sorted(range(len(idx)), key=lambda i: (-vals[i].item(), idx[i].item()))  # ties: flat index
    idx = idx[order]
    triples = torch.stack([idx // (n_patch * n_units), idx % n_units, (idx // n_units) % n_patch], 1)
    return {"y": y.item(), "triples": triples.tolist(), "g": vals[order].tolist()}


def naive(plm, images, texts, targets, k: int, batch_size: int) -> list[dict]:
    import torch

    res = []
    for im, text, target in zip(images, texts, targets):
        with torch.no_grad():
            soft = plm.image_soft_tokens([im])
        res.append(naive_one(plm, soft, text, target, k))
    return res


def worker(args: argparse.Namespace) -> None:
    plm = start_worker(args)
    images, source = load_images(args.images)
    texts, targets = texts_and_targets(plm.tokenizer, args.images)
    fn = {"one-pass": one_pass, "streaming": streaming, "naive": naive}[args.method]

    def run(i: int, j: int) -> list[dict]:
        return fn(plm, images[i:j], texts[i:j], targets[i:j], args.k, args.batch_size)

    if args.warmup:  # untimed: the method's first batch (first calls at a new shape are slow)
        run(0, args.batch_size if args.method in BATCHED else 1)
    meta = {"method": args.method, "batch_size": args.batch_size if args.method in BATCHED else 1,
            "source": source, "seq_lens": seq_lens(plm, texts)}
    serve(run, args.result, meta)


# --- driver --------------------------------------------------------------------------


def compare(a: list[dict], b: list[dict], tol: float) -> tuple[int, int, float]:
    """(#images whose ordered top-k triples differ, #images that disagree beyond float noise,
    max |Δg| relative to max |g| over images with identical top-k)."""
    n_diff = sum(x["triples"] != y["triples"] for x, y in zip(a, b))
    n_bad = sum(not topk_agree(list(zip(x["triples"], x["g"])), list(zip(y["triples"], y["g"])), tol)
                for x, y in zip(a, b))
    rel = 0.0
    for x, y in zip(a, b):
        if x["triples"] == y["triples"]:
            scale = max(abs(v) for v in x["g"]) or 1.0
            rel = max(rel, max(abs(u - v) for u, v in zip(x["g"], y["g"])) / scale)
    return n_diff, n_bad, rel


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8, help="number of images (default 8)")
    p.add_argument("--batch-size", type=int, default=4, help="one-pass / streaming batch size (default 4)")
    p.add_argument("--k", type=int, default=100, help="top-k triples per image (default 100)")
    p.add_argument("--tol", type=float, default=TOL,
                   help=f"float noise allowed between methods, relative to max |g| (default {TOL:g})")
    add_common_args(p, METHODS)
    p.add_argument("--smoke", action="store_true", help="tiny run: 2 images, batch 2, no warm-up")
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.batch_size, args.warmup = 2, 2, False
    if args.images < 1 or args.batch_size < 1 or args.k < 1:
        p.error("--images, --batch-size and --k must be >= 1")
    if args.method:
        worker(args)
        return 0

    print_header("attribution benchmark: one-pass / streaming (library) vs naive (one backward per layer)",
                 args.threads)
    fwd = ["--images", str(args.images), "--batch-size", str(args.batch_size), "--k", str(args.k), *common_argv(args)]
    res = run_lockstep(Path(__file__).resolve(), METHODS, fwd, args.images, args.batch_size)
    one, nv = res["one-pass"], res["naive"]
    print(f"{MODELS_LINE}, seed {args.seed}, fp32")
    print(f"images: {one['images']} from {one['source']}; sequence lengths {sorted(set(one['seq_lens']))}; "
          f"k = {args.k}; timed: encode + project + attribution + top-k"
          f"{' (after an untimed warm-up of each method on its first batch)' if args.warmup else ' (no warm-up)'}")
    print(f"load average after the run: {load_average()}")
    rows = []
    for m in METHODS:
        r = res[m]
        rows.append([m, r["images"], r["batch_size"], f"{r['seconds']:.2f}", f"{r['images'] / r['seconds']:.3f}",
                     f"{r['cpu_seconds']:.1f}", f"{r['load_1m']:.2f}",
                     f"{r['rss_ready_mb']:.0f}", f"{r['peak_rss_mb']:.0f}"])
    print()
    print(markdown_table(["method", "images", "batch", "seconds", "images/s", "CPU s", "load 1m", "RSS ready MB",
                          "peak RSS MB"], rows))
    print()
    for m in BATCHED:
        ratio = nv["seconds"] / res[m]["seconds"]
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        print(f"speed ratio ({m} / naive images/s): {ratio:.2f}x (target >= {TARGET_RATIO:g}x: {verdict}; "
              f"CPU time ratio {nv['cpu_seconds'] / res[m]['cpu_seconds']:.2f}x)")
    n_bad = 0
    for m in METHODS[1:]:
        n_diff, n_far, rel = compare(one["results"], res[m]["results"], args.tol)
        dy = max(abs(x["y"] - y["y"]) for x, y in zip(one["results"], res[m]["results"]))
        print(f"one-pass vs {m}: {n_diff} of {one['images']} images with different top-k; max |dy| = {dy:.2e}; "
              f"max |dg| / max|g| over identical top-k = {rel:.2e}; "
              f"{n_far} of {one['images']} differ beyond float noise (tol {args.tol:g})")
        n_bad = max(n_bad, n_far)
    if n_bad:
        print(f"same top-k: no (up to {n_bad} of {one['images']} images differ beyond float noise)")
        return 1
    print("same top-k: yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
