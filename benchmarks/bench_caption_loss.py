"""The projection's training step: LM head on the caption positions only vs on every position.

``ImagePrefixLM.caption_loss`` runs the LM head (``logits_to_keep``) only from the prompt's last
position on; the naive baseline computes the full sequence's logits (BOS + 49 soft tokens +
prompt + caption) and masks the labels, as the loss did before. Both give the same loss; the
cost differs most for a large vocabulary (gemma-3-270m: 262,144 x 640 head, more than its 18
blocks). Times one forward + backward (batch 16, 49 patches, captions of 6-14 tokens, the
training's bf16 autocast or fp32), both ways alternately in one process, and prints the loss
difference.

    python benchmarks/bench_caption_loss.py [--lm embedded:gemma3-270m] [--dtype float32] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from _common import LM, machine_info, markdown_table
from torch import nn

from mmn.models.lm import load_lm
from mmn.models.prefix_lm import ImagePrefixLM

CAPTIONS = ["A dog runs across the grass .", "Two men are playing basketball on an outdoor court .",
            "A girl in a pink dress is jumping into a pool .", "A brown dog carries a stick in its mouth .",
            "A man rides a bicycle down a dirt path .", "People walk along a busy city street at night .",
            "A child sits on a swing .", "A black and white dog is running through the snow ."]


def full_logits_loss(plm: ImagePrefixLM, soft: torch.Tensor, captions: list[list[int]]) -> torch.Tensor:
    """The baseline: logits of every position, labels -100 outside the caption."""
    eos = plm.tokenizer.eos_token_id
    texts = [list(c) + [eos] for c in captions]
    batch = plm.build(soft, texts)
    logits = plm.logits(batch)  # start 0: every position
    labels = torch.full(logits.shape[:2], -100, dtype=torch.long)
    start = batch.n_prefix - 1
    for i, t in enumerate(texts):
        labels[i, start : start + len(t)] = torch.tensor(t)
    logits = logits.float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm", action="append", default=None, help=f"repeatable; default {LM} and embedded:gemma3-270m")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="autocast of the training")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--patches", type=int, default=49)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    print("\n".join(machine_info(torch.get_num_threads())))
    rows = []
    for name in args.lm or [LM, "embedded:gemma3-270m"]:
        t0 = time.perf_counter()
        ad, tok = load_lm(name)
        load_s = time.perf_counter() - t0
        proj = nn.Linear(1280, ad.d_model)
        plm = ImagePrefixLM(ad, tok, proj)
        feats = torch.randn(args.batch, args.patches, 1280)
        caps = [tok(" " + CAPTIONS[i % len(CAPTIONS)], add_special_tokens=False).input_ids for i in range(args.batch)]
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bfloat16" else nullcontext

        def step(fn) -> tuple[float, float]:
            proj.zero_grad()
            t = time.perf_counter()
            with ctx():
                loss = fn(plm, proj(feats), caps)
            loss.backward()
            return time.perf_counter() - t, float(loss)

        ways = {"caption positions (library)": ImagePrefixLM.caption_loss, "every position (baseline)": full_logits_loss}
        for fn in ways.values():
            step(fn)  # warm-up
        times: dict[str, list[float]] = {k: [] for k in ways}
        losses: dict[str, float] = {}
        for _ in range(args.reps):  # alternate: both ways see the same machine load
            for k, fn in ways.items():
                s, losses[k] = step(fn)
                times[k].append(s)
        lib, base = (statistics.median(times[k]) for k in ways)
        rows.append([name, f"{ad.vocab_size:,}", f"{load_s:.0f} s", f"{lib:.2f} s", f"{base:.2f} s",
                     f"{base / lib:.2f}x", f"{abs(losses[next(iter(ways))] - losses[list(ways)[1]]):.1e}"])
        del plm, ad
    print(f"\none forward + backward of the caption loss, batch {args.batch}, {args.patches} patches, "
          f"{args.dtype}, median of {args.reps}")
    print(markdown_table(["LM", "vocab", "load", "caption positions", "every position", "speed-up", "|loss diff|"],
                         rows))


if __name__ == "__main__":
    main()
