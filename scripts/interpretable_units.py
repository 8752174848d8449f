"""Every unit's interpretability (the decode + filter rule, fp32 CPU) of one or more LMs, from
the LM alone (no projection, no images): how many of an LM's MLP units decode to words.

    python -m scripts.interpretable_units [--lm embedded:smollm2-135m --lm embedded:gemma3-270m] [--out FILE]

Reads ``decode`` and ``filter`` from params.yaml and the word list of ``data/wordlist``; prints one
line per LM and writes ``{lm: {n_units, n_interpretable, fraction, per_layer, ...}}`` as JSON.
The counts are exact (every unit), not estimates.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmn.models.lm import load_lm
from mmn.neurons.filter import interpretable_units, load_wordlist
from mmn.params import load_params


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm", action="append", default=None)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--wordlist", type=Path, default=Path("data/wordlist/american-english"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    params = load_params(args.params)
    words = load_wordlist(args.wordlist)
    out = {}
    for name in args.lm or ["embedded:smollm2-135m", "embedded:gemma3-270m"]:
        ad, tok = load_lm(name)
        t0 = time.time()
        mask = interpretable_units(ad, tok, words, params.decode, params.filter)
        key = name.removeprefix("embedded:").replace("-", "_")  # docs quote it as file.json:key.field
        out[key] = {"n_units": int(mask.numel()), "n_interpretable": int(mask.sum()),
                     "fraction": round(float(mask.float().mean()), 6),
                     "per_layer": [round(float(x), 4) for x in mask.float().mean(1)],
                     "vocab": ad.vocab_size, "layers": ad.n_layers, "d_mlp": ad.d_mlp,
                     "decode_filter_s": round(time.time() - t0, 1)}
        print(f"{name}: {out[key]['n_interpretable']} of {out[key]['n_units']} units interpretable "
              f"({out[key]['fraction']:.4f}); decode + filter {out[key]['decode_filter_s']} s", flush=True)
        del ad
    text = json.dumps(out, indent=1) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
