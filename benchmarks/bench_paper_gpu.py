"""The paper-shaped DAG on one GPU, stage by stage, with random weights (no download).

Shapes as in the ``paper`` profile: a GPT-J-6B-shaped LM (28 layers, d 4096, MLP 16384,
vocab 50400) in bf16, a BEiT-large-shaped encoder (224², 16² patches: 196 patches of 1024
dims), a roberta-large-shaped BERTScore encoder cut at bert_score's layer 17, a CLIP
ViT-B/32-shaped scorer (open_clip, random weights). Synthetic 224² images, 5 synthetic
reference captions per image (10–14 words), random caption tokens.

Each stage runs the library function its DVC stage runs, on ``--images`` images:

=========  =====================================================================================
caption    ``ImagePrefixLM.image_soft_tokens`` + ``generate`` (batched greedy, KV cache, 16
           tokens): the body of ``mmn.captioning.caption_images`` (spaCy's noun search left out)
attribute  ``mmn.neurons.attribution.attribute_captions`` (k = 100, rank_by unit)
decode     ``mmn.neurons.decode.top_token_ids_all_units`` (all 458 752 units, top 10)
score      ``mmn.experiments.scores.score_tables`` (Table 1 with 5 random draws + Table 2 with
           5 neighbours per soft token, each text against the 5 references; CLIPScore on):
           spaCy's noun sampler for the one ``coco_nouns`` row per image is replaced by
           whitespace words
iou        ``mmn.experiments.iou.collect_activations`` + ``score_iou`` (the image's 100 units and
           5 random draws, against one synthetic mask per image)
ablate     ``mmn.experiments.ablation.ablate_images`` (zero mode, the 9 ``ablate.ks``, 3 kinds,
           regeneration on) + the stage's BERTScore of the regenerated captions; on
           ``--ablate-images`` images (it is per-image work, linear in the count)
=========  =====================================================================================

Per stage it prints images/s, achieved TFLOP/s and the share of the bf16 peak where the
FLOPs are countable (LM: 2·N per token forward, 4·N forward + input-gradient backward;
encoder 2·N per patch token), peak GPU memory, and the linear extrapolation
``t(n) = n / rate`` to 1000 and 5000 images (8 GPUs: ``n / (8 · rate)``, torchrun sharding).
Attribution is also measured in variants side by side (attention backend, batch size,
``torch.compile`` of the attention blocks) with a kernel profile of the best one, and its
peak memory at 64, 128 and 256 images (flat = memory does not grow with the image count).
``--table2-images`` times Table 2 alone (prompt plans + BERTScore) at paper scale.

    python benchmarks/bench_paper_gpu.py                      # on a GPU machine
    python benchmarks/bench_paper_gpu.py --smoke              # anywhere: tiny shapes on CPU

``--smoke`` figures say nothing about GPUs; it keeps the script tested (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

PEAKS_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
KS = [0, 50, 100, 200, 400, 800, 1600, 3200, 6400]
WORDS = [f"word{i}" for i in range(3000)]


class LMTok:
    """Tokenizer stand-in for the random LM: fixed prompt ids, ids decode to their number."""

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
        return " ".join(str(int(i)) for i in ids)


def bert_tokenizer(lm_vocab: int):
    """A BERT word-piece tokenizer over the synthetic words and every LM id's text (built from an
    in-memory vocabulary: no file is needed offline). One token per word or comma, a little fewer
    than roberta's BPE would give; ``[CLS] … [SEP]`` as bert_score expects."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", *WORDS, *(str(i) for i in range(lm_vocab))]
    return BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=False, model_max_length=512)


def _with_default_dtype(dtype: torch.dtype, device: torch.device, make: Callable[[], nn.Module]) -> nn.Module:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return make()
    finally:
        torch.set_default_dtype(prev)


