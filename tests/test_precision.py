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
