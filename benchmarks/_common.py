"""Shared plumbing of the CPU benchmark scripts (``bench_attribution.py``,
``bench_caption.py``, ``bench_ablate.py``, ``bench_memory.py``).

* the real embedded models (:func:`load_models`) and real images (:func:`image_loader`,
  :func:`load_images`), fixed captions of different lengths (:func:`texts_and_targets`);
* the fresh-subprocess worker protocol: :func:`run_lockstep` re-invokes a script with
  ``--method m --result FILE`` once per method; the worker loads its models, warms up
  and calls :func:`serve`, which times the chunks it is sent and records its own peak
  RSS (``getrusage``) before and after the timed region;
* output helpers: :func:`machine_info`, :func:`load_average`, :func:`markdown_table`.

Not a test module and not part of the ``mmn`` package: the scripts import it as ``_common``
(run as ``python benchmarks/<script>.py``, a script has its own folder first on ``sys.path``).
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
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COCO_MINI_IMAGES = REPO.parent / "shared" / "data" / "coco-mini" / "images"
LM = "embedded:smollm2-135m"
ENCODER = "embedded:efficientnet-lite0"
MODELS_LINE = f"models: {LM} + {ENCODER} (7x7 patches) + random Linear(1280, 576)"

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


# --- measurement ---------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info(threads: int) -> list[str]:
    import torch

    from mmn.provenance import cpu_model

    cpu = cpu_model()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"python {platform.python_version()}, torch {torch.__version__}, {platform.system()} {platform.machine()}",
        f"CPU: {cpu}; os.cpu_count() = {os.cpu_count()}, usable = {affinity}; torch threads = {threads}",
        f"load average (1/5/15 min) before the run: {load_average()} (other busy processes skew timings)",
    ]


def topk_agree(a: Sequence[tuple[Sequence, float]], b: Sequence[tuple[Sequence, float]], tol: float) -> bool:
    """Whether two top-k lists of ``(key, value)`` agree up to float noise.

    Methods that batch differently sum floats in a different order (about 1e-5 relative),
    which may reorder near-tied entries. So: a key in both lists must have values within ``tol * max|value|``;
    a key in only one list must be a near-tie at the other's cut, within ``tol * max|value|``
    of the other list's k-th value. The order itself is not compared (the values are).
    """
    va = {tuple(k): v for k, v in a}
    vb = {tuple(k): v for k, v in b}
    scale = max([abs(v) for v in [*va.values(), *vb.values()]] or [1.0]) or 1.0
    if any(abs(va[k] - vb[k]) > tol * scale for k in va.keys() & vb.keys()):
        return False
    cut_a, cut_b = min(va.values(), default=0.0), min(vb.values(), default=0.0)
    return all(va[k] <= cut_b + tol * scale for k in va.keys() - vb.keys()) and all(
        vb[k] <= cut_a + tol * scale for k in vb.keys() - va.keys())


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(header), sep, *(fmt(r) for r in rows)])


# --- models and data -----------------------------------------------------------------


def image_loader(n: int) -> tuple[Callable[[int], object], str]:
    """``(load, source)``: ``load(i)`` reads image ``i`` (0 <= i < n) as an RGB PIL image.

    coco-mini's first ``n`` images sorted by name, read from disk on every call (as the
    pipeline's ``CocoLayout.load_image``), or scikit-image's ``chelsea`` and
    ``astronaut`` (in memory); either pool is cycled when it has fewer than ``n``.
    """
    from PIL import Image

    files = sorted(COCO_MINI_IMAGES.glob("*.jpg"))[:n] if COCO_MINI_IMAGES.is_dir() else []
    if files:
        return (lambda i: Image.open(files[i % len(files)]).convert("RGB")), f"coco-mini ({COCO_MINI_IMAGES})"
    from skimage import data

    pool = [Image.fromarray(data.chelsea()), Image.fromarray(data.astronaut())]
    return (lambda i: pool[i % len(pool)]), "skimage chelsea/astronaut"


def load_images(n: int):
    """``n`` RGB PIL images: coco-mini (sorted by name) or skimage's samples, cycled."""
    load, source = image_loader(n)
    return [load(i) for i in range(n)], source


