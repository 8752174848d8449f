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


class _FakeEncoder:
    """Stands in for a PatchEncoder: an image is its integer id; features are seeded by it."""

    def encode(self, images):
        return torch.stack([torch.randn(N_PATCH, D_ENC, generator=torch.Generator().manual_seed(int(i))) * 2
                            for i in images])


def _captions(tok, n=5):
    import polars as pl

    texts = [" a cat on the mat", " two dogs in snow", " a red bus", " the old clock", " one cup of tea"]
    rows = []
    for i in range(n):
        ids = tok(texts[i % len(texts)]).input_ids
        rows.append({"image_id": 10 + i, "caption_token_ids": ids, "target_pos": len(ids) - 1,
                     "target_token_id": ids[-1], "has_noun": True})
    rows.append({"image_id": 99, "caption_token_ids": [1], "target_pos": None, "target_token_id": None,
                 "has_noun": False})
    return pl.DataFrame(rows)


def test_ablate_images_shards_merge_to_the_single_run_and_layers_cap_k(tiny_adapters):
    """Two shards (every 2nd image) concatenate to the one-process table; with
    ``layers=[last]`` a huge k is capped at that layer's d_mlp units (k_effective)."""
    import polars as pl

    from mmn.experiments.ablation import ablate_images

    ad, tok = tiny_adapters["gpt2"]
    torch.manual_seed(0)
    plm = ImagePrefixLM(ad, tok, nn.Linear(D_ENC, ad.d_model))
    caps, enc = _captions(tok), _FakeEncoder()
    interp = torch.zeros(ad.n_layers, ad.d_mlp, dtype=torch.bool)
    interp[:, ::3] = True
    kw = dict(ks=[0, 3, 10_000], max_new_tokens=3, regenerate=True, seed=0, progress=False)
    full = ablate_images(caps, lambda i: i, plm, enc, interp, **kw)
    parts = [ablate_images(caps, lambda i: i, plm, enc, interp, shard=(r, 2), **kw) for r in range(2)]
    assert parts[0]["image_id"].unique().sort().to_list() == [10, 12, 14]
    merged = pl.concat(parts).sort(["image_id", "kind", "k"])
    assert merged.equals(full)
    last = ad.n_layers - 1
    only = ablate_images(caps, lambda i: i, plm, enc, interp, layers=[last], **kw)
    big = only.filter(pl.col("k") == 10_000)
    assert set(big.filter(pl.col("kind") != "filtered")["k_effective"]) == {ad.d_mlp}
    assert set(big.filter(pl.col("kind") == "filtered")["k_effective"]) == {int(interp[last].sum())}
    assert set(full.filter(pl.col("k") == 10_000, pl.col("kind") == "unfiltered")["k_effective"]) == {
        ad.n_layers * ad.d_mlp}
    # p_clean is p with nothing ablated: equal to the k = 0 rows
    k0 = full.filter(pl.col("k") == 0)
    assert (k0["p_target"] - k0["p_clean"]).abs().max() < 1e-6
    assert (k0["rel_drop"].abs() < 1e-5).all()


def test_rank_units_limit():
    s = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.8]])
    assert rank_units(s, limit=3) == [(0, 1), (1, 2), (1, 0)]
    layer1 = torch.tensor([[False] * 3, [True] * 3])
    assert rank_units(s, layer1, limit=2) == [(1, 2), (1, 0)]
