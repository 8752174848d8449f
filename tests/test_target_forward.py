"""ImagePrefixLM.target_forward, the one forward that reads y^c (optionally under edits), against
full-sequence logits and hand-made hooks; and every y^c reader goes through it."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_prefix_setup
from mmn.models.prefix_lm import ImagePrefixLM


def _rows(plm, soft, text):
    """Three rows of different lengths (right padding) and their targets."""
    tok = plm.tokenizer
    texts = [list(text), list(text[:2]), tok(" two red buses on the").input_ids]
    targets = [tok(" mat").input_ids[0], tok(" dog").input_ids[0], tok(" road").input_ids[0]]
    return plm.build(soft.expand(3, -1, -1), texts), targets


def _full(plm: ImagePrefixLM, batch, targets, hooks=()):
    """Independent read-out: every position's logits, then each row's last real position."""
    handles = [mod.register_forward_pre_hook(fn) for mod, fn in hooks]
    try:
        with torch.no_grad():
            logits = plm.adapter.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits
    finally:
        for h in handles:
            h.remove()
    last = torch.stack([logits[i, n - 1] for i, n in enumerate(batch.lengths)])
    y = torch.stack([last[i, c] for i, c in enumerate(targets)])
    p = torch.stack([torch.softmax(last[i, : plm.adapter.vocab_size].float(), -1)[c] for i, c in enumerate(targets)])
    return y, p


@pytest.mark.parametrize("family", ["gptj", "gpt2", "llama"])
def test_target_forward_equals_full_logits_at_the_predicting_positions(tiny_adapters, family):
    plm, soft, text, _ = tiny_prefix_setup(tiny_adapters, family)
    batch, targets = _rows(plm, soft, text)
    with torch.no_grad():
        fwd = plm.target_forward(batch, targets)
    y, p = _full(plm, batch, targets)
    torch.testing.assert_close(fwd.y, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fwd.probs(), p, rtol=1e-5, atol=1e-7)
    assert fwd.acts == {}


@pytest.mark.parametrize("family", ["gptj", "gpt2", "llama"])
def test_target_forward_edits_and_retains_like_hand_made_hooks(tiny_adapters, family):
    plm, soft, text, _ = tiny_prefix_setup(tiny_adapters, family)
    ad = plm.adapter
    batch, targets = _rows(plm, soft, text)
    sl = batch.image_slice

    def zero_unit(x):  # unit 3 zeroed at the image positions
        x = x.clone()
        x[:, sl, 3] = 0
        return x

    seen = {}

    def by_hand(_mod, args):
        seen["a1"] = zero_unit(args[0])
        return (seen["a1"], *args[1:])

    def keep_z(_mod, _args, out):
        seen["z0"] = out

    def hooks():  # transformers itself keeps hooks once a caller asked for hidden states
        return {n: (list(m._forward_pre_hooks), list(m._forward_hooks)) for n, m in ad.model.named_modules()}

    before = hooks()
    with torch.no_grad():
        fwd = plm.target_forward(batch, targets, edits={1: zero_unit}, retain=[1])
        pre = plm.target_forward(batch, targets, retain=[0], preactivation=True)
    h = ad.preact_module(0).register_forward_hook(keep_z)
    try:
        y, p = _full(plm, batch, targets, [(ad.act_module(1), by_hand)])
    finally:
        h.remove()
    torch.testing.assert_close(fwd.y, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fwd.probs(), p, rtol=1e-5, atol=1e-7)
    assert torch.equal(fwd.acts[1], seen["a1"])  # retained after the edit: what W_out saw
    assert bool((fwd.acts[1][:, sl, 3] == 0).all())
    torch.testing.assert_close(pre.acts[0], seen["z0"], rtol=1e-5, atol=1e-6)
    assert hooks() == before  # every hook target_forward and the test added is removed


def test_every_y_reader_goes_through_target_forward(tiny_adapters, monkeypatch):
    """attribution (every method), the score map, ablation p(c) and the set effects all read y^c
    through ImagePrefixLM.target_forward (one forward, not one per module)."""
    from mmn.neurons.ablation import set_effects, target_probs, unit_masks
    from mmn.neurons.attribution import attribute_topk, attribution_maps
    from mmn.neurons.methods import unit_score_map

    plm, soft, text, target = tiny_prefix_setup(tiny_adapters, "llama")
    calls = []
    real = ImagePrefixLM.target_forward

    def spy(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(ImagePrefixLM, "target_forward", spy)
    ad = plm.adapter
    for fn in (lambda: attribution_maps(plm, soft, [text], [target]),
               lambda: attribute_topk(plm, soft, [text], [target], 3, method="direct_logit"),
               lambda: unit_score_map(plm, soft, text, target, "integrated_gradients", ig_steps=2),
               lambda: target_probs(plm, soft, text, target, unit_masks([[], [(0, 1)]], ad.n_layers, ad.d_mlp)),
               lambda: set_effects(plm, soft, text, target, [[], [(1, 2)]])):
        calls.clear()
        fn()
        assert calls, fn
