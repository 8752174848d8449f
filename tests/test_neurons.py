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
from conftest import REPO
from mmn.neurons.attribution import attribution_maps, top_k
from mmn.neurons.decode import _Decoder, decode_units
from mmn.neurons.filter import apply_filter, count_words, is_word

FAMILIES = ["gptj", "gpt2", "llama", "gemma3"]
N_PATCH, D_ENC = 9, 12


def decode_layer(ad, layer: int, units: list[int], top_n: int = 10, lens: str = "unembed"):
    """The decoder that decode_units and top_token_ids_all_units run, on one layer's ``units``:
    ``(logits, token ids)``, each ``[len(units), top_n]``."""
    return _Decoder(ad, lens)(layer, units, top_n)


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


# logit_lens only for RMSNorm (llama): a LayerNorm recentres the vector, so the premise fails
@pytest.mark.parametrize(("family", "lens"), [("gptj", "unembed"), ("gpt2", "unembed"), ("llama", "unembed"),
                                              ("llama", "logit_lens")])
def test_decoding_token_direction_returns_token(tiny_adapters, family, lens):
    """(d) a unit whose W_out column is a token's unembedding direction decodes to that token.

    The token with the largest unembedding norm t satisfies u_t·u_t >= u_s·u_t for all s
    (Cauchy–Schwarz), so it must come first."""
    ad, tok = tiny_adapters[family]
    u = ad.unembed_weight()
    t = int(u.norm(dim=1).argmax())
    w = ad.w_out(1)
    saved = w[:, 5].clone()
    if lens == "logit_lens":
        assert torch.all(ad.final_norm.weight == 1)  # RMSNorm with unit gain keeps the direction
    with torch.no_grad():
        w[:, 5] = u[t]
    try:
        vals, ids = decode_layer(ad, 1, [5, 6], top_n=10, lens=lens)
        assert int(ids[0, 0]) == t
        assert vals.shape == (2, 10) and torch.all(vals[:, :-1] >= vals[:, 1:])
        df = decode_units(ad, tok, pl.DataFrame({"layer": [1, 1, 1], "unit": [5, 5, 6]}), top_n=10, lens=lens)
        assert df.height == 2 and df["token_ids"][0][0] == t
        assert df["tokens"][0][0] == tok.decode([t]).strip()
    finally:
        with torch.no_grad():
            w[:, 5] = saved


@pytest.mark.parametrize("family", FAMILIES)
def test_unembed_lens_is_raw_column_times_unembedding(tiny_adapters, family):
    """decode.lens=unembed is the paper's decoder(W_out^k) = W_d · W_out[:, k]: the logits are
    exactly that product (hand computed), with no final norm and no lm_head bias."""
    ad, _ = tiny_adapters[family]
    units = [0, 3, 7]
    ref = (ad.w_out(2)[:, units].T.float() @ ad.unembed.weight[: ad.vocab_size].float().T)  # [3, vocab]
    vals, ids = decode_layer(ad, 2, units, top_n=10, lens="unembed")
    ref_vals, ref_ids = torch.topk(ref, 10, dim=1)
    assert ids.tolist() == ref_ids.tolist()
    torch.testing.assert_close(vals, ref_vals)
    if getattr(ad.unembed, "bias", None) is not None:  # GPT-J: the head bias is ignored by unembed only
        target = int(ref_ids[0, -1])
        with torch.no_grad():
            ad.unembed.bias[target] = 1e4
        try:
            assert decode_layer(ad, 2, units, 10, lens="unembed")[1].tolist() == ref_ids.tolist()
            assert int(decode_layer(ad, 2, units, 10, lens="logit_lens")[1][0, 0]) == target
        finally:
            with torch.no_grad():
                ad.unembed.bias[target] = 0


@pytest.mark.parametrize("lens", ["unembed", "logit_lens"])
def test_decoding_restricted_to_real_vocab(tiny_adapters, lens):
    ad, tok = tiny_adapters["gptj"]
    with torch.no_grad():
        ad.unembed.bias[ad.vocab_size:] = 1e4
        saved = ad.unembed.weight[ad.vocab_size:].clone()
        ad.unembed.weight[ad.vocab_size:] = ad.w_out(0)[:, :1].T * 100  # padded rows point at unit 0
    try:
        _, ids = decode_layer(ad, 0, [0, 1, 2], top_n=10, lens=lens)
        assert int(ids.max()) < ad.vocab_size
    finally:
        with torch.no_grad():
            ad.unembed.bias[ad.vocab_size:] = 0
            ad.unembed.weight[ad.vocab_size:] = saved


