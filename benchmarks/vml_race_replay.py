"""Replay MKL VML's first-call race (pytorch/pytorch#188792) deterministically.

The race is rare (a few percent of fresh processes here) and only hits the first call of a
VML function, so it cannot be caught on demand. Its effect can be replayed: run the
embedded LM on the benchmarks' fixed input (2 coco-mini images, a seeded random
projection, 4 caption tokens), then again with one thread's half of the rotary
embedding's ``cos`` (or ``sin``) recomputed by VML's low-accuracy EP kernel, called
through ``ctypes`` on the MKL inside ``libtorch_cpu``. Before ``mmn.numerics`` existed,
the odd processes printed exactly the ``cos`` / thread-0 value.

    python benchmarks/vml_race_replay.py          # prints the table
    python benchmarks/vml_race_replay.py --check  # exit 1 unless the HA replay == the normal forward
    python benchmarks/vml_race_replay.py --ep-kernel HA  # the "EP" rows use HA: the premise forced off

The HA replay (the same half recomputed with the accurate kernel ATen asks for) must be
bit-identical to the normal forward; that checks the harness itself. Whether EP moves the
logits depends on the CPU: on some (e.g. AMD EPYC with avx512_bf16) MKL's EP kernel gives the
same bits as HA for these inputs, so the last line says whether it did here.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

from _common import load_images, load_models  # shared plumbing of the benchmark scripts, in this folder

VML_HA, VML_EP = 0x2, 0x3
VML_FTZDAZ_OFF, VML_ERRMODE_IGNORE = 0x00140000, 0x100


def vml(fn: str, x, mode: int):
    """``vms<Fn>`` from the MKL linked into libtorch_cpu (Fortran ILP64 entry point)."""
    import torch

    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    x = x.contiguous().float()
    y = torch.empty_like(x)
    n, m = ctypes.c_int64(x.numel()), ctypes.c_int64(mode | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE)
    getattr(lib, f"VMS{fn.upper()}_64_")(ctypes.byref(n), ctypes.c_void_p(x.data_ptr()),
                                         ctypes.c_void_p(y.data_ptr()), ctypes.byref(m))
    return y


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 unless the HA replay equals the normal forward")
    p.add_argument("--ep-kernel", choices=("EP", "HA"), default="EP",
                   help="kernel behind the rows labelled EP; HA forces 'EP identical to HA' (testing)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    plm = load_models(0)
    images, _ = load_images(2)
    with torch.no_grad():
        soft = plm.soft_tokens(plm.encoder(plm.encoder.preprocess(images)))
        batch = plm.build(soft, [[320, 1345, 282, 253]] * 2)
    model = plm.adapter.model
    rot = getattr(getattr(model, "model", model), "rotary_emb", None)
    if rot is None:
        print("this LM has no shared rotary embedding module; nothing to replay")
        return 1
    replay: dict = {}

    def hook(mod, args_, kwargs, out):
        if not replay:
            return out
        pos = args_[1] if len(args_) > 1 else kwargs["position_ids"]
        inv = mod.inv_freq[None, :, None].float().expand(pos.shape[0], -1, 1)
        emb = torch.cat([(inv @ pos[:, None, :].float()).transpose(1, 2)] * 2, dim=-1)
        new = list(out)
        i = 0 if replay["fn"] == "cos" else 1
        n = emb.numel()
        half = slice(0, (n + 1) // 2) if replay["thread"] == 0 else slice((n + 1) // 2, n)
        flat = new[i].clone().reshape(-1)
        flat[half] = (vml(replay["fn"], emb, replay["mode"]) * mod.attention_scaling).reshape(-1)[half]
        new[i] = flat.view_as(out[i])
        return tuple(new)

    rot.register_forward_hook(hook, with_kwargs=True)

    def logit() -> float:
        with torch.no_grad():
            out = model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask)
        return float(out.logits[0, -1].max())

    base = logit()
    print("| rotary op | thread's half | VML kernel | max logit (image 0, last position) | vs normal |")
    print("|---|---|---|---|---|")
    print(f"| (normal forward) | | | {base:.7f} | |")
    ha_equal, ep_moves = True, False
    for fn in ("cos", "sin"):
        for thread in (0, 1):
            for name, mode in (("HA", VML_HA), ("EP", VML_EP if args.ep_kernel == "EP" else VML_HA)):
                replay.update(fn=fn, thread=thread, mode=mode)
                v = logit()
                replay.clear()
                if name == "HA":
                    ha_equal &= v == base
                else:
                    ep_moves |= v != base
                print(f"| {fn} | {thread} | {name} | {v:.7f} | {v - base:+.2e} |")
    print(f"HA replay bit-identical to the normal forward: {'yes' if ha_equal else 'NO'}")
    print(f"EP replay moves the logits on this CPU: {'yes' if ep_moves else 'no'}")
    return 0 if ha_equal or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
