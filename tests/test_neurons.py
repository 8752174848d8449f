"""Attribution, decoding and the interpretability filter on tiny random models."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from mmn.hooks import Trace
from mmn.models.prefix_lm import ImagePrefixLM
from mmn.neurons.attribution import attribution_maps, top_k
from mmn.neurons.decode import decode_layer, decode_units
from mmn.neurons.filter import apply_filter, count_words, is_word

FAMILIES = ["gptj", "gpt2", "llama"]
N_PATCH, D_ENC = 9, 12


def _setup(tiny_adapters, family, seed=0):
    ad, tok = tiny_adapters[family]
    torch.manual_seed(seed)
    plm = ImagePrefixLM(ad, tok, nn.Linear(D_ENC, ad.d_model))
    feats = torch.randn(3, N_PATCH, D_ENC) * 2
    texts = [tok(" a cat on the").input_ids, tok(" two").input_ids, tok(" a small red bus near").input_ids]
    targets = [tok(" mat").input_ids[0], tok(" dogs").input_ids[0], tok(" trees").input_ids[0]]
    return plm, plm.soft_tokens(feats).detach(), texts, targets


def _y(plm, soft, text, target, edit=None, layer=None):
    batch = plm.build(soft, [text])
    if edit is None:
        out = plm.logits(batch)
    else:
        with Trace(plm.adapter.act_module(layer), edit_input=edit):
            out = plm.logits(batch)
    return out[0, batch.lengths[0] - 1, target]


@pytest.mark.parametrize("family", FAMILIES)
def test_one_pass_equals_per_layer_autograd(tiny_adapters, family):
    """(a) g from one backward == activation × gradient taken layer by layer, one image at a time."""
    plm, soft, texts, targets = _setup(tiny_adapters, family)
    ad = plm.adapter
    y, a, grad_all = attribution_maps(plm, soft, texts, targets)
    for b in range(len(texts)):
        for layer in range(ad.n_layers):
            one = plm.build(soft[b : b + 1], texts[b : b + 1])
            emb = one.inputs_embeds.detach().requires_grad_(True)
            with torch.enable_grad(), Trace(ad.act_module(layer), retain_input=True) as tr:
                logits = ad.model(inputs_embeds=emb, attention_mask=one.attention_mask).logits
                yb = logits[0, one.lengths[0] - 1, targets[b]]
                (grad,) = torch.autograd.grad(yb, tr.input)
            sl = one.image_slice
            torch.testing.assert_close(a[b, layer], tr.input[0, sl].detach(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(grad_all[b, layer], grad[0, sl], rtol=1e-3, atol=1e-7)
            torch.testing.assert_close(
                a[b, layer] * grad_all[b, layer], tr.input[0, sl].detach() * grad[0, sl], rtol=1e-3, atol=1e-8
            )
            assert float(y[b]) == pytest.approx(float(yb), rel=1e-4, abs=1e-5)


def test_no_parameter_gradients(tiny_adapters):
    plm, soft, texts, targets = _setup(tiny_adapters, "llama")
    attribution_maps(plm, soft, texts, targets)
    assert all(p.grad is None for p in plm.adapter.model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_one_by_one(tiny_adapters, family):
    """(c) different caption lengths in one batch give the same maps as single images."""
    plm, soft, texts, targets = _setup(tiny_adapters, family)
    y, a, g = attribution_maps(plm, soft, texts, targets)
    for b in range(3):
        y1, a1, g1 = attribution_maps(plm, soft[b : b + 1], texts[b : b + 1], targets[b : b + 1])
        torch.testing.assert_close(a[b], a1[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g[b], g1[0], rtol=1e-3, atol=1e-6)
    tb, t1 = top_k(a, g, 20), [top_k(*attribution_maps(plm, soft[b:b+1], texts[b:b+1], targets[b:b+1])[1:], 20)[0]
                                for b in range(3)]
    for b in range(3):
        assert tb[b].layer.tolist() == t1[b].layer.tolist()
        assert tb[b].unit.tolist() == t1[b].unit.tolist()
        assert tb[b].patch.tolist() == t1[b].patch.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_first_order_prediction_of_zeroing(tiny_adapters, family):
    """(b) zeroing unit k at patch p changes y by about -g: Spearman(g, y - y_ablated) > 0.8.

    Top-15 triples plus 15 random triples, so both large and small g are covered."""
    plm, soft, texts, targets = _setup(tiny_adapters, family)
    _, a, grad = attribution_maps(plm, soft[:1], texts[:1], targets[:1])
    g = a * grad
    top = top_k(a, grad, 15)[0]
    rng = np.random.default_rng(0)
    L, P, U = a.shape[1:]
    triples = list(zip(top.layer.tolist(), top.patch.tolist(), top.unit.tolist()))
    triples += [(int(rng.integers(L)), int(rng.integers(P)), int(rng.integers(U))) for _ in range(15)]
    y0 = float(_y(plm, soft[:1], texts[0], targets[0]))
    sl = plm.build(soft[:1], texts[:1]).image_slice
    pred, actual = [], []
    for layer, patch, unit in triples:
        def zero(x, patch=patch, unit=unit):
            x = x.clone()
            x[:, sl.start + patch, unit] = 0
            return x

        with torch.no_grad():
            y1 = float(_y(plm, soft[:1], texts[0], targets[0], zero, layer))
        pred.append(float(g[0, layer, patch, unit]))
        actual.append(y0 - y1)
    rho = spearmanr(pred, actual).statistic
    assert rho > 0.8, f"Spearman(g, Δy) = {rho:.3f}"


def test_top_k_order_and_indices():
    a = torch.zeros(1, 2, 3, 4)
    grad = torch.ones(1, 2, 3, 4)
    a[0, 1, 2, 3] = 5.0
    a[0, 0, 1, 2] = 3.0
    a[0, 1, 0, 0] = 3.0  # tie with the one above: lower flat index first
    top = top_k(a, grad, 3)[0]
    assert list(zip(top.layer.tolist(), top.patch.tolist(), top.unit.tolist())) == [(1, 2, 3), (0, 1, 2), (1, 0, 0)]
    assert top.g.tolist() == [5.0, 3.0, 3.0]


# final_norm=True only for RMSNorm (llama): a LayerNorm recentres the vector, so the premise fails
@pytest.mark.parametrize(("family", "final_norm"), [("gptj", False), ("gpt2", False), ("llama", False), ("llama", True)])
def test_decoding_token_direction_returns_token(tiny_adapters, family, final_norm):
    """(d) a unit whose W_out column is a token's unembedding direction decodes to that token.

    The token with the largest unembedding norm t satisfies u_t·u_t >= u_s·u_t for all s
    (Cauchy–Schwarz), so it must come first."""
    ad, tok = tiny_adapters[family]
    u = ad.unembed_weight()
    t = int(u.norm(dim=1).argmax())
    w = ad.w_out(1)
    saved = w[:, 5].clone()
    if final_norm:
        assert torch.all(ad.final_norm.weight == 1)  # RMSNorm with unit gain keeps the direction
    with torch.no_grad():
        w[:, 5] = u[t]
    try:
        vals, ids = decode_layer(ad, 1, [5, 6], top_n=10, final_norm=final_norm)
        assert int(ids[0, 0]) == t
        assert vals.shape == (2, 10) and torch.all(vals[:, :-1] >= vals[:, 1:])
        df = decode_units(ad, tok, pl.DataFrame({"layer": [1, 1, 1], "unit": [5, 5, 6]}), top_n=10,
                          final_norm=final_norm)
        assert df.height == 2 and df["token_ids"][0][0] == t
        assert df["tokens"][0][0] == tok.decode([t]).strip()
    finally:
        with torch.no_grad():
            w[:, 5] = saved


def test_decoding_restricted_to_real_vocab(tiny_adapters):
    ad, tok = tiny_adapters["gptj"]
    with torch.no_grad():
        ad.unembed.bias[ad.vocab_size:] = 1e4
    try:
        _, ids = decode_layer(ad, 0, [0, 1, 2], top_n=10, final_norm=True)
        assert int(ids.max()) < ad.vocab_size
    finally:
        with torch.no_grad():
            ad.unembed.bias[ad.vocab_size:] = 0


WORDS = frozenset({"cat", "dog", "tree", "house", "car", "bus", "red", "sky", "run", "blue", "an", "ok"})


def test_filter_hand_made_lists():
    """(e) 7-of-10 rule with 3+ letters, case-insensitive, punctuation and fragments rejected."""
    assert is_word("Cat", WORDS) and is_word(" dog", WORDS)
    assert not is_word("an", WORDS)  # too short
    assert not is_word("ca", WORDS) and not is_word("cat's", WORDS) and not is_word("c@t", WORDS)
    seven = ["cat", "dog", "tree", "house", "car", "bus", "red", "xq", "##", "an"]
    six = ["cat", "dog", "tree", "house", "car", "bus", "zzz", "xq", "##", "an"]
    assert count_words(seven, WORDS) == 7 and count_words(six, WORDS) == 6
    # only the first top_n tokens count
    assert count_words(six + ["sky", "blue"], WORDS, top_n=10) == 6
    df = pl.DataFrame({"layer": [0, 0], "unit": [1, 2], "tokens": [seven, six]})
    out = apply_filter(df, WORDS, min_words=7, top_n=10, min_letters=3)
    assert out["interpretable"].to_list() == [True, False]
    assert out["n_words"].to_list() == [7, 6]
    assert apply_filter(df, WORDS, min_words=6)["interpretable"].to_list() == [True, True]
    assert apply_filter(df, WORDS, min_words=7, min_letters=4)["n_words"].to_list() == [2, 2]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [1, 17, 10_000])
def test_streaming_topk_equals_full_maps(tiny_adapters, family, k):
    """attribute_topk (per-layer reduction) == top_k over the full maps."""
    from mmn.neurons.attribution import attribute_topk

    plm, soft, texts, targets = _setup(tiny_adapters, family)
    y, a, grad = attribution_maps(plm, soft, texts, targets)
    y2, tops = attribute_topk(plm, soft, texts, targets, k)
    torch.testing.assert_close(y, y2)
    for full, stream in zip(top_k(a, grad, k), tops):
        for field in ("layer", "unit", "patch"):
            assert getattr(full, field).tolist() == getattr(stream, field).tolist()
        torch.testing.assert_close(full.g, stream.g)
        torch.testing.assert_close(full.activation, stream.activation)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_restricted_topk_equals_full_maps_of_those_layers(tiny_adapters, family):
    """attribute_topk(layers=S) == top_k over the full maps with every other layer's g
    set to -inf: only layers in S appear, with the same g as the unrestricted pass."""
    from mmn.neurons.attribution import attribute_topk

    plm, soft, texts, targets = _setup(tiny_adapters, family)
    n_layers = plm.adapter.n_layers
    assert n_layers >= 2
    keep = [n_layers - 1]
    y, a, grad = attribution_maps(plm, soft, texts, targets)
    y2, tops = attribute_topk(plm, soft, texts, targets, 15, layers=keep)
    torch.testing.assert_close(y, y2)
    sub_a, sub_g = a[:, keep], grad[:, keep]
    for full, stream in zip(top_k(sub_a, sub_g, 15), tops):
        assert set(stream.layer.tolist()) == set(keep)
        assert (full.unit.tolist(), full.patch.tolist()) == (stream.unit.tolist(), stream.patch.tolist())
        torch.testing.assert_close(full.g, stream.g)
    with pytest.raises(ValueError, match="out of range"):
        attribute_topk(plm, soft, texts, targets, 5, layers=[n_layers])


def test_attributed_layers_param_checked_against_the_model():
    from mmn.params import ParamsError, load_params
    from mmn.pipeline import attributed_layers

    from conftest import REPO

    p = load_params(REPO / "params.yaml")
    assert attributed_layers(p, 4) == [0, 1, 2, 3]
    q = p.model_copy(update={"attribute": p.attribute.model_copy(update={"layers": [1, 5]})})
    with pytest.raises(ParamsError, match=r"attribute.layers: \[5\] out of range.*layers 0..3"):
        attributed_layers(q, 4)
    assert attributed_layers(q, 6) == [1, 5]
