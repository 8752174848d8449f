"""bf16 against the fp32 reference on a tiny model: same top units, correlated g."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from mmn.models.lm import prepare_lm
from mmn.models.prefix_lm import ImagePrefixLM
from mmn.neurons.attribution import attribution_maps, top_k

from conftest import tiny_lm

# stated bounds: Pearson(g_bf16, g_fp32) over all (layer, patch, unit) >= 0.98;
# top-20 overlap >= 70%
MIN_CORR, MIN_OVERLAP, K = 0.98, 0.7, 20


@pytest.mark.parametrize("family", ["gptj", "gpt2", "llama"])
def test_bf16_attribution_matches_fp32(tokenizer, family):
    model = tiny_lm(family, len(tokenizer), seed=3)
    # scale weights up so activations are not all in the linear regime of tiny inits
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    ad32, tok = prepare_lm(model, tokenizer)
    ad16, _ = prepare_lm(copy.deepcopy(model).to(torch.bfloat16), tokenizer)
    torch.manual_seed(0)
    proj = nn.Linear(12, ad32.d_model)
    feats = torch.randn(2, 9, 12) * 2
    texts = [tok(" a cat on the").input_ids, tok(" two small").input_ids]
    targets = [tok(" mat").input_ids[0], tok(" dogs").input_ids[0]]
    res = {}
    for name, ad in (("fp32", ad32), ("bf16", ad16)):
        plm = ImagePrefixLM(ad, tok, copy.deepcopy(proj).to(ad.dtype))
        _, a, g = attribution_maps(plm, plm.soft_tokens(feats).detach(), texts, targets)
        res[name] = (a, g)
    g32 = (res["fp32"][0] * res["fp32"][1]).flatten().numpy()
    g16 = (res["bf16"][0] * res["bf16"][1]).flatten().numpy()
    corr = float(np.corrcoef(g32, g16)[0, 1])
    assert corr >= MIN_CORR, f"Pearson(g_bf16, g_fp32) = {corr:.4f}"
    t32, t16 = top_k(*res["fp32"], K), top_k(*res["bf16"], K)
    for a, b in zip(t32, t16):
        s32 = set(zip(a.layer.tolist(), a.patch.tolist(), a.unit.tolist()))
        s16 = set(zip(b.layer.tolist(), b.patch.tolist(), b.unit.tolist()))
        overlap = len(s32 & s16) / K
        assert overlap >= MIN_OVERLAP, f"top-{K} overlap {overlap:.2f}"


@pytest.mark.parametrize("rank_by", ["unit", "triple"])
def test_half_precision_g_is_ranked_on_fp32_products(rank_by):
    """fp16 factors whose products underflow in fp16 (1e-4 x 1e-4 < 6e-8): ranked on fp32
    products, the order is the fp32 reference's; ranked in fp16 every product is 0 and the units
    tie (the old ranking: index order)."""
    from mmn.neurons.attribution import _layer_candidates

    gen = torch.Generator().manual_seed(0)
    a = (torch.rand(2, 3, 40, generator=gen) * 1e-4).half()
    g = (torch.rand(2, 3, 40, generator=gen) * 1e-4).half()
    assert float((a * g).abs().max()) == 0.0  # the fp16 products underflow
    _, idx, _, _ = _layer_candidates(a, g, 10, rank_by)
    ref = a.float() * g.float()
    for r in range(2):
        want = (torch.sort(ref[r].amax(0), descending=True, stable=True).indices[:10] if rank_by == "unit" else
                torch.sort(ref[r].reshape(-1), descending=True, stable=True).indices[:10])
        got = idx[r] % 40 if rank_by == "unit" else idx[r]
        assert got.tolist() == want.tolist()
        assert got.tolist() != list(range(10))  # not the index order that ties give


@pytest.mark.parametrize("SCALE", [1.0, 1e-5])
def test_fp16_top_units_overlap_fp32_more_when_ranked_in_fp32(tokenizer, capsys, SCALE):
    """Measured: on a tiny fp16 Llama (CPU) the top-100 units by g against the fp32 model's,
    ranked on fp16 products (before) and on fp32 products of the same fp16 tensors (after). The
    unembedding is also scaled by 1e-5 so that dy/dA is as small as in a large LM (a tiny random
    model's gradients are large), which is where fp16 products underflow."""
    from mmn.neurons.scoring import unit_scores

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=512,
                                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2)).eval()
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():  # 3 x 512 units: the top 100 are a real choice
        model.lm_head.weight.mul_(SCALE)
    ad32, tok = prepare_lm(model, tokenizer)
    ad16, _ = prepare_lm(copy.deepcopy(model).to(torch.float16), tokenizer)
    torch.manual_seed(0)
    proj = nn.Linear(12, ad32.d_model)
    feats = torch.randn(1, 9, 12) * 2
    text, target = [tok(" a cat on the").input_ids], [tok(" mat").input_ids[0]]
    maps = {}
    for name, ad in (("fp32", ad32), ("fp16", ad16)):
        plm = ImagePrefixLM(ad, tok, copy.deepcopy(proj).to(ad.dtype))
        soft = plm.soft_tokens(feats.to(ad.dtype)).detach()
        from mmn.neurons.methods import grad_x_act_pass

        _, acts, grads, sl = grad_x_act_pass(plm, soft, text, target, False)
        maps[name] = [(x[0, sl].detach(), y[0, sl].detach()) for x, y in zip(acts, grads)]
        if name == "fp16":
            import mmn.neurons.methods as M

            old = M.FP16_LOSS_SCALE
            try:
                M._loss_scaled_grad.__defaults__ = (1.0,)  # the old backward: no loss scaling
                _, acts, grads, sl = grad_x_act_pass(plm, soft, text, target, False)
            finally:
                M._loss_scaled_grad.__defaults__ = (old,)
            maps["fp16_unscaled"] = [y[0, sl].detach() for y in grads]

    def top(pairs, dtype) -> set:
        s = torch.stack([unit_scores(a.to(dtype), g.to(dtype)).float() for a, g in pairs])  # [L, U]
        order = torch.sort(s.reshape(-1), descending=True, stable=True).indices[:100]
        return set(order.tolist())

    ref = top(maps["fp32"], torch.float32)
    # before: fp16 products of the gradients that the fp16 backward without loss scaling gives (the old path)
    unscaled = [(a, g.half()) for (a, _), g in zip(maps["fp16"], maps["fp16_unscaled"])]
    before = len(top(unscaled, torch.float16) & ref) / 100
    after = len(top(maps["fp16"], torch.float32) & ref) / 100
    with capsys.disabled():
        print(f"\nunembedding x {SCALE:g}: top-100 overlap with fp32: fp16 model, no loss scaling, ranked in fp16 "
              f"{before:.2f}; loss-scaled backward ranked on fp32 products {after:.2f}")
    assert after >= before and after >= 0.9


def test_loss_scaled_fp16_backward_recovers_tiny_gradients_and_survives_overflow():
    """_loss_scaled_grad: a gradient of 1e-9 (0 in a plain fp16 backward) comes back in fp32;
    a graph whose scaled gradient overflows fp16 is redone at a smaller scale, still exact."""
    from mmn.neurons.methods import _loss_scaled_grad

    x = torch.full((4,), 0.5, dtype=torch.float16, requires_grad=True)
    y = (x * torch.tensor(1e-4, dtype=torch.float16)) * torch.tensor(1e-5, dtype=torch.float16)
    assert float(torch.autograd.grad(y.sum(), [x], retain_graph=True)[0].abs().max()) == 0.0  # flushed to 0
    (g,) = _loss_scaled_grad(y.sum(), [x])
    assert g.dtype == torch.float32 and torch.allclose(g, torch.full((4,), 1e-9), rtol=0.05)
    z = torch.full((4,), 2.0, dtype=torch.float16, requires_grad=True)
    big = (z * 1000.0).sum()  # d/dz = 1000; x 2**16 overflows fp16 (max 65504)
    (gz,) = _loss_scaled_grad(big, [z])
    assert torch.equal(gz, torch.full((4,), 1000.0))