def build(tiny: bool, device: torch.device, dtype: torch.dtype, attn: str = "sdpa"):
    """``(plm, bert, clip, sizes)`` with random weights; ``sizes`` holds parameter counts."""
    from transformers import BeitConfig, BeitModel, GPTJConfig, GPTJForCausalLM, RobertaConfig, RobertaModel

    from mmn.metrics.bertscore import BertScorer
    from mmn.models.adapters import make_adapter
    from mmn.models.prefix_lm import ImagePrefixLM
    from mmn.models.vision import HFPatchEncoder

    torch.manual_seed(0)
    if tiny:
        lm_cfg = GPTJConfig(vocab_size=512, n_positions=512, n_embd=64, n_layer=4, n_head=4, rotary_dim=8, n_inner=256)
        enc_cfg = BeitConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64)
        bert_cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        image_size, grid = 32, 4
    else:
        lm_cfg = GPTJConfig(vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
                            n_inner=16384)
        enc_cfg = BeitConfig(image_size=224, patch_size=16, hidden_size=1024, num_hidden_layers=24,
                             num_attention_heads=16, intermediate_size=4096, use_mask_token=True)
        bert_cfg = dict(hidden_size=1024, num_hidden_layers=17, num_attention_heads=16, intermediate_size=4096)
        image_size, grid = 224, 14
    lm = _with_default_dtype(dtype, device, lambda: GPTJForCausalLM(lm_cfg)).eval().requires_grad_(False)
    set_attn(lm, attn)
    enc_model = _with_default_dtype(dtype, device, lambda: BeitModel(enc_cfg, add_pooling_layer=False))
    enc = HFPatchEncoder(enc_model, grid=grid, image_size=image_size).requires_grad_(False)
    tok = LMTok(lm_cfg.vocab_size)
    ad = make_adapter(lm, vocab_size=50257 if not tiny else 500)
    proj = nn.Linear(enc_cfg.hidden_size, lm_cfg.n_embd, device=device, dtype=dtype)
    plm = ImagePrefixLM(ad, tok, proj, encoder=enc)
    btok = bert_tokenizer(lm_cfg.vocab_size)
    bmodel = RobertaModel(RobertaConfig(vocab_size=len(btok), max_position_embeddings=514, pad_token_id=0,
                                        **bert_cfg), add_pooling_layer=False).to(device)
    # fp32 weights, bf16 autocast on a GPU: as the score stage runs BERTScore in the LM's dtype
    bert = BertScorer(bmodel, btok, "roberta-large-shaped (random, 17 layers)", batch_size=256 if not tiny else 8,
                      dtype=dtype if device.type == "cuda" else torch.float32)
    clip = build_clip(tiny, device)
    sizes = {"lm": sum(p.numel() for p in lm.parameters()), "enc": sum(p.numel() for p in enc.parameters()),
             "bert": sum(p.numel() for p in bmodel.parameters()), "n_patch": grid * grid,
             "attn": getattr(lm.config, "_attn_implementation", "unknown")}
    return plm, bert, clip, sizes


def set_attn(model, impl: str) -> str:
    """Ask for attention ``impl``; returns what is in use (transformers < 5.2x has no SDPA for GPT-J)."""
    try:
        model.set_attn_implementation(impl)
    except (ValueError, ImportError) as e:
        print(f"attention {impl!r} not available here: {str(e)[:120]}", flush=True)
    return getattr(model.config, "_attn_implementation", "unknown")


def build_clip(tiny: bool, device: torch.device):
    """CLIP ViT-B/32 shape through open_clip (random weights), wrapped as the score stage does."""
    import open_clip

    from mmn.metrics.clipscore import ClipScorer

    name = "ViT-B-32"
    if tiny:
        model = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "patch_size": 16, "width": 32, "layers": 1,
                                                         "head_width": 16},
                               text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                                         "layers": 1})
        preprocess = open_clip.image_transform(32, is_train=False)
    else:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    return ClipScorer.from_model(model.to(device), preprocess, open_clip.get_tokenizer(name), device=device,
                                 description=f"{name}-shaped (random)", batch_size=256 if not tiny else 8)


# ----------------------------------------------------------------------------- synthetic data


