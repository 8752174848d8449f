"""Controls (mmn.controls, mmn.models.planted): the planted unit, the concept direction from
training images only, label shuffling, cascading randomisation and the control report."""

from __future__ import annotations

import copy

import numpy as np
import polars as pl
import pytest
import torch
from torch import nn

from helpers.fakes import captions as fake_captions
from mmn.controls import randomization as R
from mmn.controls import report as P
from mmn.controls.plant import (GAIN, concept_direction, estimate_plant, gradient_direction, split_by_concept,
                                word_gradient, word_prefix, write_direction)
from mmn.hooks import TraceDict
from mmn.models.planted import Plant, PlantError, apply_plant, load_plant, save_plant
from mmn.models.prefix_lm import ImagePrefixLM
from mmn.projection_training import shuffled_captions

FAMILIES = ("gptj", "gpt2", "llama", "gemma3")


class ConceptEncoder:
    """Image ``i`` -> seeded normal features; even ids (the concept) add 3·v on their first 4 of
    8 patches (v: a fixed unit vector): a concept that the features carry, as a camera would."""

    n_patch, d_enc = 8, 12

    def __init__(self) -> None:
        v = torch.randn(self.d_enc, generator=torch.Generator().manual_seed(123))
        self.v = v / v.norm()

    def encode(self, images):
        out = []
        for i in images:
            f = torch.randn(self.n_patch, self.d_enc, generator=torch.Generator().manual_seed(int(i)))
            if int(i) % 2 == 0:
                f[:4] += 3 * self.v
            out.append(f)
        return torch.stack(out)


def _plm(tiny_adapters, family: str) -> ImagePrefixLM:
    ad, tok = tiny_adapters[family]
    ad = copy.deepcopy(ad)  # the session's tiny models stay unplanted
    torch.manual_seed(0)
    return ImagePrefixLM(ad, tok, nn.Linear(ConceptEncoder.d_enc, ad.d_model), encoder=ConceptEncoder())


def _caps(ids) -> dict[int, list[str]]:
    return {i: ["two dogs on a lawn" if i % 2 == 0 else "a red bus", "a photo"] for i in ids}


def _acts(plm: ImagePrefixLM, image: int, layer: int) -> torch.Tensor:
    from mmn.neurons.activations import activations_of_image

    return activations_of_image(plm, image)[layer]


def test_split_by_concept_matches_the_word_and_its_plural_only():
    caps = {1: ["A Dog runs"], 2: ["two dogs"], 3: ["a hotdog stand", "dogged"], 4: ["foxes"], 5: ["a dog."]}
    assert split_by_concept(caps, "dog") == ([1, 2, 5], [3, 4])
    assert split_by_concept(caps, "fox") == ([4], [1, 2, 3, 5])


