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
each method's first batch runs first. The script exits non-zero when the two methods
do not give the same top-k (layer, unit, patch) triples.

    python benchmarks/bench_attribution.py --images 8 --batch-size 4
    python benchmarks/bench_attribution.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COCO_MINI_IMAGES = REPO.parent / "shared" / "data" / "coco-mini" / "images"
LM = "embedded:smollm2-135m"
ENCODER = "embedded:efficientnet-lite0"
METHODS = ("one-pass", "streaming", "naive")
BATCHED = ("one-pass", "streaming")
TARGET_RATIO = 5.0

#: (caption before the target, target word): captions of different lengths
CAPTIONS = [
    (" a cat sitting on a", " couch"),
    (" a man riding a", " horse"),
    (" a", " dog"),
    (" two people standing next to a large red", " train"),
    (" a plate of food with a", " fork"),
    (" an old black and white photo of a woman holding an", " umbrella"),
    (" a bowl of", " fruit"),
    (" a group of young men playing a game of", " baseball"),
]


# --- shared helpers ------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def load_images(n: int):
    """``n`` RGB PIL images: coco-mini (sorted by name) or skimage's samples, cycled."""
    from PIL import Image

    files = sorted(COCO_MINI_IMAGES.glob("*.jpg")) if COCO_MINI_IMAGES.is_dir() else []
    if files:
        pool = [Image.open(f).convert("RGB") for f in files[:n]]
        source = f"coco-mini ({COCO_MINI_IMAGES})"
    else:
        from skimage import data

        pool = [Image.fromarray(data.chelsea()), Image.fromarray(data.astronaut())]
        source = "skimage chelsea/astronaut"
    return [pool[i % len(pool)] for i in range(n)], source


def load_models(seed: int):
    """The embedded LM + encoder and a seeded random projection, wrapped as an ImagePrefixLM."""
    import torch
    from torch import nn

    from mmn.models.lm import load_lm
    from mmn.models.prefix_lm import ImagePrefixLM
    from mmn.models.vision import load_encoder

    adapter, tok = load_lm(LM)
    enc = load_encoder(ENCODER, 7, 224)
    torch.manual_seed(seed)
    proj = nn.Linear(enc.dim, adapter.d_model).eval().requires_grad_(False)
    return ImagePrefixLM(adapter, tok, proj), enc


def machine_info(threads: int) -> list[str]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"python {platform.python_version()}, torch {torch.__version__}, {platform.system()} {platform.machine()}",
        f"CPU: {cpu}; os.cpu_count() = {os.cpu_count()}, usable = {affinity}; torch threads = {threads}",
        f"load average (1/5/15 min) before the run: {load_average()} (other busy processes skew timings)",
    ]


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def serve(run, result: str, meta: dict) -> None:
    """Worker loop (in the ``--method`` subprocess, models loaded and warmed up).

    Answers ``@@ready``, then for each ``run I J`` line on stdin times ``run(I, J)``
    (the method on images I..J-1) and answers ``@@done``; ``finish`` writes the totals,
    the per-image results and this process's peak RSS to ``result`` as JSON.
    """
    rss_ready = peak_rss_mb()
    res: list[dict] = []
    seconds = cpu_seconds = 0.0
    loads = []
    print("@@ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "finish":
            break
        t0, c0 = time.perf_counter(), time.process_time()
        res += run(int(cmd[1]), int(cmd[2]))
        seconds += time.perf_counter() - t0
        cpu_seconds += time.process_time() - c0
        loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
        print("@@done", flush=True)
    out = {**meta, "images": len(res), "seconds": seconds, "cpu_seconds": cpu_seconds,
           "load_1m": sum(loads) / max(len(loads), 1), "rss_ready_mb": rss_ready, "peak_rss_mb": peak_rss_mb(),
           "results": res}
    Path(result).write_text(json.dumps(out))


def run_lockstep(script: Path, methods, argv: list[str], n_images: int, chunk: int) -> dict[str, dict]:
    """Run ``script --method m`` for each method in its own fresh process, in lockstep.

    Both workers load their models and warm up, then take turns on the same chunks of
    ``chunk`` images (the order alternates chunk by chunk), so load from other
    processes on the machine falls on both methods alike; each process's peak RSS
    stays its own. Returns each worker's JSON result.
    """
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="mmn-bench-") as tmp:
        procs: dict[str, subprocess.Popen] = {}

        def fail(m: str, why: str) -> None:
            for q in procs.values():
                if q.poll() is None:
                    q.kill()
            err = (Path(tmp) / f"{m}.err").read_text()
            sys.stderr.write(err[-5000:])
            raise SystemExit(f"worker {m!r} {why}")

        def expect(m: str, token: str) -> None:
            for line in procs[m].stdout:
                if line.strip() == token:
                    return
            fail(m, f"ended (exit code {procs[m].wait()}) before {token}")

        try:
            for m in methods:
                cmd = [sys.executable, str(script), *argv, "--method", m, "--result", str(Path(tmp) / f"{m}.json")]
                with open(Path(tmp) / f"{m}.err", "w") as err:
                    procs[m] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                                text=True, env=env)
            for m in methods:
                expect(m, "@@ready")
            for n, start in enumerate(range(0, n_images, chunk)):
                for m in methods if n % 2 == 0 else methods[::-1]:
                    procs[m].stdin.write(f"run {start} {min(start + chunk, n_images)}\n")
                    procs[m].stdin.flush()
                    expect(m, "@@done")
            results = {}
            for m in methods:
                procs[m].stdin.write("finish\n")
                procs[m].stdin.close()
                if procs[m].wait() != 0:
                    fail(m, f"failed with exit code {procs[m].returncode}")
                results[m] = json.loads((Path(tmp) / f"{m}.json").read_text())
        finally:
            for q in procs.values():
                if q.poll() is None:
                    q.kill()
    return results


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(header), sep, *(fmt(r) for r in rows)])