class Data:
    """Synthetic images (seeded noise, 224²), 5 references and a caption per image id."""

    def __init__(self, n: int, image_size: int, vocab: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.size = image_size
        self.ids = list(range(1, n + 1))
        self.refs = {i: [" ".join(rng.choice(WORDS, size=int(rng.integers(10, 15)))) for _ in range(5)]
                     for i in self.ids}
        # caption tokens before c: 2..5 tokens (a short caption prefix, as COCO's "a dog ..."); then c
        self.texts = {i: rng.integers(100, vocab - 100, size=2 + i % 4).tolist() for i in self.ids}
        self.targets = {i: int(rng.integers(100, vocab - 100)) for i in self.ids}

    def load_image(self, image_id: int) -> Image.Image:
        rng = np.random.default_rng(image_id)
        return Image.fromarray(rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8))

    def captions(self, n: int):
        """The caption stage's table for the first ``n`` images (every one with a target)."""
        import polars as pl

        from mmn.captioning import CAPTION_SCHEMA

        rows = []
        for i in self.ids[:n]:
            ids = self.texts[i] + [self.targets[i]] + [7, 8]
            pos = len(self.texts[i])
            rows.append({"image_id": i, "file_name": f"{i}.jpg", "caption": "synthetic", "caption_token_ids": ids,
                         "n_caption_tokens": len(ids), "has_noun": True, "noun": "thing",
                         "target_token_id": ids[pos], "target_token": str(ids[pos]), "target_pos": pos,
                         "p_target": 0.5})
        return pl.DataFrame(rows, schema=CAPTION_SCHEMA)


# ----------------------------------------------------------------------------- timing


class Bench:
    def __init__(self, device: torch.device, peak: float) -> None:
        self.device, self.peak = device, peak
        self.rows: list[dict] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def timed(self, stage: str, n_images: int, flops: float | None = None, per_image: bool = True):
        """Time the block; record images/s, TFLOP/s, % of peak, peak GPU memory."""
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        box: dict = {}
        yield box
        self.sync()
        dt = time.perf_counter() - t0
        flops = box.get("flops", flops)
        tf = flops / dt / 1e12 if flops else None
        mem = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else float("nan")
        row = {"stage": stage, "n": n_images, "s": dt, "img_s": n_images / dt if per_image else None, "tflops": tf,
               "peak": (100 * tf / self.peak) if tf and self.peak == self.peak else None, "gib": mem,
               "note": box.get("note", "")}
        self.rows.append(row)
        print(fmt_row(row), flush=True)


def fmt_row(r: dict) -> str:
    """One markdown table row; ``-`` where a figure does not apply."""
    def f(v, spec):
        return format(v, spec) if v is not None and v == v else "-"

    t1000, t5000 = (1000 / r["img_s"], 5000 / r["img_s"]) if r["img_s"] else (r["s"], r["s"])
    return (f"| {r['stage']} | {r['n']} | {r['s']:.2f} | {f(r['img_s'], '.2f')} | {f(r['tflops'], '.1f')} | "
            f"{f(r['peak'], '.1f')} | {f(r['gib'], '.1f')} | {t1000:.1f} | {t5000:.1f} | {r['note']} |")