def test_concept_direction_by_hand():
    """Concept images (1, 1) and (3, 1), others (1, -1): d = (2, 1) - (1, -1) = (1, 2); mean
    mu = (1.5, 0); w = d - (d.mu^)mu^ = (0, 2), scaled so that the concept mean (2, 1) maps to 1:
    (0, 1); w.mu = 0."""
    c = [torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, 1.0]])]
    o = [torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, -1.0]])]
    w = concept_direction(c, o).double()
    d, mu = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([1.5, 0.0], dtype=torch.float64)
    mh = mu / mu.norm()
    want = d - (d @ mh) * mh
    want = want / (want @ torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert torch.allclose(w, want, atol=1e-6) and torch.allclose(w, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert abs(float(w @ mu)) < 1e-6 and abs(float(w @ torch.tensor([2.0, 1.0], dtype=torch.float64)) - 1) < 1e-6
    with pytest.raises(PlantError, match="with and without"):
        concept_direction(c, [])


@pytest.mark.parametrize("family", FAMILIES)
def test_set_unit_changes_only_that_unit_and_computes_act_of_gain_s(tiny_adapters, family):
    plm = _plm(tiny_adapters, family)
    ad = plm.adapter
    before = {k: v.clone() for k, v in ad.model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    read, write = torch.randn(ad.d_model, generator=g), torch.randn(ad.d_model, generator=g)
    layer, unit = 1, 5
    ad.set_unit(layer, unit, read, 3.0, write)
    after = ad.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(f".{layer}." in k and ".mlp." in k for k in changed), changed
    for k in changed:  # only the unit's row / column / bias entry differs
        diff = (before[k] != after[k]).nonzero()
        assert diff.numel() > 0
        unit_axis = [d for d in range(diff.shape[1]) if (diff[:, d] == unit).all()]
        assert unit_axis, (k, diff[:5])
    assert torch.equal(ad.w_out(layer)[:, unit], write.to(ad.dtype))
    # A of the unit = act(3 s) (plain) or act(3 s) * s (gated), s = read . x, x = the MLP input
    x = torch.randn(1, 4, ad.d_model, generator=g)
    with TraceDict({"a": ad.act_module(layer)}, retain_input=True, detach=True) as tr:
        ad.mlp(layer)(x)
    s = x[0] @ read
    gated = family in ("llama", "gemma3")
    act = ad.mlp(layer).act_fn if gated else ad.mlp(layer).act
    want = act(3.0 * s) * (s if gated else 1)
    assert torch.allclose(tr["a"].input[0, :, unit], want, atol=1e-5)


@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_planted_unit_fires_on_held_out_concept_features_and_writes_the_word(tiny_adapters, family):
    plm = _plm(tiny_adapters, family)
    train = list(range(40))
    loaded: list[int] = []

    def load(i):
        loaded.append(i)
        return i

    p = estimate_plant(plm, _caps(train), load, layer=1, unit=3, word="dog", strength=5.0, max_images=500, seed=0)
    assert set(loaded) <= set(train)  # estimated from the training images only
    assert (p.n_concept, p.n_other) == (20, 20) and p.train_auc > 0.9
    held_c = [max(_acts(plm, i, 1)[:, 3]) for i in range(100, 140, 2)]
    held_o = [max(_acts(plm, i, 1)[:, 3]) for i in range(101, 141, 2)]
    held_auc = float(np.mean([float(c > o) for c in held_c for o in held_o]))
    assert held_auc > 0.9 and float(np.mean(held_c)) > 2 * float(np.mean(held_o))
    # at the concept's mean activation the unit adds `strength` along the word's (normed) unembedding
    u = write_direction(plm.adapter, p.token_id)
    assert torch.allclose(plm.adapter.w_out(1)[:, 3].float() * p.a_concept, 5.0 * u, atol=1e-4)
    assert p.token_id == plm.tokenizer(" dog", add_special_tokens=False).input_ids[0]


def test_word_prefix_is_the_caption_text_before_the_first_mention(tiny_adapters):
    _, tok = tiny_adapters["llama"]
    enc = lambda t: tok(t, add_special_tokens=False).input_ids  # noqa: E731
    assert word_prefix("A man rides a horse.", "man", tok) == enc(" a")
    assert word_prefix("Men and a man.", "man", tok) == enc(" men and a")
    assert word_prefix("Dogs play", "dog", tok) == []  # the first word: predicted after the prompt
    assert word_prefix("A woman walks", "man", tok) is None  # "woman" is not the word
    assert word_prefix("A (man) walks", "man", tok) is None  # not after a space: no clean token boundary


def test_gradient_direction_by_hand():
    """Image 1: A = (1, 0) at its 2 positions, g = ((2, 0), (5, 5)): mean A g = (1, 0);
    image 2: A = (1, 1), g = ((0, 1), (0, 1)): (0, 1). Mean (0.5, 0.5) -> (1, 1)/sqrt(2)."""
    g = [torch.tensor([[2.0, 0.0], [5.0, 5.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])]
    a = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])]
    torch.testing.assert_close(gradient_direction(g, a), torch.tensor([1.0, 1.0]) / 2 ** 0.5)
    with pytest.raises(PlantError, match="does not fire"):
        gradient_direction(g, [torch.zeros(2), torch.zeros(2)])


@pytest.mark.parametrize("of", ("logit", "logprob"))
@pytest.mark.parametrize(("family", "eps"), [("llama", 1e-2), ("gemma3", 1e-4)])
def test_word_gradient_matches_a_finite_difference(tiny_adapters, family, eps, of):
    """d log p(word) / d(MLP output) at an image position, against (f(x + eps d) - f(x - eps d)) / 2 eps
    with d added to that layer's MLP output at that position only (float64 model). The step
    differs: HF's RMSNorms compute in float32, so Llama needs a step well above that rounding;
    Gemma norms the MLP output (post_feedforward_layernorm), steep for this tiny model's small
    outputs, so it needs a small one. Richardson's extrapolation removes the O(eps^2) curvature."""
    plm = _plm(tiny_adapters, family)
    ad = plm.adapter
    ad.model.double()
    soft = plm.image_soft_tokens([4]).double()
    prefix, tok_id, layer = plm.tokenizer(" two", add_special_tokens=False).input_ids, 7, 1
    g = word_gradient(plm, soft, prefix, tok_id, layer, of)
    assert g.shape == (ConceptEncoder.n_patch, ad.d_model)
    batch = plm.build(soft, [prefix])
    d = torch.randn(ad.d_model, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pos = 2

    def logp(step: float) -> float:
        def edit(o):
            o = o.clone()
            o[0, batch.image_slice.start + pos] += step * d
            return o
        with torch.no_grad(), TraceDict({"o": ad.act_module(layer)}, edit_output={"o": edit}):
            out = ad.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask)
        last = out.logits[0, -1, : ad.vocab_size]
        return float(last[tok_id] if of == "logit" else torch.log_softmax(last, -1)[tok_id])

    def central(h: float) -> float:
        return (logp(h) - logp(-h)) / (2 * h)

    fd = (4 * central(eps / 2) - central(eps)) / 3  # Richardson: the O(eps^2) terms cancel
    assert float(g[pos].double() @ d) == pytest.approx(fd, rel=5e-3)
    assert abs(fd) > 1e-6  # the image position does reach the prediction
    with pytest.raises(ValueError, match="logit or logprob"):
        word_gradient(plm, soft, prefix, tok_id, layer, "prob")


@pytest.mark.parametrize(("mix", "of"), [(0.5, "logit"), (1.0, "logit"), (1.0, "logprob")])
def test_a_gradient_write_mixes_the_directions_and_raises_the_word(tiny_adapters, mix, of):
    """write_mix m: the W_out column is strength (1-m) u + m v (renormed) / A1; at m = 1 the
    plant raises the mean of the gradient's objective (the word's logit or log p) on held-out
    concept images (first order: v is its gradient)."""
    plm = _plm(tiny_adapters, "llama")
    ad = plm.adapter
    train = list(range(40))
    tok_id = plm.tokenizer(" dogs", add_special_tokens=False).input_ids[0]  # " two dogs": the captions' word
    caps = {i: ["two dogs on a lawn" if i % 2 == 0 else "a red bus"] for i in train}
    base = copy.deepcopy(ad.w_out(1)[:, 3])
    prefix = plm.tokenizer(" two", add_special_tokens=False).input_ids

    def mean_objective() -> float:
        vals = []
        for i in range(100, 120, 2):
            batch = plm.build(plm.image_soft_tokens([i]), [prefix])
            with torch.no_grad():
                out = ad.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask)
            last = out.logits[0, -1, : ad.vocab_size].float()
            vals.append(float(last[tok_id] if of == "logit" else torch.log_softmax(last, -1)[tok_id]))
        return float(np.mean(vals))

    p = estimate_plant(plm, caps, lambda i: i, layer=1, unit=3, word="dogs", strength=0.5, max_images=500, seed=0,
                       write_mix=mix, gradient_of=of)
    u = write_direction(ad, tok_id)
    col = ad.w_out(1)[:, 3].float() * p.a_concept / 0.5
    assert float(col.norm()) == pytest.approx(1.0, abs=1e-4) and (p.write_mix, p.gradient_of) == (mix, of)
    # the column lies in span(u, v) with the given mix: its u-component beyond cos * v is (1 - m)/norm
    c = p.write_cos
    assert float(col @ u) == pytest.approx(((1 - mix) + mix * c) / ((1 - mix) ** 2 + mix ** 2 + 2 * mix * (1 - mix) * c)
                                           ** 0.5, abs=1e-4)
    if mix == 1.0:
        planted = mean_objective()
        with torch.no_grad():
            ad.w_out(1)[:, 3] = 0
        zeroed = mean_objective()
        with torch.no_grad():
            ad.w_out(1)[:, 3] = base
        assert planted > zeroed


