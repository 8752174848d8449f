"""Ablation hooks: exact zero/mean at the image positions, nothing else touched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mmn.hooks import TraceDict
from mmn.models.prefix_lm import ImagePrefixLM
from mmn.neurons.ablation import ablated, rank_units, random_like, target_probs, unit_masks, unit_scores

N_PATCH, D_ENC = 6, 12


@pytest.fixture(params=["gptj", "gpt2", "llama"])
def setup(request, tiny_adapters):
    ad, tok = tiny_adapters[request.param]
    torch.manual_seed(0)
    plm = ImagePrefixLM(ad, tok, nn.Linear(D_ENC, ad.d_model))
    soft = plm.soft_tokens(torch.randn(1, N_PATCH, D_ENC) * 2).detach()
    text = tok(" a cat on the").input_ids
    target = tok(" mat").input_ids[0]
    return plm, soft, text, target


def _acts(plm, soft, text, masks, fill=None):
    rows = masks.shape[1]
    batch = plm.build(soft.expand(rows, -1, -1), [text] * rows)
    ad = plm.adapter
    with torch.no_grad(), ablated(ad, masks, batch.image_slice, fill), \
            TraceDict(ad.act_modules(), retain_input=True) as tr:
        plm.logits(batch)
    return batch, torch.stack([tr[str(l)].input for l in range(ad.n_layers)])  # [L, B, T, U]


def test_zero_ablation_is_exact_and_local(setup):
    plm, soft, text, _ = setup
    ad = plm.adapter
    units = [(0, 3), (1, 7), (1, 2)]
    masks = unit_masks([[], units], ad.n_layers, ad.d_mlp)
    batch, acts = _acts(plm, soft, text, masks)
    sl = batch.image_slice
    clean, abl = acts[:, 0], acts[:, 1]
    for layer, unit in units:
        assert torch.all(abl[layer, sl, unit] == 0)
        # text positions keep their (downstream-changed) values: not forced to zero
        assert torch.any(abl[layer, sl.stop:, unit] != 0)
    # layer 0 is upstream of every ablation except its own: other units unchanged there
    keep = [u for u in range(ad.d_mlp) if u != 3]
    torch.testing.assert_close(abl[0][:, keep], clean[0][:, keep])


def test_mean_ablation_sets_fill(setup):
    plm, soft, text, _ = setup
    ad = plm.adapter
    fill = torch.randn(ad.n_layers, ad.d_mlp)
    masks = unit_masks([[(2, 5)]], ad.n_layers, ad.d_mlp)
    batch, acts = _acts(plm, soft, text, masks, fill)
    torch.testing.assert_close(acts[2, 0, batch.image_slice, 5], fill[2, 5].expand(N_PATCH))


def test_k0_leaves_p_unchanged_and_rows_are_independent(setup):
    plm, soft, text, target = setup
    ad = plm.adapter
    batch = plm.build(soft, [text])
    with torch.no_grad():
        p_clean = torch.softmax(plm.logits(batch)[0, batch.lengths[0] - 1].float(), -1)[target]
    rows = [[], [(l, u) for l in (0, 1) for u in range(ad.d_mlp)], [(1, 1)]]
    p = target_probs(plm, soft, text, target, unit_masks(rows, ad.n_layers, ad.d_mlp))
    assert float(p[0]) == pytest.approx(float(p_clean), rel=1e-5)
    for b in (1, 2):
        single = target_probs(plm, soft, text, target, unit_masks([rows[b]], ad.n_layers, ad.d_mlp))
        assert float(p[b]) == pytest.approx(float(single[0]), rel=1e-4)
    # whole layers ablated at the image positions must move p(c)
    assert abs(float(p[1]) - float(p_clean)) > 1e-6 * float(p_clean)  # well above fp32 rounding (~1e-7)


def test_rank_units_and_random_like():
    a = torch.zeros(2, 3, 4)
    grad = torch.ones(2, 3, 4)
    a[1, 2, 3] = 5
    a[0, 0, 1] = 4
    a[0, 2, 1] = 6  # same unit (0, 1) at another patch: max counts
    s = unit_scores(a, grad)
    assert s.shape == (2, 4) and float(s[0, 1]) == 6
    order = rank_units(s)
    assert order[:2] == [(0, 1), (1, 3)]
    allowed = torch.zeros(2, 4, dtype=torch.bool)
    allowed[1, 3] = True
    assert rank_units(s, allowed) == [(1, 3)]
    rng = np.random.default_rng(0)
    rnd = random_like([(0, 1), (0, 2), (1, 3)], 4, rng)
    assert sorted(l for l, _ in rnd) == [0, 0, 1]
    assert len(set(rnd)) == 3
