"""float32 vs float64 (and bfloat16 autocast) projection training: cost per step, and how far a
change of thread count moves the trained weights under each (``projection.train.dtype``).

One process, the embedded default's models and its 7 sample images (``projection.train.data:
eval``), the default training recipe cut to ``--steps`` steps without validation. For each
dtype it trains under 1 thread and under 2 threads (``torch.set_num_threads``, which changes
reduction order much as another CPU does) and prints the seconds per step, the largest weight
difference between the two runs, and each dtype's cost relative to float32, all
measured side by side in this one run.

    .venv/bin/python benchmarks/bench_train_dtype.py --steps 5 [--dtypes float32 float64 bfloat16]

Not part of the pipeline.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"],
                   choices=["float32", "float64", "bfloat16"], help="float32 must be among them (the ratios' base)")
    args = p.parse_args()
    if "float32" not in args.dtypes:
        p.error("--dtypes: float32 is the base of the printed cost ratios; include it")

    from mmn.data.layout import CocoLayout
    from mmn.data.sample import materialize_sample
    from mmn.params import load_params, parse_params
    from mmn.numerics import seed_everything
    from mmn.pipeline import build_encoder, build_lm
    from mmn.projection_training import train_from_layout

    raw = load_params(REPO / "params.yaml").model_dump()
    raw["projection"]["train"].update(max_steps=args.steps, views=args.views, val_fraction=0.0,
                                      eval_every=args.steps)
    for prof in raw["profiles"].values():
        prof.update(train_max_steps=None, train_views=None, train_dtype=None)
    root = Path(tempfile.mkdtemp()) / "sample"
    materialize_sample(root)
    layout = CocoLayout(root)
    base = parse_params(raw)
    adapter, tok = build_lm(base)
    enc = build_encoder(base)
    print(f"embedded default models, 7 sample images, {args.steps} steps, batch "
          f"{base.train_loop.batch_size}, {args.views} views; load {os.getloadavg()[0]:.2f}")
    out: dict[str, dict[int, tuple[torch.Tensor, float]]] = {}
    for dtype in args.dtypes:
        raw["projection"]["train"]["dtype"] = dtype
        params = parse_params(raw)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            seed_everything(params.seed)
            t0 = time.perf_counter()
            proj, res, _ = train_from_layout(layout, adapter, tok, enc, params)
            sec = (time.perf_counter() - t0) / res.steps_run
            out.setdefault(dtype, {})[threads] = (proj.weight.detach().clone(), sec)
            print(f"  {dtype} threads {threads}: {sec:.1f} s/step (encoding included), "
                  f"last train loss {res.history[-1]['train_loss']:.6f}")
    print("\n| dtype | s/step, 1 thread | s/step, 2 threads | max abs dW, 1 vs 2 threads | weights equal |")
    print("| --- | --- | --- | --- | --- |")
    for dtype, runs in out.items():
        (w1, s1), (w2, s2) = runs[1], runs[2]
        print(f"| {dtype} | {s1:.1f} | {s2:.1f} | {float((w1 - w2).abs().max()):.3g} | {torch.equal(w1, w2)} |")
    print()
    for dtype in (d for d in args.dtypes if d != "float32"):
        r1 = out[dtype][1][1] / out["float32"][1][1]
        r2 = out[dtype][2][1] / out["float32"][2][1]
        print(f"{dtype} / float32 cost per step: {r1:.2f}x (1 thread), {r2:.2f}x (2 threads)")
    print(f"max |W| {float(out['float32'][1][0].abs().max()):.3g}")


if __name__ == "__main__":
    main()