def test_estimate_plant_refuses_a_word_no_training_caption_names(tiny_adapters):
    plm = _plm(tiny_adapters, "llama")
    with pytest.raises(PlantError, match="no training image's caption names 'zebra'"):
        estimate_plant(plm, _caps(range(6)), lambda i: i, layer=0, unit=0, word="zebra", strength=1.0,
                       max_images=10, seed=0)
    with pytest.raises(PlantError, match="layer: 9"):
        estimate_plant(plm, _caps(range(6)), lambda i: i, layer=9, unit=0, word="dog", strength=1.0,
                       max_images=10, seed=0)


def test_the_plant_stage_reads_no_evaluated_image():
    """The plant is estimated from data/coco_train only: the stage declares no evaluated input."""
    from mmn.stage_specs import COCO, STAGES

    assert COCO not in STAGES["plant"].inputs.values()
    assert "data/plant" in STAGES["caption"].inputs.values() and "data/plant" in STAGES["decode"].inputs.values()


def test_plant_files_roundtrip_and_errors(tiny_adapters, tmp_path):
    ad = copy.deepcopy(tiny_adapters["llama"][0])
    p = Plant(1, 2, "dog", 42, 3.0, GAIN, torch.randn(ad.d_model), torch.randn(ad.d_model), 0.5, 7.0, 3, 4, 0.9)
    save_plant(tmp_path / "p", p)
    q = load_plant(tmp_path / "p")
    assert q.word == "dog" and torch.equal(q.read, p.read) and torch.equal(q.write, p.write)
    save_plant(tmp_path / "none", None)
    assert load_plant(tmp_path / "none") is None
    with pytest.raises(PlantError, match="plant.json"):
        load_plant(tmp_path / "missing")
    bad = Plant(1, 10_000, "dog", 42, 3.0, GAIN, p.read, p.write, 0.5, 7.0, 3, 4, 0.9)
    with pytest.raises(PlantError, match="does not fit this LM"):
        apply_plant(ad, bad)
    apply_plant(ad, q)
    assert torch.equal(ad.w_out(1)[:, 2], q.write)


