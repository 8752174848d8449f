"""How far the trained projection, its captions and the caption quality move under float-kernel
noise (``torch.set_num_threads``, which changes reduction order much as another CPU does) and
under another seed.

Each run is a fresh process (``--worker``): it trains the projection exactly as the
``load_projection`` stage does (``mmn.projection_training.train_from_layout``, params from
``--params``), captions the evaluation images as the ``caption`` stage does and scores them
against their own / shuffled references (``mmn.captioning.caption_quality``). The parent
prints, per run, the training outcome and, against the first run, the largest weight change,
the captions that differ and the change of every caption-quality number.

    .venv/bin/python benchmarks/projection_stability.py                 # threads 1, 2; seed 1
    .venv/bin/python benchmarks/projection_stability.py --runs 1:0,2:0,1:1,1:2
    .venv/bin/python benchmarks/projection_stability.py --train data/coco_train --coco data/coco

``--runs`` lists ``threads:seed`` pairs. Without ``--coco`` the embedded sample images are
used both to train and to evaluate (the embedded default, ``projection.train.data: eval``).
Not part of the pipeline or the test suite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mmn.run_metrics import flatten

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from mmn.captioning import caption_images, caption_quality
    from mmn.data.layout import CocoLayout
    from mmn.data.sample import materialize_sample
    from mmn.models.prefix_lm import ImagePrefixLM
    from mmn.params import load_params, parse_params
    from mmn.numerics import seed_everything
    from mmn.metrics.bertscore import BertScorer
    from mmn.pipeline import build_encoder, build_lm
    from mmn.projection_training import train_from_layout

    raw = load_params(args.params).model_dump()
    raw["seed"] = args.seed
    params = parse_params(raw)
    seed_everything(params.seed)
    if args.coco:
        train, evaluation = CocoLayout(Path(args.train or args.coco)), CocoLayout(Path(args.coco))
    else:
        root = Path(tempfile.mkdtemp()) / "sample"
        materialize_sample(root)
        train = evaluation = CocoLayout(root)
    adapter, tok = build_lm(params)
    enc = build_encoder(params)
    t0 = time.perf_counter()
    proj, res, meta = train_from_layout(train, adapter, tok, enc, params)
    train_s = time.perf_counter() - t0
    plm = ImagePrefixLM(adapter, tok, proj, prompt=params.caption.prompt, encoder=enc)
    c = params.caption
    with torch.inference_mode():
        df = caption_images(evaluation, plm, batch_size=c.batch_size, max_new_tokens=c.max_new_tokens,
                            stop_at_newline=c.stop_at_newline, progress=False)
    scorer = BertScorer.from_profile(params)
    df, metrics, informative = caption_quality(df, evaluation.captions, scorer, params.seed)
    torch.save(proj.state_dict(), args.result + ".pt")
    Path(args.result).write_text(json.dumps({
        "threads": args.threads, "seed": args.seed, "train_s": train_s, "meta": meta, "history": res.history,
        "captions": dict(zip(map(str, df["image_id"]), df["caption"])),
        "nouns": dict(zip(map(str, df["image_id"]), df["noun"])),
        "metrics": metrics, "informative": informative,
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="1:0,2:0,1:1", help="threads:seed pairs; the first is the reference")
    p.add_argument("--params", default=str(REPO / "params.yaml"))
    p.add_argument("--coco", default=None, help="evaluation layout (default: the embedded sample images)")
    p.add_argument("--train", default=None, help="training layout (default: --coco)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    import torch

    runs = [tuple(int(x) for x in r.split(":")) for r in args.runs.split(",")]
    tmp = Path(tempfile.mkdtemp())
    results = []
    for i, (threads, seed) in enumerate(runs):
        out = tmp / f"run{i}.json"
        cmd = [sys.executable, __file__, "--worker", "--threads", str(threads), "--seed", str(seed),
               "--result", str(out), "--params", args.params]
        cmd += ["--coco", args.coco] if args.coco else []
        cmd += ["--train", args.train] if args.train else []
        subprocess.run(cmd, check=True, cwd=REPO, env={**__import__("os").environ, "PYTHONHASHSEED": "0"})
        results.append(json.loads(out.read_text()))
        results[-1]["weights"] = torch.load(str(out) + ".pt")
    ref = results[0]
    ref_m = flatten(ref["metrics"])
    print(f"reference: threads {ref['threads']}, seed {ref['seed']}")
    for r in results:
        m = r["meta"]
        dw = max(float((r["weights"][k] - ref["weights"][k]).abs().max()) for k in ref["weights"])
        scale = float(ref["weights"]["linear.weight"].abs().max())
        same = [k for k in ref["captions"] if r["captions"].get(k) == ref["captions"][k]]
        print(f"\n## threads {r['threads']}, seed {r['seed']}: {m['steps_run']} steps "
              f"({'early stop' if m['stopped_early'] else 'max_steps'}), best step {m['best_step']}, "
              f"val loss {m['initial_val_loss']} -> {m['best_val_loss']}, train {r['train_s']:.0f} s")
        print(f"max |dW| vs reference {dw:.3g} (max |W| {scale:.3g}); captions identical {len(same)}/{len(ref['captions'])}; "
              f"own vs shuffled informative: {r['informative']}")
        mm = flatten(r["metrics"])
        print("metric deltas vs reference: " + ", ".join(
            f"{k} {mm[k]:.4g} ({mm[k] - ref_m[k]:+.3g})" for k in mm if k in ref_m and not k.endswith(".n")))
        for k, cap in r["captions"].items():
            flag = "" if cap == ref["captions"].get(k) else "   <-- differs"
            print(f"  {k}: {cap!r} [{r['nouns'][k]}]{flag}")


if __name__ == "__main__":
    main()
