"""GPU benchmark: attribution and captioning on a GPT-J-shaped model with random weights.

GPT-J 6B shape (28 layers, d_model 4096, MLP 16384, 16 heads, rotary 64, vocab 50400),
bf16, random weights (no download), 196 soft tokens + ``A picture of`` (199 prefix
positions) + a few caption tokens per image. Prints, per batch size:

* attribution images/s (one forward + one input-gradient backward + per-layer top-k),
  achieved TFLOP/s counted as 4 · N_params · tokens per image (forward 2N, backward to
  the inputs 2N; parameter gradients are never computed), and the fraction of the
  card's dense bf16 peak (``--peak-tflops``, default from the card name);
* peak GPU memory;
* caption tokens/s (batched greedy, KV cache, 16 new tokens).

Without a GPU (or with ``--smoke``) it runs a tiny config on the CPU so the script
itself stays tested; those figures say nothing about GPUs.

    python benchmarks/bench_gpu.py                 # on a GPU machine
    python benchmarks/bench_gpu.py --smoke         # anywhere, tiny
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

PEAKS_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


class _Tok:
    """Minimal tokenizer stand-in: fixed ids (the benchmark needs shapes, not text)."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.bos_token_id = None
        self.eos_token_id = vocab - 1
        self.pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False):
        class R:
            input_ids = [11, 12, 13][: max(1, min(3, len(text.split())))]

        return R()

    def __len__(self) -> int:
        return self.vocab

    def decode(self, ids) -> str:
        return " ".join(str(i) for i in ids)


def build(tiny: bool, device: torch.device, dtype: torch.dtype):
    from transformers import GPTJConfig, GPTJForCausalLM

    from mmn.models.adapters import make_adapter
    from mmn.models.prefix_lm import ImagePrefixLM

    if tiny:
        cfg = GPTJConfig(vocab_size=512, n_positions=512, n_embd=64, n_layer=4, n_head=4, rotary_dim=8, n_inner=256)
        n_patch = 16
    else:
        cfg = GPTJConfig(vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
                         n_inner=16384)
        n_patch = 196
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = GPTJForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.eval().requires_grad_(False)
    try:
        model.set_attn_implementation("sdpa")
    except Exception:  # noqa: BLE001 - some models only support eager; report what is in use
        pass
    attn = getattr(model.config, "_attn_implementation", "unknown")
    n_params = sum(p.numel() for p in model.parameters())
    tok = _Tok(cfg.vocab_size)
    ad = make_adapter(model, vocab_size=50257 if not tiny else 500)
    proj = nn.Linear(1024 if not tiny else 32, cfg.n_embd, device=device, dtype=dtype)
    plm = ImagePrefixLM(ad, tok, proj)
    return plm, n_params, n_patch, attn


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_attribution(plm, n_patch: int, batch: int, iters: int, device, k: int = 100):
    from mmn.neurons.attribution import attribute_topk

    feats = torch.randn(batch, n_patch, plm.projection.in_features, device=device, dtype=plm.projection.weight.dtype)
    soft = plm.soft_tokens(feats).detach()
    texts = [[21, 22, 23, 24, 25][: 2 + (i % 4)] for i in range(batch)]  # 2..5 caption tokens, padded
    targets = [31 + i for i in range(batch)]
    attribute_topk(plm, soft, texts, targets, k)  # warm-up
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        attribute_topk(plm, soft, texts, targets, k)
    sync(device)
    dt = (time.perf_counter() - t0) / iters
    tokens = sum(len(plm.bos_ids) + n_patch + len(plm.prompt_ids) + len(t) for t in texts)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return batch / dt, tokens / batch, mem


def bench_caption(plm, n_patch: int, batch: int, device, new_tokens: int = 16):
    feats = torch.randn(batch, n_patch, plm.projection.in_features, device=device, dtype=plm.projection.weight.dtype)
    soft = plm.soft_tokens(feats).detach()
    plm.generate(soft, 2, set())
    sync(device)
    t0 = time.perf_counter()
    plm.generate(soft, new_tokens, set())  # no stop ids: exactly new_tokens steps
    sync(device)
    return batch * new_tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny config on CPU")
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--profile", type=int, default=0, help="print the top CUDA kernels for this batch size")
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    name = torch.cuda.get_device_name(0) if gpu else "CPU (tiny config: not a GPU figure)"
    peak = args.peak_tflops or next((v for kname, v in PEAKS_BF16_TFLOPS.items() if kname in name), float("nan"))
    plm, n_params, n_patch, attn = build(not gpu, device, dtype)
    print(f"device: {name}; torch {torch.__version__}; dtype {dtype}; attention {attn}")
    print(f"model: {n_params} params (GPT-J-shaped, {n_params / 1e9:.3f} B), {n_patch} soft tokens; "
          f"bf16 peak {peak} TFLOP/s")
    batches = [int(b) for b in (args.batches if gpu else "1,2,4").split(",")]
    print(f"{'batch':>5} {'attr img/s':>11} {'tokens/img':>10} {'TFLOP/s':>9} {'% peak':>7} {'peak GiB':>9} "
          f"{'caption tok/s':>13}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        from mmn.neurons.attribution import attribute_topk

        b = args.profile
        feats = torch.randn(b, n_patch, plm.projection.in_features, device=device, dtype=dtype)
        soft = plm.soft_tokens(feats).detach()
        texts, targets = [[21, 22, 23]] * b, [31] * b
        attribute_topk(plm, soft, texts, targets, 100)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with profile(activities=acts) as prof:
            attribute_topk(plm, soft, texts, targets, 100)
            sync(device)
        key = "cuda_time_total" if gpu else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))
    best = None
    for b in batches:
        try:
            ips, tpi, mem = bench_attribution(plm, n_patch, b, args.iters if gpu else 1, device)
            cps = bench_caption(plm, n_patch, b, device, 16 if gpu else 4)
        except torch.OutOfMemoryError:
            print(f"{b:>5} out of memory")
            torch.cuda.empty_cache()
            break
        tflops = 4 * n_params * tpi * ips / 1e12
        frac = 100 * tflops / peak if peak == peak else float("nan")
        print(f"{b:>5} {ips:>11.2f} {tpi:>10.0f} {tflops:>9.4f} {frac:>6.1f}% {mem:>9.1f} {cps:>13.1f}")
        if best is None or ips > best[1]:
            best = (b, ips, frac)
    if best:
        print(f"best: batch {best[0]}: {best[1]:.2f} images/s, {best[2]:.1f}% of bf16 peak "
              f"(target >= 40% on H100/H200: {'met' if best[2] >= 40 else 'NOT met'})")
        if gpu:
            for n in (5000,):
                print(f"extrapolated attribution time for {n} images: {n / best[1] / 60:.1f} min on 1 GPU, "
                      f"{n / best[1] / 60 / 8:.1f} min on 8 (linear sharding)")


if __name__ == "__main__":
    main()
