"""Projection training at size on the Flickr8k sample: bf16 autocast vs float32, and peak memory
against the number of training images.

1. Precision (one process, side by side): ``--images`` Flickr8k images as a `captions` training
   layout, the embedded default's models, ``--steps`` steps of batch ``--batch`` with ``--views``
   views, no early stopping, features cached on disk once and shared by the runs. Prints the
   seconds per step of float32 and of bfloat16 autocast (between the first and the last update:
   no encoding, no validation), their ratio, and both projections' validation loss after the same
   steps, scored the same way (float32 LM) on the same validation pairs.
2. Memory: for each of ``--rss-images`` (a fresh subprocess each) the same training with
   float16 features for ``--rss-steps`` steps; prints the peak RSS of each phase (loading the
   models; encoding the views into the store; training from it), each phase's peak measured
   alone (VmHWM reset between phases). Flat memory: the last columns do not grow with the images.

    .venv/bin/python benchmarks/bench_train_at_size.py --flickr ../shared/data/flickr8k-5k

Not part of the pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, machine_info, markdown_table  # noqa: E402


def _params(steps: int, batch: int, views: int, dtype: str, feature_dtype: str | None):
    from mmn.params import load_params, parse_params

    raw = load_params(REPO / "params.yaml").model_dump()
    raw["projection"]["train"].update(max_steps=steps, batch_size=batch, views=views, eval_every=steps, patience=0,
                                      dtype=dtype, feature_dtype=feature_dtype, val_max_images=32)
    for prof in raw["profiles"].values():
        prof.update(train_max_steps=None, train_batch_size=None, train_views=None, train_dtype=None)
    return parse_params(raw)


def _layout(flickr: Path, n: int, root: Path):
    from mmn.data.captions_source import build_captions_layout
    from mmn.data.layout import CocoLayout
    from mmn.params import CaptionSourceParams

    cfg = CaptionSourceParams(path=str(flickr / "captions.csv"), images=str(flickr / "images"), subset=n)
    build_captions_layout(cfg, root / "layout", seed=0, cache_dir=root / "dl", progress=False)
    return CocoLayout(root / "layout")


def _models(params):
    from mmn.pipeline import build_encoder, build_lm

    adapter, tok = build_lm(params)
    return adapter, tok, build_encoder(params)


def precision(args) -> None:
    from mmn.models.prefix_lm import ImagePrefixLM
    from mmn.numerics import seed_everything
    from mmn.projection_training import encode_views, tokenised_captions, train_from_layout, validation_loss

    root = Path(tempfile.mkdtemp())
    layout = _layout(args.flickr, args.images, root)
    base = _params(args.steps, args.batch, args.views, "float32", None)
    adapter, tok, enc = _models(base)
    t0 = time.perf_counter()
    train_from_layout(layout, adapter, tok, enc, _params(1, args.batch, args.views, "float32", None),
                      cache_dir=root / "cache")  # builds the feature store the timed runs share
    print(f"{args.images} Flickr8k images, {args.views} views: features encoded in {time.perf_counter() - t0:.0f} s")
    out = {}
    for dtype in ("float32", "bfloat16"):
        params = _params(args.steps, args.batch, args.views, dtype, None)
        seed_everything(params.seed)
        stamps: list[float] = []  # after each update: the time per step leaves out encoding and validation

        def log(name: str, step: int, value: float) -> None:
            if name == "train/loss":
                stamps.append(time.perf_counter())

        proj, res, meta = train_from_layout(layout, adapter, tok, enc, params, cache_dir=root / "cache", log=log)
        sec = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        out[dtype] = (proj, sec, res, meta)
        print(f"  {dtype}: {sec:.2f} s/step, val loss (own precision) {res.initial_val_loss:.4f} -> "
              f"{res.history[-1]['val_loss']:.4f}")
    val_ids = out["float32"][3]["val_image_ids"]
    feats, _ = encode_views(layout, val_ids, enc, 1, base.seed)
    caps = tokenised_captions(layout, tok, val_ids)
    pairs = [(row, c) for row, i in enumerate(val_ids) for c in caps[i]]
    plm = ImagePrefixLM(adapter, tok, torch.nn.Linear(1, 1), prompt=base.caption.prompt)
    rows = []
    for dtype, (proj, sec, res, meta) in out.items():
        v = validation_loss(proj, feats, pairs, plm.caption_loss, args.batch)
        rows.append([dtype, f"{sec:.2f}", f"{res.initial_val_loss:.4f}", f"{v:.4f}"])
    print()
    print(markdown_table(["training", "s/step", "val loss before", f"val loss after {args.steps} steps (float32 LM)"],
                         rows))
    print(f"\nbfloat16 / float32 time per step: {out['bfloat16'][1] / out['float32'][1]:.2f}x; "
          f"{len(val_ids)} validation images, {len(pairs)} pairs; batch {args.batch}")


def _phase_peak_mb() -> float:
    """Peak RSS since the last call (VmHWM, then reset through /proc/self/clear_refs): the model load's
    peak (gguf dequantisation) would otherwise hide every later phase in ru_maxrss."""
    status = Path("/proc/self/status").read_text()
    kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    Path("/proc/self/clear_refs").write_text("5")
    return kb / 1024


def rss_worker(args) -> None:
    from mmn.projection_training import train_from_layout

    root = Path(tempfile.mkdtemp())
    layout = _layout(args.flickr, args.worker, root)
    params = _params(args.rss_steps, args.batch, args.views, "bfloat16", "float16")
    adapter, tok, enc = _models(params)
    load = _phase_peak_mb()
    train_from_layout(layout, adapter, tok, enc, _params(1, args.batch, args.views, "bfloat16", "float16"),
                      cache_dir=root / "cache")
    encode = _phase_peak_mb()
    train_from_layout(layout, adapter, tok, enc, params, cache_dir=root / "cache")
    print(json.dumps({"images": args.worker, "load": load, "encode": encode, "train": _phase_peak_mb(),
                      "features_mb": (root / "cache" / "features" / "features.bin").stat().st_size / 2**20}))


def memory(args) -> None:
    rows = []
    for n in args.rss_images:
        r = subprocess.run([sys.executable, __file__, "--flickr", str(args.flickr), "--worker", str(n),
                            "--rss-steps", str(args.rss_steps), "--batch", str(args.batch), "--views", str(args.views)],
                           capture_output=True, text=True, check=True)
        d = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append([str(n), f"{d['features_mb']:.0f}", f"{d['load']:.0f}", f"{d['encode']:.0f}", f"{d['train']:.0f}"])
    print()
    print(markdown_table(["training images", "features on disk (MB, float16)", "peak RSS (MB): loading the models",
                          "encoding the views + 1 step", f"{args.rss_steps} bf16 steps from the store"], rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flickr", type=Path, default=REPO.parent / "shared" / "data" / "flickr8k-5k")
    p.add_argument("--images", type=int, default=1000, help="training images of the precision comparison")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--rss-images", type=int, nargs="*", default=[1000, 5000])
    p.add_argument("--rss-steps", type=int, default=5)
    p.add_argument("--skip-precision", action="store_true")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        return rss_worker(args)
    print("\n".join(machine_info(torch.get_num_threads())) + f"; load {os.getloadavg()[0]:.2f}")
    if not args.skip_precision:
        precision(args)
    if args.rss_images:
        memory(args)


if __name__ == "__main__":
    main()