@pytest.fixture
def added_token_adapter(tokenizer):
    """A tiny GPT-J whose tokenizer has 3 tokens added on top of its base vocabulary (like
    GPT-J's 143 ``<|extratoken_n|>``), embeddings resized; the added rows of the unembedding
    point along unit 4 of layer 1 (so they would win without the restriction)."""
    import copy

    from conftest import tiny_lm

    from mmn.models.lm import prepare_lm

    tok = copy.deepcopy(tokenizer)
    base = len(tok)
    tok.add_tokens(["<|extratoken_1|>", "<|extratoken_2|>", "zzqxword"])
    model = tiny_lm("gptj", base)
    model.resize_token_embeddings(len(tok))
    ad, tok = prepare_lm(model, tok)
    with torch.no_grad():
        ad.unembed.weight[base:] = ad.w_out(1)[:, 4] * 100
        ad.unembed.bias[base:] = 1e3
    return ad, tok, base


@pytest.mark.parametrize("lens", ["unembed", "logit_lens"])
def test_decoding_excludes_added_tokens(added_token_adapter, lens):
    from mmn.neurons.decode import top_token_ids_all_units

    ad, tok, base = added_token_adapter
    assert ad.vocab_size == base + 3 and ad.real_token_ids.tolist() == list(range(base))
    # without the restriction the added tokens win for unit 4 (premise of the test)
    full = ad.w_out(1)[:, [4]].T.float() @ ad.unembed.weight.float().T
    assert set(torch.topk(full, 3).indices[0].tolist()) == {base, base + 1, base + 2}
    _, ids = decode_layer(ad, 1, [4, 5], top_n=10, lens=lens)
    assert int(ids.max()) < base
    df = decode_units(ad, tok, pl.DataFrame({"layer": [1], "unit": [4]}), top_n=10, lens=lens)
    assert not {"<|extratoken_1|>", "<|extratoken_2|>", "zzqxword"} & set(df["tokens"][0])
    assert int(top_token_ids_all_units(ad, top_n=10, lens=lens).max()) < base


def test_interpretable_units_equals_decode_then_filter(tiny_adapters):
    """The all-units function (for ablate) decides exactly what decode + filter decide."""
    from mmn.neurons.decode import top_token_ids_all_units
    from mmn.neurons.filter import interpretable_units
    from mmn.params import DecodeParams, FilterParams

    ad, tok = tiny_adapters["gpt2"]
    every = pl.DataFrame({"layer": [l for l in range(ad.n_layers) for _ in range(ad.d_mlp)],
                          "unit": [u for _ in range(ad.n_layers) for u in range(ad.d_mlp)]})
    dec = decode_units(ad, tok, every, top_n=12, lens="unembed")
    # a word list made of some units' decoded tokens, so that some units pass and some fail
    words = frozenset(t.lower() for toks in dec["tokens"].to_list()[::5] for t in toks if t.isalpha())
    fp = FilterParams(min_words=4, top_n=10, min_letters=3)
    flt = apply_filter(dec, words, min_words=fp.min_words, top_n=fp.top_n, min_letters=fp.min_letters)
    expect = torch.zeros(ad.n_layers, ad.d_mlp, dtype=torch.bool)
    for r in flt.iter_rows(named=True):
        expect[r["layer"], r["unit"]] = r["interpretable"]
    assert 0 < int(expect.sum()) < expect.numel()
    got = interpretable_units(ad, tok, words, DecodeParams(top_n=12, lens="unembed"), fp)
    assert got.dtype == torch.bool and torch.equal(got, expect)
    assert top_token_ids_all_units(ad, 12, "unembed")[0, 0].tolist() == dec["token_ids"][0].to_list()


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
    """attribute_topk (per-layer reduction) == top_k over the full maps (rank_by=triple)."""
    from mmn.neurons.attribution import attribute_topk

    plm, soft, texts, targets = _setup(tiny_adapters, family)
    y, a, grad = attribution_maps(plm, soft, texts, targets)
    y2, tops = attribute_topk(plm, soft, texts, targets, k, rank_by="triple")
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
    y2, tops = attribute_topk(plm, soft, texts, targets, 15, layers=keep, rank_by="triple")
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