def load_models(seed: int):
    """The embedded LM and a seeded random projection, wrapped with the encoder as an ImagePrefixLM."""
    import torch
    from torch import nn

    from mmn.models.lm import load_lm
    from mmn.models.prefix_lm import ImagePrefixLM
    from mmn.models.vision import load_encoder

    adapter, tok = load_lm(LM)
    enc = load_encoder(ENCODER, 7, 224)
    torch.manual_seed(seed)
    proj = nn.Linear(enc.dim, adapter.d_model).eval().requires_grad_(False)
    return ImagePrefixLM(adapter, tok, proj, encoder=enc)


def start_worker(args: argparse.Namespace):
    """Preamble of every ``--method`` worker: torch threads from ``--threads``, then the
    models of :func:`load_models` (projection seeded by ``--seed``)."""
    import torch

    torch.set_num_threads(args.threads)
    return load_models(args.seed)


def seq_lens(plm, texts: Sequence[Sequence[int]]) -> list[int]:
    """Sequence length (image prefix + caption tokens) of each caption in ``texts``."""
    return [plm.n_prefix(plm.encoder.n_patches) + len(t) for t in texts]


def texts_and_targets(tok, n: int) -> tuple[list[list[int]], list[int]]:
    """Token ids of :data:`CAPTIONS` (cycled) for ``n`` images: (text before c, c)."""
    texts, targets = [], []
    for i in range(n):
        before, target = CAPTIONS[i % len(CAPTIONS)]
        texts.append(tok(before, add_special_tokens=False).input_ids)
        targets.append(tok(target, add_special_tokens=False).input_ids[0])
    return texts, targets


# --- command line --------------------------------------------------------------------


def add_common_args(p: argparse.ArgumentParser, methods: Sequence[str]) -> None:
    """``--threads``, ``--seed``, ``--no-warmup`` and the internal worker options."""
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random projection")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the untimed warm-up run of each method's first batch")
    p.add_argument("--warmup", dest="warmup", action="store_true",
                   help="run the warm-up (the default, except in bench_memory.py)")
    p.add_argument("--method", choices=methods, help=argparse.SUPPRESS)  # internal: worker mode
    p.add_argument("--result", help=argparse.SUPPRESS)


def common_argv(args: argparse.Namespace) -> list[str]:
    """The :func:`add_common_args` options to forward to the worker processes."""
    return ["--threads", str(args.threads), "--seed", str(args.seed), "--warmup" if args.warmup else "--no-warmup"]


def int_list(flag: str, minimum: int) -> Callable[[str], list[int]]:
    """argparse type: comma-separated integers >= ``minimum``."""

    def parse(s: str) -> list[int]:
        vals = [int(x) for x in s.split(",") if x.strip()]
        if not vals or min(vals) < minimum:
            raise argparse.ArgumentTypeError(f"{flag} needs comma-separated integers >= {minimum}")
        return vals

    return parse


def print_header(title: str, threads: int) -> None:
    """The ``# title`` line and the machine description."""
    print(f"# {title}")
    for line in machine_info(threads):
        print(line)


# --- fresh-subprocess workers in lockstep --------------------------------------------


def serve(run, result: str, meta: dict) -> None:
    """Worker loop (in the ``--method`` subprocess, models loaded and warmed up).

    Answers ``@@ready``, then for each ``run I J`` line on stdin times ``run(I, J)``
    (the method on images I..J-1) and answers ``@@done``; ``finish`` writes ``meta``, the
    totals, torch's thread count, the per-image results and this process's peak RSS to
    ``result`` as JSON.
    """
    import torch

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
    out = {**meta, "threads": torch.get_num_threads(), "images": len(res), "seconds": seconds, "cpu_seconds": cpu_seconds,
           "load_1m": sum(loads) / max(len(loads), 1), "rss_ready_mb": rss_ready, "peak_rss_mb": peak_rss_mb(),
           "results": res}
    Path(result).write_text(json.dumps(out))


def run_lockstep(script: Path, methods, argv: list[str], n_images: int, chunk: int) -> dict[str, dict]:
    """Run ``script --method m`` for each method in its own fresh process, in lockstep.

    Both workers load their models and warm up, then take turns on the same chunks of
    ``chunk`` images (the order alternates chunk by chunk), so load from other
    processes on the machine falls on both methods alike; each process's peak RSS
    stays its own. Returns each worker's JSON result. With a single method this is
    simply "run it in a fresh process, on chunks of ``chunk`` images".
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