# --- the two methods -----------------------------------------------------------------


def texts_and_targets(tok, n: int) -> tuple[list[list[int]], list[int]]:
    texts, targets = [], []
    for i in range(n):
        before, target = CAPTIONS[i % len(CAPTIONS)]
        texts.append(tok(before, add_special_tokens=False).input_ids)
        targets.append(tok(target, add_special_tokens=False).input_ids[0])
    return texts, targets


def one_pass(plm, enc, images, texts, targets, k: int, batch_size: int) -> list[dict]:
    """The library path: batched attribution_maps + top_k."""
    import torch

    from mmn.neurons.attribution import attribution_maps, top_k

    res = []
    for s in range(0, len(images), batch_size):
        with torch.no_grad():
            soft = plm.soft_tokens(enc.encode(images[s : s + batch_size]))
        y, a, grad = attribution_maps(plm, soft, texts[s : s + batch_size], targets[s : s + batch_size])
        for yi, t in zip(y.tolist(), top_k(a, grad, k)):
            res.append({"y": yi, "triples": torch.stack([t.layer, t.unit, t.patch], 1).tolist(), "g": t.g.tolist()})
    return res


def streaming(plm, enc, images, texts, targets, k: int, batch_size: int) -> list[dict]:
    """The library's streaming path: batched attribute_topk."""
    import torch

    from mmn.neurons.attribution import attribute_topk

    res = []
    for s in range(0, len(images), batch_size):
        with torch.no_grad():
            soft = plm.soft_tokens(enc.encode(images[s : s + batch_size]))
        y, tops = attribute_topk(plm, soft, texts[s : s + batch_size], targets[s : s + batch_size], k)
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


def naive(plm, enc, images, texts, targets, k: int, batch_size: int) -> list[dict]:
    import torch

    res = []
    for im, text, target in zip(images, texts, targets):
        with torch.no_grad():
            soft = plm.soft_tokens(enc.encode([im]))
        res.append(naive_one(plm, soft, text, target, k))
    return res


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    images, source = load_images(args.images)
    plm, enc = load_models(args.seed)
    texts, targets = texts_and_targets(plm.tokenizer, args.images)
    fn = {"one-pass": one_pass, "streaming": streaming, "naive": naive}[args.method]

    def run(i: int, j: int) -> list[dict]:
        return fn(plm, enc, images[i:j], texts[i:j], targets[i:j], args.k, args.batch_size)

    if args.warmup:  # untimed: the method's first batch (first calls at a new shape are slow)
        run(0, args.batch_size if args.method in BATCHED else 1)
    meta = {"method": args.method, "batch_size": args.batch_size if args.method in BATCHED else 1,
            "source": source, "seq_lens": [plm.n_prefix(enc.n_patches) + len(t) for t in texts],
            "threads": torch.get_num_threads()}
    serve(run, args.result, meta)


# --- driver --------------------------------------------------------------------------


def compare(a: list[dict], b: list[dict]) -> tuple[int, float]:
    """(#images whose ordered top-k triples differ, max |Δg| relative to max |g|)."""
    n_diff = sum(x["triples"] != y["triples"] for x, y in zip(a, b))
    rel = 0.0
    for x, y in zip(a, b):
        if x["triples"] == y["triples"]:
            scale = max(abs(v) for v in x["g"]) or 1.0
            rel = max(rel, max(abs(u - v) for u, v in zip(x["g"], y["g"])) / scale)
    return n_diff, rel


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8, help="number of images (default 8)")
    p.add_argument("--batch-size", type=int, default=4, help="one-pass / streaming batch size (default 4)")
    p.add_argument("--k", type=int, default=100, help="top-k triples per image (default 100)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random projection")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the untimed warm-up run of each method's first batch")
    p.add_argument("--smoke", action="store_true", help="tiny run: 2 images, batch 2, no warm-up")
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # internal: worker mode
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.batch_size, args.warmup = 2, 2, False
    if args.images < 1 or args.batch_size < 1 or args.k < 1:
        p.error("--images, --batch-size and --k must be >= 1")
    if args.method:
        worker(args)
        return 0

    print("# attribution benchmark: one-pass / streaming (library) vs naive (one backward per layer)")
    for line in machine_info(args.threads):
        print(line)
    fwd = ["--images", str(args.images), "--batch-size", str(args.batch_size), "--k", str(args.k),
           "--threads", str(args.threads), "--seed", str(args.seed), *([] if args.warmup else ["--no-warmup"])]
    res = run_lockstep(Path(__file__).resolve(), METHODS, fwd, args.images, args.batch_size)
    one, nv = res["one-pass"], res["naive"]
    print(f"models: {LM} + {ENCODER} (7x7 patches) + random Linear(1280, 576), seed {args.seed}, fp32")
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
        n_diff, rel = compare(one["results"], res[m]["results"])
        dy = max(abs(x["y"] - y["y"]) for x, y in zip(one["results"], res[m]["results"]))
        print(f"one-pass vs {m}: {n_diff} of {one['images']} images with different top-k; max |dy| = {dy:.2e}; "
              f"max |dg| / max|g| over identical top-k = {rel:.2e}")
        n_bad = max(n_bad, n_diff)
    if n_bad:
        print(f"same top-k: no (up to {n_bad} of {one['images']} images differ)")
        return 1
    print("same top-k: yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