def _brute_force_units(a: torch.Tensor, grad: torch.Tensor, k: int) -> list[list[tuple]]:
    """Per image, layer by layer, unit by unit: g_k = max over patches of a·grad (first
    maximal patch); all units sorted by (-g, layer, unit); first k as (layer, unit, patch, g)."""
    out = []
    for b in range(a.shape[0]):
        rows = []
        for layer in range(a.shape[1]):
            g = (a[b, layer] * grad[b, layer]).tolist()  # [P][U]
            for unit in range(a.shape[3]):
                col = [g[p][unit] for p in range(a.shape[2])]
                best = max(col)
                rows.append((layer, unit, col.index(best), best))
        rows.sort(key=lambda r: (-r[3], r[0], r[1]))
        out.append(rows[:k])
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_sum_aggregate_ranks_units_by_their_sum_over_patches(tiny_adapters, family):
    """attribute.aggregate=sum: g of each kept unit = Σ_p A·dy/dA (computed by hand from the
    full maps), k distinct units in that order, patch = the arg-max of A·dy/dA; the order
    differs from max's; sum with rank_by=triple is refused (library and params)."""
    import yaml

    from mmn.neurons.attribution import attribute_topk
    from mmn.params import ParamsError, parse_params

    plm, soft, texts, targets = _setup(tiny_adapters, family)
    d_mlp = plm.adapter.d_mlp
    _, a, grad = attribution_maps(plm, soft, texts, targets)
    _, tops = attribute_topk(plm, soft, texts, targets, 25, rank_by="unit", aggregate="sum")
    _, tops_max = attribute_topk(plm, soft, texts, targets, 25, rank_by="unit")
    prod = a * grad  # [b, L, P, U]
    for b, (stream, ref) in enumerate(zip(tops, top_k(a, grad, 25, "unit", "sum"))):
        sums = prod[b].sum(dim=1).reshape(-1)  # [L*U]
        order = torch.sort(sums, descending=True, stable=True).indices[:25]
        assert list(zip(stream.layer.tolist(), stream.unit.tolist())) == [divmod(int(i), d_mlp) for i in order]
        torch.testing.assert_close(stream.g, sums[order], rtol=1e-5, atol=1e-7)
        assert stream.patch.tolist() == prod[b, stream.layer, :, stream.unit].argmax(dim=1).tolist()
        for f in ("layer", "unit", "patch"):
            assert getattr(ref, f).tolist() == getattr(stream, f).tolist()
    assert any(t.unit.tolist() != m.unit.tolist() or t.layer.tolist() != m.layer.tolist()
               for t, m in zip(tops, tops_max))
    with pytest.raises(ValueError, match="rank_by: triple needs aggregate: max"):
        attribute_topk(plm, soft, texts, targets, 5, rank_by="triple", aggregate="sum")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["attribute"]["aggregate"], raw["attribute"]["rank_by"] = "sum", "triple"
    with pytest.raises(ParamsError, match="aggregate: sum"):
        parse_params(raw)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [1, 17, 100, 10_000])
def test_unit_ranking_equals_brute_force_max_over_patches(tiny_adapters, family, k):
    """rank_by=unit: k DISTINCT units per image, ranked by their max over image positions of
    g, equal to a brute-force per-layer computation on the full maps (and to top_k's
    reference); activation/gradient are read at the recorded arg-max patch."""
    from mmn.neurons.attribution import attribute_topk

    plm, soft, texts, targets = _setup(tiny_adapters, family)
    ad = plm.adapter
    y, a, grad = attribution_maps(plm, soft, texts, targets)
    y2, tops = attribute_topk(plm, soft, texts, targets, k, rank_by="unit")
    torch.testing.assert_close(y, y2)
    n_all = ad.n_layers * ad.d_mlp
    for b, (brute, stream, ref) in enumerate(zip(_brute_force_units(a, grad, k), tops, top_k(a, grad, k, "unit"))):
        pairs = list(zip(stream.layer.tolist(), stream.unit.tolist()))
        assert len(pairs) == len(set(pairs)) == min(k, n_all)
        assert [(l, u, p) for l, u, p, _ in brute] == list(zip(stream.layer.tolist(), stream.unit.tolist(),
                                                              stream.patch.tolist()))
        torch.testing.assert_close(stream.g, torch.tensor([r[3] for r in brute]), rtol=1e-5, atol=1e-8)
        for f in ("layer", "unit", "patch"):
            assert getattr(ref, f).tolist() == getattr(stream, f).tolist()
        torch.testing.assert_close(stream.activation, a[b, stream.layer, stream.patch, stream.unit])
        torch.testing.assert_close(stream.gradient, grad[b, stream.layer, stream.patch, stream.unit])
        assert torch.all(stream.g[:-1] >= stream.g[1:])