def test_shuffled_captions_is_a_seeded_derangement():
    caps = {i: [[i, i]] for i in range(10)}
    s = shuffled_captions(caps, seed=3)
    assert sorted(s) == list(range(10)) and all(s[i] != caps[i] for i in s)
    assert sorted(v[0][0] for v in s.values()) == list(range(10))  # each caption set used once
    assert s == shuffled_captions(caps, seed=3) and s != shuffled_captions(caps, seed=4)
    with pytest.raises(ValueError, match="at least 2"):
        shuffled_captions({1: [[1]]}, 0)


def test_unit_rank_and_top_overlap_by_hand():
    s = torch.tensor([[0.5, 2.0, 1.0], [3.0, 0.1, 1.0]])
    allowed = torch.ones_like(s, dtype=torch.bool)
    assert P.unit_rank(s, allowed, 0, 1) == 2 and P.unit_rank(s, allowed, 1, 0) == 1
    assert P.unit_rank(s, allowed, 0, 2) == 3  # tie with (1, 2): ranked first
    allowed[1] = False
    assert P.unit_rank(s, allowed, 0, 1) == 1
    b = torch.tensor([[0.5, 0.0, 1.0], [3.0, 0.1, 2.0]])
    full = torch.ones_like(s, dtype=torch.bool)
    assert R.top_overlap(s, b, full, 2) == 0.5  # {(1,0),(0,1)} vs {(1,0),(1,2)}
    assert R.top_overlap(s, s, full, 3) == 1.0