HEADER = ("| stage | images | s | img/s | TFLOP/s | % bf16 peak | peak GiB | t(1000) s | t(5000) s | note |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


# ----------------------------------------------------------------------------- stages


def lm_tokens(plm, data: Data, n: int, extra: int = 0) -> int:
    """Positions the LM processes for ``n`` images' prefix + caption tokens (+ ``extra`` each)."""
    n_prefix = plm.n_prefix(plm.encoder.n_patches)
    return sum(n_prefix + len(data.texts[i]) + extra for i in data.ids[:n])


def stage_caption(b: Bench, plm, data: Data, n: int, batch: int, sizes: dict, new_tokens: int = 16) -> None:
    with b.timed("caption (batched greedy, KV cache)", n) as box:
        for s in range(0, n, batch):
            ids = data.ids[s: s + batch]
            soft = plm.image_soft_tokens([data.load_image(i) for i in ids])
            plm.generate(soft, new_tokens, set())  # no stop ids: exactly new_tokens steps
        n_prefix = plm.n_prefix(plm.encoder.n_patches)
        box["flops"] = n * (2 * sizes["lm"] * (n_prefix + new_tokens) + 2 * sizes["enc"] * (sizes["n_patch"] + 1))
        box["note"] = f"batch {batch}, {new_tokens} new tokens"


def stage_attribute(b: Bench, plm, data: Data, n: int, batch: int, sizes: dict, label: str = "attribute") -> None:
    from mmn.neurons.attribution import attribute_captions

    caps = data.captions(n)
    with b.timed(label, n) as box:
        out = attribute_captions(caps, data.load_image, plm, k=100, batch_size=batch, progress=False)
        box["flops"] = 4 * sizes["lm"] * lm_tokens(plm, data, n) + 2 * sizes["enc"] * (sizes["n_patch"] + 1) * n
        box["note"] = f"batch {batch}, k 100, {sizes['attn']} attention"
    return out


def attribution_core(b: Bench, plm, data: Data, n: int, batch: int, sizes: dict, label: str) -> float:
    """``attribute_topk`` alone on precomputed soft tokens (the part the 40% target is about)."""
    from mmn.neurons.attribution import attribute_topk

    feats = torch.randn(batch, sizes["n_patch"], plm.projection.in_features, device=b.device,
                        dtype=plm.projection.weight.dtype)
    soft = plm.soft_tokens(feats).detach()
    ids = data.ids[:batch]
    texts, targets = [data.texts[i] for i in ids], [data.targets[i] for i in ids]
    attribute_topk(plm, soft, texts, targets, 100)  # warm-up (and compilation, if any)
    reps = max(1, n // batch)
    with b.timed(label, reps * batch) as box:
        for _ in range(reps):
            attribute_topk(plm, soft, texts, targets, 100)
        box["flops"] = reps * 4 * sizes["lm"] * lm_tokens(plm, data, batch)
        box["note"] = f"batch {batch}, soft tokens precomputed"
    return b.rows[-1]["peak"] or 0.0


def stage_decode(b: Bench, plm, sizes: dict) -> None:
    from mmn.neurons.decode import top_token_ids_all_units

    ad = plm.adapter
    with b.timed("decode (all units, top 10)", 0, per_image=False) as box:
        top_token_ids_all_units(ad, top_n=10)
        box["flops"] = 2.0 * ad.n_layers * ad.d_mlp * ad.d_model * ad.unembed_weight().shape[0]
        box["note"] = f"{ad.n_layers * ad.d_mlp} units, fp32 matmuls; once per LM, not per image"


def neurons_table(plm, attributions):
    """The filter stage's table for the attributed units: decoded = 10 token texts; every
    second unit (by unit id) interpretable, about the paper's share."""
    import polars as pl

    from mmn.neurons.decode import top_token_ids_all_units

    top = top_token_ids_all_units(plm.adapter, top_n=10)
    units = attributions.select("layer", "unit").unique().sort(["layer", "unit"])
    dec = [", ".join(str(t) for t in top[l, u].tolist()) for l, u in units.iter_rows()]
    return units.with_columns(pl.Series("decoded", dec), (pl.col("unit") % 2 == 0).alias("interpretable"))


def stage_score(b: Bench, plm, bert, clip, data: Data, n: int, attributions) -> None:
    import mmn.experiments.scores as scores

    scores.nouns = lambda text: text.split()  # spaCy is not on the GPU image; 1 row per image
    neurons = neurons_table(plm, attributions)
    caps = data.captions(n)
    with b.timed("score (Table 1 + Table 2, BERTScore + CLIP)", n) as box:
        df, _ = scores.score_tables(caps, attributions, neurons, data.refs, data.load_image, plm, bert, clip,
                                 random_draws=5, prompt_neighbours=5, seed=0)
        t1 = int((df["table"] == "table1").sum())
        box["note"] = (f"{t1} Table-1 + {df.height - t1} Table-2 texts x 5 refs; bert {bert.dtype}; "
                       f"ref cache {len(bert._refs)}")


def stage_table2(b: Bench, plm, bert, data: Data, n: int) -> None:
    """Table 2 alone (prompt plans + BERTScore against the 5 references), CLIP off."""
    import mmn.experiments.scores as scores

    sc = scores._Scorer(bert, None, data.load_image, data.refs)
    with b.timed("Table 2 alone (prompts + BERTScore)", n) as box:
        pairs = 0
        for plan in scores.prompt_plans(plm, data.ids[:n], data.load_image, 5, 0):
            sc.score(plan["image_id"].to_list(), plan["text"].to_list())
            pairs += plan.height * 5
        box["note"] = f"{pairs} candidate/reference pairs"


def stage_iou(b: Bench, plm, data: Data, n: int, attributions) -> None:
    from mmn.experiments.iou import collect_activations, grids_dict, iou_plan, needed_units, score_iou

    ad = plm.adapter
    imgs = data.ids[:n]
    masks = {}
    for i in imgs:  # one synthetic object box per image
        m = np.zeros((224, 224), dtype=bool)
        m[40 + i % 50: 140 + i % 50, 60: 180] = True
        masks[(i, "thing")] = m
    with b.timed("iou (activations + receptive fields)", n) as box:
        plan = iou_plan({"thing": imgs}, attributions, top_units=None, random_draws=5, d_mlp=ad.d_mlp, seed=0)
        grids, _ = collect_activations(needed_units(plan, "image"), [], set(), data.load_image, plm, progress=False)
        df = score_iou(plan, grids_dict(grids), masks, grid=plm.encoder.grid)
        box["note"] = f"{df.height} unit maps scored"


def stage_ablate(b: Bench, plm, bert, data: Data, n: int, sizes: dict) -> None:
    from mmn.experiments.ablation import ablate_images

    ad = plm.adapter
    interp = torch.zeros(ad.n_layers, ad.d_mlp, dtype=torch.bool)
    interp[:, ::2] = True
    caps = data.captions(n)
    ks = KS if ad.d_mlp * ad.n_layers > 6400 else [0, 5, 10, 20]
    with b.timed("ablate (9 ks x 3 kinds, regenerate)", n) as box:
        df = ablate_images(caps, data.load_image, plm, interp, ks=ks, progress=False, stop_at_newline=False)
        f1 = bert.f1([c or "" for c in df["caption"].to_list()], ["0 1 2"] * df.height)
        rows = df.height // n + 1
        box["flops"] = n * (4 * sizes["lm"] * lm_tokens(plm, data, 1)  # ranking: forward + input-gradient backward
                            + 2 * sizes["lm"] * rows * lm_tokens(plm, data, 1)  # the rows' forward
                            + 2 * sizes["lm"] * (rows - 1) * (lm_tokens(plm, data, 1) + 16))  # regeneration
        box["note"] = f"{rows} rows per image, {len(f1)} regenerated captions BERTScored"


# ----------------------------------------------------------------------------- main


def attention_backends() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    b = torch.backends.cuda
    return (f"flash {b.flash_sdp_enabled()}, mem_efficient {b.mem_efficient_sdp_enabled()}, "
            f"cudnn {b.cudnn_sdp_enabled()}, math {b.math_sdp_enabled()}")


def sdpa_kernel_used(plm, sizes: dict, device: torch.device) -> str:
    """The SDPA kernel(s) one attribution forward+backward launches, from the profiler."""
    if device.type != "cuda":
        return "n/a on CPU"
    from torch.profiler import ProfilerActivity, profile

    from mmn.neurons.attribution import attribute_topk

    feats = torch.randn(2, sizes["n_patch"], plm.projection.in_features, device=device,
                        dtype=plm.projection.weight.dtype)
    soft = plm.soft_tokens(feats).detach()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        attribute_topk(plm, soft, [[21, 22], [23, 24, 25]], [31, 32], 100)
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    hits = sorted(n for n in names if any(s in n.lower() for s in ("flash", "fmha", "efficient_attention", "cudnn",
                                                                    "softmax")))
    return "; ".join(h[:70] for h in hits[:4]) or "no attention kernel matched"


def compile_attention(plm) -> None:
    """``torch.compile`` each block's attention (the MLP keeps its hooks, which compile would break)."""
    for blk in plm.adapter.blocks():
        blk.attn = torch.compile(blk.attn, dynamic=True)


def profile_table(plm, sizes: dict, data: Data, batch: int, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile

    from mmn.neurons.attribution import attribute_topk

    feats = torch.randn(batch, sizes["n_patch"], plm.projection.in_features, device=device,
                        dtype=plm.projection.weight.dtype)
    soft = plm.soft_tokens(feats).detach()
    ids = data.ids[:batch]
    texts, targets = [data.texts[i] for i in ids], [data.targets[i] for i in ids]
    attribute_topk(plm, soft, texts, targets, 100)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        attribute_topk(plm, soft, texts, targets, 100)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=58), flush=True)


def run_stage(name: str, fn: Callable[[], object]):
    """Run one stage; a failure is printed and the next stage still runs (the run reports all)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - report and go on: a partial run still shows the other stages
        print(f"{name}: FAILED: {type(e).__name__}: {e}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (keeps the script tested)")
    ap.add_argument("--images", type=int, default=256, help="images per stage")
    ap.add_argument("--score-images", type=int, default=128, help="score stage images (Table 1 + 2, CLIP)")
    ap.add_argument("--iou-images", type=int, default=32, help="iou stage images (numpy receptive fields)")
    ap.add_argument("--ablate-images", type=int, default=16)
    ap.add_argument("--table2-images", type=int, default=1000, help="0 = skip the Table-2-alone run")
    ap.add_argument("--batch", type=int, default=64, help="caption/attribute batch")
    ap.add_argument("--variant-batches", default="32,64,128", help="attribution core batches (sdpa)")
    ap.add_argument("--memory-sizes", default="64,128,256")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--attribution-only", action="store_true", help="only the side-by-side attribution variants")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    if not gpu:
        args.images, args.ablate_images, args.table2_images = min(args.images, 8), min(args.ablate_images, 2), 0
        args.score_images, args.iou_images = min(args.score_images, 4), min(args.iou_images, 2)
        args.batch, args.variant_batches, args.memory_sizes = 4, "2,4", "2,4,8"
        args.no_compile = True  # inductor on 2 CPU cores takes minutes; the GPU run tries it
    name = torch.cuda.get_device_name(0) if gpu else "CPU (tiny shapes: not a GPU figure)"
    peak = args.peak_tflops or next((v for k, v in PEAKS_BF16_TFLOPS.items() if k in name), float("nan"))
    t_build = time.perf_counter()
    plm, bert, clip, sizes = build(not gpu, device, dtype)
    print(f"device: {name}; torch {torch.__version__}; dtype {dtype}; bf16 peak {peak} TFLOP/s")
    print(f"models (random weights): LM {sizes['lm'] / 1e9:.3f} B params, encoder {sizes['enc'] / 1e6:.0f} M, "
          f"BERTScore {sizes['bert'] / 1e6:.0f} M; {sizes['n_patch']} patches; built in "
          f"{time.perf_counter() - t_build:.1f} s")
    print(f"LM attention implementation: {sizes['attn']}; SDPA backends enabled: {attention_backends()}")
    print(f"attention kernels launched: {sdpa_kernel_used(plm, sizes, device)}", flush=True)
    data = Data(max(args.images, max(int(x) for x in args.memory_sizes.split(",")), args.table2_images),
                plm.encoder.image_size, plm.adapter.vocab_size)
    b = Bench(device, peak)

    print("\n== attribution core (attribute_topk on precomputed soft tokens), side by side", flush=True)
    print(HEADER)
    best = (0.0, args.batch)
    set_attn(plm.adapter.model, "eager")
    run_stage("eager", lambda: attribution_core(b, plm, data, 4 * args.batch, args.batch, sizes,
                                                f"attribution core, eager attention"))
    sizes["attn"] = set_attn(plm.adapter.model, "sdpa")
    for bs in [int(x) for x in args.variant_batches.split(",")]:
        pk = run_stage(f"sdpa {bs}", lambda: attribution_core(b, plm, data, max(4 * bs, 256), bs, sizes,
                                                              f"attribution core, {sizes['attn']}, batch {bs}"))
        if pk and pk > best[0]:
            best = (pk, bs)
    if not args.no_compile:
        originals = [blk.attn for blk in plm.adapter.blocks()]
        compile_attention(plm)
        bs = best[1]
        pk = run_stage("compiled", lambda: attribution_core(b, plm, data, max(4 * bs, 256), bs, sizes,
                                                            f"attribution core, sdpa + compiled attn, batch {bs}"))
        for blk, orig in zip(plm.adapter.blocks(), originals):
            blk.attn = orig
        print(f"compiled attention {'kept' if pk and pk > best[0] else 'not kept'} for the stages below", flush=True)
        if pk and pk > best[0]:
            compile_attention(plm)
            best = (pk, bs)
    print(f"best attribution: {best[0]:.1f}% of the bf16 peak at batch {best[1]} "
          f"(target >= 40%: {'met' if best[0] >= 40 else 'NOT met'})", flush=True)
    run_stage("profile", lambda: profile_table(plm, sizes, data, best[1], device))
    if args.attribution_only:
        return 0

    print("\n== stages (the DVC stages' library functions)", flush=True)
    print(HEADER)
    n = args.images
    run_stage("caption", lambda: stage_caption(b, plm, data, n, args.batch, sizes))
    attributions = run_stage("attribute", lambda: stage_attribute(b, plm, data, n, best[1], sizes))
    run_stage("decode", lambda: stage_decode(b, plm, sizes))
    if attributions is not None:
        some = set(data.ids[: max(args.score_images, args.iou_images)])
        first = attributions.filter(attributions["image_id"].is_in(list(some)))
        run_stage("score", lambda: stage_score(b, plm, bert, clip, data, args.score_images,
                                               first.filter(first["image_id"] <= args.score_images)))
        run_stage("iou", lambda: stage_iou(b, plm, data, args.iou_images,
                                           first.filter(first["image_id"] <= args.iou_images)))
    run_stage("ablate", lambda: stage_ablate(b, plm, bert, data, args.ablate_images, sizes))
    if args.table2_images:
        run_stage("table2", lambda: stage_table2(b, plm, bert, data, args.table2_images))

    print("\n== peak GPU memory of the attribute stage vs the number of images", flush=True)
    print(HEADER)
    for m in [int(x) for x in args.memory_sizes.split(",")]:
        run_stage(f"memory {m}", lambda: stage_attribute(b, plm, data, m, best[1], sizes, f"attribute, {m} images"))

    per_image = {r["stage"]: r for r in b.rows if r["img_s"] and not r["stage"].startswith(("attribution core",
                                                                                               "attribute,",
                                                                                               "Table 2 alone"))}
    fixed = sum(r["s"] for r in b.rows if r["stage"].startswith("decode"))
    if per_image:
        total = sum(1 / r["img_s"] for r in per_image.values())  # seconds per image, all per-image stages
        print("\n== whole DAG, extrapolated linearly: t(n) = n * sum_stages(1 / rate) + decode "
              f"= n * {total:.4f} s + {fixed:.1f} s")
        for nn_ in (1000, 5000):
            print(f"  {nn_} images: 1 GPU {(nn_ * total + fixed) / 60:.1f} min; 8 GPUs (torchrun, images sharded, "
                  f"decode on each) {(nn_ * total / 8 + fixed) / 60:.1f} min; model loading not included")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