def test_unit_ranking_differs_from_triples_on_a_hand_made_map():
    """One unit winning at two patches: triples keep it twice, units once (next unit enters)."""
    a = torch.zeros(1, 2, 3, 4)
    grad = torch.ones(1, 2, 3, 4)
    a[0, 1, 0, 2] = 9.0
    a[0, 1, 2, 2] = 8.0  # same unit (1, 2), another patch
    a[0, 0, 1, 3] = 7.0
    a[0, 0, 2, 1] = -1.0
    tri = top_k(a, grad, 3, "triple")[0]
    assert list(zip(tri.layer.tolist(), tri.unit.tolist(), tri.patch.tolist())) == [(1, 2, 0), (1, 2, 2), (0, 3, 1)]
    uni = top_k(a, grad, 3, "unit")[0]
    assert list(zip(uni.layer.tolist(), uni.unit.tolist(), uni.patch.tolist())) == [(1, 2, 0), (0, 3, 1), (0, 0, 0)]
    assert uni.g.tolist() == [9.0, 7.0, 0.0]  # third: the first all-zero unit (ties by layer, unit; first patch)
    with pytest.raises(ValueError, match="rank_by"):
        top_k(a, grad, 3, "patch")


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_restricted_unit_ranking(tiny_adapters, family):
    from mmn.neurons.attribution import attribute_topk

    plm, soft, texts, targets = _setup(tiny_adapters, family)
    keep = [0, 2]
    _, a, grad = attribution_maps(plm, soft, texts, targets)
    _, tops = attribute_topk(plm, soft, texts, targets, 30, layers=keep, rank_by="unit")
    for full, stream in zip(top_k(a[:, keep], grad[:, keep], 30, "unit"), tops):
        assert [keep[l] for l in full.layer.tolist()] == stream.layer.tolist()
        assert (full.unit.tolist(), full.patch.tolist()) == (stream.unit.tolist(), stream.patch.tolist())


def test_attribute_captions_unit_mode_schema(tiny_adapters):
    """attribute_captions(rank_by=unit) writes k distinct units per image in the usual schema
    and passes the attributions suite; the triple mode repeats units."""
    from mmn.neurons.attribution import attribute_captions, attribution_schema
    from mmn.quality import QualityError, check_attributions

    ad, tok = tiny_adapters["llama"]
    torch.manual_seed(0)
    plm = ImagePrefixLM(ad, tok, nn.Linear(D_ENC, ad.d_model))
    feats = {i: torch.randn(N_PATCH, D_ENC) * 2 for i in (3, 5)}

    class Enc:
        n_patches = N_PATCH

        def encode(self, imgs):
            return torch.stack(imgs)

    plm.encoder = Enc()
    caps = pl.DataFrame({"image_id": [5, 3], "has_noun": [True, True],
                         "caption_token_ids": [tok(" a dog on a bed").input_ids, tok(" the red bus").input_ids],
                         "target_pos": [2, 3], "target_token_id": [tok(" dog").input_ids[0], tok(" bus").input_ids[0]],
                         "target_token": ["dog", "bus"]})
    dims = dict(n_layers=ad.n_layers, n_units=ad.d_mlp, n_patches=N_PATCH)
    df = attribute_captions(caps, feats.__getitem__, plm, k=40, batch_size=2, progress=False)
    assert dict(df.schema) == attribution_schema()
    per = df.group_by("image_id").agg(pl.struct("layer", "unit").n_unique().alias("d"), pl.len().alias("n"))
    assert per["d"].to_list() == [40, 40] and per["n"].to_list() == [40, 40]
    check_attributions(df, k=40, **dims, rank_by="unit")
    tri = attribute_captions(caps, feats.__getitem__, plm, k=40, batch_size=2, progress=False,
                             rank_by="triple")
    check_attributions(tri, k=40, **dims, rank_by="triple")
    assert tri.select("image_id", "layer", "unit").n_unique() < tri.height  # a unit at several patches
    with pytest.raises(QualityError, match="distinct_units_per_image"):
        check_attributions(tri, k=40, **dims, rank_by="unit")
    # the unit ranking's top row is the triple ranking's top row (max of maxes == global max)
    assert df.filter(pl.col("rank") == 0).select("layer", "unit", "patch").rows() == \
        tri.filter(pl.col("rank") == 0).select("layer", "unit", "patch").rows()