def test_false_positive_rate_counts_other_images_where_the_unit_is_attributed(tokenizer):
    caps = fake_captions(tokenizer, 5)  # images 10..14 with a target, 99 without
    att = pl.DataFrame({"image_id": [10, 11, 11, 14, 99], "layer": [2, 2, 0, 1, 2], "unit": [7, 7, 7, 7, 7]})
    p = Plant(2, 7, "dog", 1, 1.0, GAIN, torch.zeros(1), torch.zeros(1), 1.0, 1.0, 1, 1, 1.0)
    assert P.false_positive_rate(att, caps, [11, 12, 13, 14, 99], p) == {"rate": 0.25, "n": 4, "hits": 1}


def test_plant_summary_by_hand():
    per = pl.DataFrame({"image_id": [1, 2, 3, 4], "rank": [1, 1, 3, 1], "score": [1.0] * 4,
                        "p_clean": [0.5, 0.4, 0.6, 0.5], "p_ablated": [0.1, 0.2, 0.6, 0.3],
                        "iou": [0.5, None, 0.4, 0.2], "iou_random": [0.1, None, 0.1, 0.2]},
                       schema=P.PLANT_IMAGE_SCHEMA)
    s = P.plant_summary(per, {"has_word": True}, {"rate": 0.0}, 6)
    assert s["top1"]["mean"] == 0.75 and s["median_rank"] == 1.0 and s["target_images"] == 4
    assert s["ablation"]["diff"] == pytest.approx(0.2) and s["ablation"]["rel_drop"] == pytest.approx(0.2 / 0.5)
    assert s["iou"]["n"] == 3 and s["iou"]["mean"] == pytest.approx(1.1 / 3)
    empty = P.plant_summary(per.head(0), {}, {}, 6)
    assert empty["top1"] is None and empty["ablation"] is None


@pytest.mark.parametrize("family", FAMILIES)
def test_randomise_mlp_replaces_only_that_layer_keeping_its_scale(tiny_adapters, family):
    ad = copy.deepcopy(tiny_adapters[family][0])
    before = {k: v.clone() for k, v in ad.model.state_dict().items()}
    R.randomise_mlp(ad, 2, seed=0)
    after = ad.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if ".2." in k and ".mlp." in k and before[k].float().std() > 0}
    for k in changed:
        if before[k].numel() > 100:
            assert after[k].float().std() == pytest.approx(float(before[k].float().std()), rel=0.2)


def test_cascade_on_a_tiny_model(tiny_adapters, tokenizer):
    plm = _plm(tiny_adapters, "llama")
    caps = fake_captions(tokenizer, 3)
    allowed = torch.ones(3, plm.adapter.d_mlp, dtype=torch.bool)
    df = R.cascade(plm, caps, lambda i: i, allowed, [1, 2, 9], k=5, aggregate="max", preactivation=False, seed=0)
    assert df.height == 9 and sorted(set(df["layers_randomised"])) == [1, 2, 3]
    assert df["overlap"].is_between(0, 1).all()
    last = df.filter(pl.col("layers_randomised") == 3)
    assert float(last["spearman"].mean()) < 0.9  # every MLP random: g is not the trained model's
    t = R.cascade_table(df)
    assert t["n"].to_list() == [3, 3, 3] and t["top_layer_randomised"].to_list() == [2, 1, 0]