def _metrics_tables():
    """Image 1: units A (interpretable), B (not), A again at another patch (triple mode);
    image 2: A, C (interpretable), D (not). Layers A=0, B=1, C=1, D=2; E (layer 3) unused."""
    A, B, C, D = (0, 10), (1, 11), (1, 12), (2, 13)
    rows = [(1, A, 0), (1, B, 1), (1, A, 2), (2, A, 0), (2, C, 1), (2, D, 2)]
    att = pl.DataFrame({"image_id": [i for i, _, _ in rows], "rank": [0, 1, 2, 0, 1, 2],
                        "layer": [u[0] for _, u, _ in rows], "unit": [u[1] for _, u, _ in rows],
                        "patch": [p for _, _, p in rows]})
    neu = pl.DataFrame({"layer": [0, 1, 1, 2, 3], "unit": [10, 11, 12, 13, 14],
                        "interpretable": [True, False, True, False, True]})
    return att, neu


def test_neuron_metrics_count_units_by_hand():
    from mmn.neurons.summary import kept_fraction_per_image, layer_distribution, neuron_metrics

    att, neu = _metrics_tables()
    per = kept_fraction_per_image(att, neu)
    assert per["n_units"].to_list() == [2, 3] and per["n_interpretable"].to_list() == [1, 2]
    m = neuron_metrics(att, neu)
    assert m["n_images"] == 2 and m["n_image_units"] == 5 and m["n_units"] == 4 and m["n_interpretable"] == 2
    kf = m["kept_fraction"]
    assert kf["n"] == 2 and kf["mean"] == pytest.approx((1 / 2 + 2 / 3) / 2, abs=1e-6)
    assert kf["lo"] <= kf["mean"] <= kf["hi"]
    assert m["kept_fraction_pooled"] == pytest.approx(3 / 5, abs=1e-6)
    assert m["kept_fraction_distinct"] == pytest.approx(2 / 4, abs=1e-6)
    # layers over (image, unit) pairs: 0, 1 | 0, 1, 2
    assert m["mean_layer"] == pytest.approx(4 / 5) and m["median_layer"] == 1 and m["modal_layer"] == 0
    assert m["mean_layer_interpretable"] == pytest.approx(1 / 3, abs=1e-4)  # 0, 0, 1

    def leaves(d):
        for v in d.values():
            yield from (leaves(v) if isinstance(v, dict) else [v])

    assert all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool) for v in leaves(m))
    dist = layer_distribution(att, neu)
    assert dist.columns == ["layer", "n_units", "n_interpretable_units", "share"]
    assert dist["layer"].to_list() == [0, 1, 2, 3]
    assert dist["n_units"].to_list() == [2, 2, 1, 0]
    assert dist["n_interpretable_units"].to_list() == [2, 1, 0, 0]
    assert dist["share"].sum() == pytest.approx(1.0)


def test_kept_fraction_ci_shrinks_with_images():
    """The CI is over images: more images with the same per-image spread → a narrower CI."""
    from mmn.neurons.summary import neuron_metrics

    rng = np.random.default_rng(0)

    def tables(n_img):
        ids = np.repeat(np.arange(n_img), 10)
        units = np.tile(np.arange(10), n_img) + 10 * rng.integers(0, 5, size=n_img * 10)
        att = pl.DataFrame({"image_id": ids, "layer": np.zeros_like(ids), "unit": units})
        flags = (rng.random(60) < 0.5).tolist()
        neu = pl.DataFrame({"layer": [0] * 60, "unit": list(range(60)), "interpretable": flags})
        return att, neu

    small = neuron_metrics(*tables(8))["kept_fraction"]
    big = neuron_metrics(*tables(200))["kept_fraction"]
    assert small["n"] == 8 and big["n"] == 200
    assert big["hi"] - big["lo"] < small["hi"] - small["lo"]
