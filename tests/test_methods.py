"""Attribution methods (grad_x_act, direct_logit, integrated_gradients) and their comparison
against exact single-unit ablation, on tiny random models."""

from __future__ import annotations

import copy

import numpy as np
import polars as pl
import pytest
import torch
from torch import nn

from conftest import tiny_prefix_setup
from helpers.fakes import FakeEncoder, captions
from mmn.models.prefix_lm import ImagePrefixLM
from mmn.neurons.ablation import set_effects, single_unit_effects
from mmn.neurons.attribution import attribute_topk, attribution_maps
from mmn.neurons.methods import METHODS, integrated_gradients_pass, method_pass, unit_score_map
from mmn.neurons.scoring import unit_scores

N_PATCH, D_ENC = 6, 12


def _setup(tiny_adapters, family):
    return tiny_prefix_setup(tiny_adapters, family)


def _w_out_column(mod: nn.Module, family: str) -> torch.Tensor:
    """W_out as [d_model, d_mlp] read straight from the module weights (GPT-2 Conv1D is transposed)."""
    return mod.weight.T if family == "gpt2" else mod.weight


@pytest.mark.parametrize("family", ["gptj", "gpt2", "llama"])
def test_direct_logit_equals_a_hand_computation(tiny_adapters, family):
    """g = A_{p,k} · Σ_d W_U[c, d] W_out[d, k]: A from a plain forward pre-hook, W_U from the
    LM head's weight, the dot product as an explicit sum; the top units are the hand map's."""
    plm, soft, text, target = _setup(tiny_adapters, family)
    ad = plm.adapter
    model = ad.model
    acts = {}
    hooks = [ad.act_module(l).register_forward_pre_hook(lambda m, a, l=l: acts.__setitem__(l, a[0].detach()))
             for l in range(ad.n_layers)]
    batch = plm.build(soft, [text])
    with torch.no_grad():
        logits = model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits
    for h in hooks:
        h.remove()
    sl = batch.image_slice
    w_u = model.get_output_embeddings().weight[target]  # [d_model]
    hand = torch.stack([
        acts[l][0, sl, :] * (w_u[:, None] * _w_out_column(ad.act_module(l), family)).sum(0)[None, :]
        for l in range(ad.n_layers)])  # [L, P, U]
    y, tops = attribute_topk(plm, soft, [text], [target], k=7, method="direct_logit")
    assert float(y[0]) == pytest.approx(float(logits[0, -1, target]), abs=1e-5)
    t = tops[0]
    torch.testing.assert_close(t.g, hand[t.layer, t.patch, t.unit], atol=1e-6, rtol=1e-5)
    unit_max = hand.amax(dim=1).reshape(-1)  # [L*U] max over patches
    expect = torch.sort(unit_max, descending=True, stable=True).indices[:7]
    assert (t.layer * ad.d_mlp + t.unit).tolist() == expect.tolist()
    # the direct-logit weight is the same for every patch of a unit: `gradient` holds it
    torch.testing.assert_close(t.gradient * t.activation, t.g)


def _scaled(tiny_adapters, family, factor=10.0):
    """The tiny model with every weight matrix but the embeddings ×factor: far from linear in
    A (the fixtures' 0.02-std weights are almost linear, so every method would agree)."""
    from mmn.models.lm import prepare_lm

    ad0, tok = tiny_adapters[family]
    model = copy.deepcopy(ad0.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "wte" not in name and "embed_tokens" not in name:
                p.mul_(factor)
    return _setup({family: prepare_lm(model, tok)}, family)


@pytest.mark.parametrize("family", ["gptj", "gpt2", "llama"])
def test_integrated_gradients_is_complete_layer_by_layer(tiny_adapters, family):
    """Per layer l: Σ_{p,k} A_l·M_l ≈ y(A) − y(A_l = 0 at the image positions), each gap from
    the ablation code (every unit of l zeroed, the later layers computing); path points in
    chunks equal one pass. (Scaling every layer together, the variant before, is complete only
    for the sum over layers against y(0) and fails this per-layer identity.)"""
    plm, soft, text, target = _scaled(tiny_adapters, family)
    ad = plm.adapter
    layers = list(range(ad.n_layers))
    y, acts, mult = integrated_gradients_pass(plm, soft, [text], [target], layers, steps=64)
    y_set, _ = set_effects(plm, soft, text, target, [[]] + [[(l, u) for u in range(ad.d_mlp)] for l in layers])
    assert float(y[0]) == pytest.approx(float(y_set[0]), abs=1e-5)
    gaps = [float(y_set[0] - y_set[1 + l]) for l in layers]
    assert max(abs(g) for g in gaps) > 5e-3  # the check is not vacuous (250 x the tolerance)
    totals = [float((a.double() * m.double()).sum()) for a, m in zip(acts, mult)]
    for l in layers:
        assert totals[l] == pytest.approx(gaps[l], rel=2e-3, abs=2e-5), (l, totals[l], gaps[l])
    # one step (the gradient at α = 1/2) is a cruder sum: the test can tell the difference
    _, a1, m1 = integrated_gradients_pass(plm, soft, [text], [target], layers, steps=1)
    crude = [float((a.double() * m.double()).sum()) for a, m in zip(a1, m1)]
    assert max(abs(c - g) for c, g in zip(crude, gaps)) > 10 * max(abs(t - g) for t, g in zip(totals, gaps))
    _, _, chunked = integrated_gradients_pass(plm, soft, [text], [target], layers, steps=64, rows=5)
    for m, c in zip(mult, chunked):
        torch.testing.assert_close(m, c, atol=1e-6, rtol=1e-5)


def test_integrated_gradients_batch_of_images_equals_one_at_a_time(tiny_adapters):
    plm, soft, text, target = _setup(tiny_adapters, "gpt2")
    soft2 = torch.cat([soft, soft.flip(1)])
    texts, targets = [text, text[:-1]], [target, text[-1]]
    _, acts, mult = integrated_gradients_pass(plm, soft2, texts, targets, [0, 2], steps=4)
    for i in range(2):
        _, a1, m1 = integrated_gradients_pass(plm, soft2[i: i + 1], [texts[i]], [targets[i]], [0, 2], steps=4)
        for a, m, a_, m_ in zip(acts, mult, a1, m1):
            torch.testing.assert_close(a[i], a_[0], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(m[i], m_[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["gptj", "gpt2", "llama"])
def test_batched_single_unit_ablation_equals_one_at_a_time(tiny_adapters, family):
    """single_unit_effects (rows of one forward, in chunks of 3) equals each unit zeroed alone
    at the image positions by a hand-written pre-hook on its W_out, one forward per unit."""
    plm, soft, text, target = _scaled(tiny_adapters, family)
    ad = plm.adapter
    units = [(0, 1), (0, 5), (1, 3), (2, 0), (2, 7), (1, 11), (0, 2)]
    got = single_unit_effects(plm, soft, text, target, units, rows=3)
    batch = plm.build(soft, [text])
    sl = batch.image_slice

    def run(unit=None):
        h = None
        if unit is not None:
            def zero(m, args, u=unit[1]):
                x = args[0].clone()
                x[:, sl, u] = 0
                return (x,)
            h = ad.act_module(unit[0]).register_forward_pre_hook(zero)
        with torch.no_grad():
            logits = ad.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits
        if h is not None:
            h.remove()
        z = logits[0, -1].float()
        return float(z[target]), float(torch.softmax(z[: ad.vocab_size], -1)[target])

    y0, p0 = run()
    assert got["y_clean"] == pytest.approx(y0, abs=1e-5) and got["p_clean"] == pytest.approx(p0, abs=1e-7)
    for i, u in enumerate(units):
        yu, pu = run(u)
        assert float(got["dy"][i]) == pytest.approx(y0 - yu, abs=1e-5)
        assert float(got["dp"][i]) == pytest.approx(p0 - pu, abs=1e-7)
    assert float(got["dy"].abs().max()) > 1e-3  # some unit matters: not a vacuous equality


def _gpt2_copy(tiny_adapters):
    """``(model, plm, soft, text, target)``: a copy of the tiny GPT-2 that a test may edit, behind
    a seeded projection, the text " a cat on the" and the target " mat"."""
    from mmn.models.lm import prepare_lm

    ad0, tok = tiny_adapters["gpt2"]
    model = copy.deepcopy(ad0.model)
    ad, tok = prepare_lm(model, tok)
    torch.manual_seed(0)
    plm = ImagePrefixLM(ad, tok, nn.Linear(D_ENC, ad.d_model))
    soft = plm.soft_tokens(torch.randn(1, N_PATCH, D_ENC) * 2).detach()
    return model, plm, soft, tok(" a cat on the").input_ids, tok(" mat").input_ids[0]


def _planted(tiny_adapters, layer=0, unit=5, beta=4.0):
    """A tiny GPT-2 where unit (layer, unit) fires (A ≈ 5) only at the image positions and writes
    β·W_U[c]/|W_U[c]| there; later layers' attention is uniform with identity OV, so that
    direction reaches the position that predicts c."""
    model, plm, soft, text, target = _gpt2_copy(tiny_adapters)
    ad, tok, d = plm.adapter, plm.tokenizer, plm.adapter.d_model
    with torch.no_grad():
        for blk in model.transformer.h[layer + 1:]:
            w = blk.attn.c_attn.weight  # Conv1D [d, 3d]: Q | K | V
            w.zero_()
            w[:, 2 * d:] = torch.eye(d)
            blk.attn.c_attn.bias.zero_()
            blk.attn.c_proj.weight.copy_(torch.eye(d))
            blk.attn.c_proj.bias.zero_()
        # the MLP input of `layer` (unchanged by editing that MLP's unit)
        seen = {}
        h = model.transformer.h[layer].mlp.c_fc.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
        batch = plm.build(soft, [text])
        model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask)
        h.remove()
        x = seen["x"][0]  # [T, d]
        want = torch.full((x.shape[0],), -5.0)
        want[batch.image_slice] = 5.0
        xb = torch.cat([x, torch.ones(x.shape[0], 1)], 1)
        sol = torch.linalg.lstsq(xb.double(), want.double()[:, None]).solution[:, 0].float()
        mlp = model.transformer.h[layer].mlp
        mlp.c_fc.weight[:, unit] = sol[:-1]
        mlp.c_fc.bias[unit] = sol[-1]
        w_u = model.lm_head.weight[target]
        mlp.c_proj.weight[unit] = beta * w_u / w_u.norm()
    return plm, soft, text, target


def test_planted_unit_is_ranked_first_by_every_method(tiny_adapters):
    """The planted unit (its ablation drops y^c the most, checked) is every method's top unit."""
    plm, soft, text, target = _planted(tiny_adapters)
    ad = plm.adapter
    everyone = [(l, u) for l in range(ad.n_layers) for u in range(ad.d_mlp)]
    dy = single_unit_effects(plm, soft, text, target, everyone, rows=256)["dy"]
    assert everyone[int(dy.argmax())] == (0, 5)
    assert float(dy.max()) > 5 * float(torch.sort(dy, descending=True).values[1])
    for m in METHODS:
        _, tops = attribute_topk(plm, soft, [text], [target], k=3, method=m, ig_steps=8)
        assert (int(tops[0].layer[0]), int(tops[0].unit[0])) == (0, 5), m
        # the planted unit fires only at image positions: ablating it there is its whole effect
        assert float(tops[0].activation[0]) > 4.0


def test_compare_image_on_the_planted_unit(tiny_adapters):
    """compare_image: every method's precision@1 is 1 (the planted unit is the exact top),
    candidates hold the planted unit with its exact dy, IG's completeness error is small
    with many steps, and ablating the top unit drops p(c) for every method."""
    import scipy.stats

    from mmn.experiments.compare_methods import VARIANTS, compare_image, uniform_units

    plm, soft, text, target = _planted(tiny_adapters)
    ad = plm.adapter
    allowed = torch.ones(ad.n_layers, ad.d_mlp, dtype=torch.bool)
    cand, per, curve = compare_image(plm, soft, text, target, allowed, candidates=4, precision_k=1, ks=[0, 1],
                                     ig_steps=64, rows=8, sample=12, rng=np.random.default_rng(3))
    row = next(c for c in cand if (c["layer"], c["unit"]) == (0, 5))
    ref = single_unit_effects(plm, soft, text, target, [(0, 5)])
    assert row["dy"] == pytest.approx(float(ref["dy"][0]), abs=1e-5)
    by = {r["method"]: r for r in per}
    assert set(by) == set(VARIANTS)
    assert all(by[m]["precision"] == 1.0 for m in METHODS)
    # the correlations: over the 12 uniformly sampled units (chosen by no score), and over the candidates
    sampled = [c for c in cand if c["sampled"]]
    assert len(sampled) == 12 == by["grad_x_act"]["n_sampled"]
    assert {(c["layer"], c["unit"]) for c in sampled} == set(uniform_units(allowed, 12, np.random.default_rng(3)))
    for v in VARIANTS:
        rho = scipy.stats.spearmanr([c[f"score_{v}"] for c in sampled], [c["dy"] for c in sampled]).statistic
        assert by[v]["spearman"] == pytest.approx(rho)
        union = [c for c in cand if c["candidate"]]
        rho_u = scipy.stats.spearmanr([c[f"score_{v}"] for c in union], [c["dy"] for c in union]).statistic
        assert by[v]["spearman_union"] == pytest.approx(rho_u)
    assert by["integrated_gradients"]["completeness"] < 5e-3
    for c in curve:
        assert c["rel_drop"] == pytest.approx(0.0, abs=1e-6) if c["k"] == 0 else c["rel_drop"] > 0.1


@pytest.mark.parametrize("family", ["gpt2", "gptj"])
def test_grad_x_act_multiplier_is_the_derivative_of_y(tiny_adapters, family):
    """method="grad_x_act": M = dy/dA, checked against central finite differences of y under a
    forward that nudges one A entry (a model in float64, no autograd), for units of every layer;
    the unit score map is max over image positions of A·M. (Not Llama: its RMSNorm computes in
    float32 even in a float64 model, so y is only good to ~1e-9 and the differences are noise.)"""
    from mmn.models.lm import prepare_lm

    ad0, tok = tiny_adapters[family]
    ad, _ = prepare_lm(copy.deepcopy(ad0.model).double(), tok)
    torch.manual_seed(0)
    plm = ImagePrefixLM(ad, tok, nn.Linear(12, ad.d_model).double())
    soft = plm.soft_tokens(torch.randn(1, 6, 12, dtype=torch.float64) * 2).detach()
    text, target = tok(" a cat on the").input_ids, tok(" mat").input_ids[0]
    L = plm.adapter.n_layers
    y, acts, mult = method_pass(plm, soft, [text], [target], list(range(L)))
    batch = plm.build(soft, [text])
    sl, eps = batch.image_slice, 1e-4

    def y_nudged(layer: int, patch: int, unit: int, d: float) -> float:
        def edit(x):
            x = x.clone()
            x[:, sl.start + patch, unit] += d
            return x
        with torch.no_grad():
            return float(plm.target_forward(batch, [target], edits={layer: edit}).y[0])

    rng = np.random.default_rng(0)
    for layer in range(L):
        for _ in range(2):
            patch, unit = int(rng.integers(mult[layer].shape[1])), int(rng.integers(mult[layer].shape[2]))
            fd = (y_nudged(layer, patch, unit, eps) - y_nudged(layer, patch, unit, -eps)) / (2 * eps)
            assert float(mult[layer][0, patch, unit]) == pytest.approx(fd, rel=2e-3, abs=1e-8), (layer, patch, unit)
    _, s, _ = unit_score_map(plm, soft, text, target, "grad_x_act")
    want = torch.stack([(a[0] * m[0]).amax(0) for a, m in zip(acts, mult)]).float()
    assert torch.allclose(s, want, rtol=1e-6, atol=1e-9)


def test_bad_method_and_preactivation_combination_are_clear_errors(tiny_adapters):
    from mmn.params import AttributeParams

    plm, soft, text, target = _setup(tiny_adapters, "gpt2")
    with pytest.raises(ValueError, match="attribute.method must be one of"):
        attribute_topk(plm, soft, [text], [target], k=3, method="saliency")
    with pytest.raises(ValueError, match="preactivation"):
        attribute_topk(plm, soft, [text], [target], k=3, method="direct_logit", preactivation=True)
    with pytest.raises(ValueError, match="preactivation is defined for method grad_x_act only"):
        AttributeParams(k=3, batch_size=1, preactivation=True, method="integrated_gradients")


def test_precision_at_k_and_curve_area_on_hand_cases():
    from mmn.experiments.compare_methods import curve_area, precision_at_k

    units = [(0, 0), (0, 1), (1, 0), (1, 1)]
    dy = np.array([0.1, 3.0, 2.0, -1.0])  # exact top 2: (0, 1), (1, 0)
    assert precision_at_k([(0, 1), (1, 1), (1, 0)], units, dy, 2) == 0.5
    assert precision_at_k([(1, 0), (0, 1)], units, dy, 2) == 1.0
    # ks equally spaced: trapezoids (0+0.2)/2, (0.2+0.6)/2 -> mean 0.25
    assert curve_area([0.0, 0.2, 0.6]) == pytest.approx(0.25)


def _leaves(d) -> list:
    return [x for v in d.values() for x in (_leaves(v) if isinstance(v, dict) else [v])]


def test_compare_methods_stage_in_process(tiny_adapters, tmp_path, monkeypatch):
    """stages.compare_methods on a tiny LM: per-image rows for every method, candidates = the
    union of the methods' tops with exact dy (checked against single_unit_effects), compact
    numbers-only metrics, a curve row per (method, k), strings in the info file."""
    import json

    import yaml
    from click.testing import CliRunner

    import mmn.data.layout
    import mmn.pipeline
    import stages.compare_methods as S

    ad, tok = tiny_adapters["gpt2"]
    torch.manual_seed(0)
    plm = ImagePrefixLM(ad, tok, nn.Linear(D_ENC, ad.d_model), encoder=FakeEncoder(N_PATCH, D_ENC, 2))
    raw = yaml.safe_load(open("params.yaml"))
    raw["ablate"]["ks"] = [0, 3, 10, 50]
    raw["attribute"].update(layers=None, ig_steps=4)
    raw["compare"] = {"candidates": 6, "precision_k": 3, "batch_size": 16, "max_images": 4}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    caps = captions(tok, 5)
    caps.write_parquet(tmp_path / "captions.parquet")

    class Layout:
        def __init__(self, root):
            pass

        def load_image(self, i):
            return i

    monkeypatch.setenv("PYTHONHASHSEED", "0")
    monkeypatch.setattr(mmn.pipeline, "build_prefix_lm", lambda params, d, plant=None: plm)
    monkeypatch.setattr(mmn.data.layout, "CocoLayout", Layout)
    def run(d):
        d.mkdir(exist_ok=True)
        out = {n: d / n for n in ("c.parquet", "s.csv", "c.csv", "m.json", "full.json", "i.json")}
        r = CliRunner().invoke(S.main, ["--params", str(tmp_path / "params.yaml"), "--captions",
                                        str(tmp_path / "captions.parquet"), "--out", str(out["c.parquet"]),
                                        "--table", str(out["s.csv"]), "--curve", str(out["c.csv"]),
                                        "--metrics", str(out["m.json"]), "--results", str(out["full.json"]),
                                        "--info", str(out["i.json"]),
                                        "--coco", str(tmp_path), "--projection", str(tmp_path),
                                        "--plant", str(tmp_path)])
        assert r.exit_code == 0, r.output + repr(r.exception)
        return out

    out, again = run(tmp_path / "a"), run(tmp_path / "b")
    for name in ("c.parquet", "s.csv", "c.csv", "m.json", "full.json"):  # a rerun rewrites them byte for byte
        assert out[name].read_bytes() == again[name].read_bytes(), name
    from mmn.headline import headline

    m = json.loads(out["full.json"].read_text())
    assert json.loads(out["m.json"].read_text()) == headline("methods", m)  # metrics = the headline of the full
    leaves = _leaves(m)
    # the full results (data/results/); metrics/methods.json holds 6 of them
    assert len(leaves) <= 80 and all(v is None or isinstance(v, (int, float)) for v in leaves)
    assert m["n_images"] == 4 and set(METHODS) <= set(m)
    assert m["grad_x_act"]["spearman"]["n"] == 4 and 0 <= m["direct_logit"]["precision"] <= 1
    cand = pl.read_parquet(out["c.parquet"])
    assert sorted(cand["image_id"].unique().to_list()) == [10, 11, 12, 13]
    # every image: at least one variant's 6 candidates, at most all six variants' distinct ones, plus the
    # 32 uniformly sampled units (compare.sample's default), which may coincide with candidates
    per_img = cand.group_by("image_id").len()["len"]
    assert per_img.min() >= 32 and per_img.max() <= 36 + 32
    assert set(cand.group_by("image_id").agg(pl.col("sampled").sum())["sampled"]) == {32}
    # the exact dy of image 10's candidates, recomputed one call per unit
    c10 = cand.filter(pl.col("image_id") == 10)
    r10 = caps.filter(pl.col("image_id") == 10).row(0, named=True)
    soft = plm.soft_tokens(FakeEncoder(N_PATCH, D_ENC, 2).encode([10]))
    units = list(zip(c10["layer"].to_list(), c10["unit"].to_list()))
    text = list(r10["caption_token_ids"][: r10["target_pos"]])
    ref = single_unit_effects(plm, soft, text, int(r10["target_token_id"]), units, rows=1)
    np.testing.assert_allclose(c10["dy"].to_numpy(), ref["dy"].numpy(), atol=1e-5)
    # each method's own top 6 (by its score) are among the candidates
    for meth in METHODS:
        _, s, _ = unit_score_map(plm, soft, text, int(r10["target_token_id"]), meth, ig_steps=4)
        top6 = torch.sort(s.reshape(-1), descending=True, stable=True).indices[:6].tolist()
        assert {(i // ad.d_mlp, i % ad.d_mlp) for i in top6} <= set(units), meth
    curve = pl.read_csv(out["c.csv"])
    assert curve.height == len(METHODS) * 2 * 4 and set(curve["n"]) == {4}  # max and sum per method
    k0 = curve.filter(pl.col("k") == 0)
    assert (k0["rel_drop"].abs() < 1e-6).all()
    summ = pl.read_csv(out["s.csv"])
    sp = summ.filter(pl.col("method") == "integrated_gradients", pl.col("metric") == "spearman",
                     pl.col("vs").is_null()).row(0, named=True)
    assert m["integrated_gradients"]["spearman"]["mean"] == pytest.approx(sp["mean"], abs=1e-6)
    info = json.loads(out["i.json"].read_text())
    assert info["settings"]["compare"]["candidates"] == 6 and info["settings"]["attribute.ig_steps"] == 4
    assert "spearman" in info["definitions"] and info["stage"] == "compare_methods"
    assert set(info["seconds_per_image"]) == set(METHODS)
    assert all(t["n"] == 4 and t["mean"] > 0 for t in info["seconds_per_image"].values())
    # wall time stays out of the reproducible outputs
    assert "seconds" not in set(summ["metric"]) and "seconds" not in json.dumps(m)


def test_check_methods_rejects_duplicates_and_non_finite_scores():
    from mmn.quality import QualityError, check_methods

    row = {"image_id": 1, "layer": 0, "unit": 3, "dy": 0.5, "dp": 0.01} | {f"score_{m}": 1.0 for m in METHODS}
    check_methods(pl.DataFrame([row, row | {"unit": 4}]))
    with pytest.raises(QualityError, match="unique"):
        check_methods(pl.DataFrame([row, row]))
    with pytest.raises(QualityError, match="finite"):
        check_methods(pl.DataFrame([row, row | {"unit": 4, "score_direct_logit": float("nan")}]))


@pytest.mark.parametrize("method", ["direct_logit", "integrated_gradients"])
def test_attribute_captions_with_a_method_passes_the_gate_and_matches_the_score_map(tiny_adapters, method):
    """The attribute stage's table for a method: passes the attributions suite (g = A·M, k
    distinct units), and each image's units are the top k of unit_score_map (another path:
    full max-over-patches map, one sort), with the same scores."""
    from mmn.neurons.attribution import attribute_captions
    from mmn.quality import check_attributions

    plm, *_ = _scaled(tiny_adapters, "llama")
    ad = plm.adapter
    caps = captions(plm.tokenizer, 3).with_columns(pl.col("target_token_id").cast(str).alias("target_token"))
    plm.encoder = FakeEncoder(N_PATCH, D_ENC, 2)
    df = attribute_captions(caps, lambda i: i, plm, k=5, batch_size=2, progress=False,
                            method=method, ig_steps=4)
    check_attributions(df, k=5, n_layers=ad.n_layers, n_units=ad.d_mlp, n_patches=N_PATCH,
                       layers=list(range(ad.n_layers)), rank_by="unit")
    for r in caps.filter("has_noun").iter_rows(named=True):
        soft = plm.soft_tokens(FakeEncoder(N_PATCH, D_ENC, 2).encode([r["image_id"]]))
        text = list(r["caption_token_ids"][: r["target_pos"]])
        _, s, _ = unit_score_map(plm, soft, text, int(r["target_token_id"]), method, ig_steps=4)
        vals, idx = torch.sort(s.reshape(-1), descending=True, stable=True)
        got = df.filter(pl.col("image_id") == r["image_id"]).sort("rank")
        assert [l * ad.d_mlp + u for l, u in zip(got["layer"], got["unit"])] == idx[:5].tolist()
        np.testing.assert_allclose(got["g"].to_numpy(), vals[:5].numpy(), rtol=1e-5, atol=1e-6)


def test_completeness_is_summarised_by_its_median_and_ratio_of_sums():
    """A tiny y(A) - y(0) on one image makes its relative error huge (5.0 here) and the mean of
    per-image ratios with it (1.73); the median (0.1) and the ratio of sums (0.205 / 2.001) are
    not dominated by it; both carry bootstrap CIs over images."""
    from mmn.experiments.compare_methods import method_summary

    rows = [{"image_id": i, "method": "grad_x_act", "total": t, "gap": g, "spearman": 0.1 * i}
            for i, (t, g) in enumerate([(1.1, 1.0), (0.9, 1.0), (0.006, 0.001), (2.2, 2.0)])]
    per = pl.DataFrame(rows).with_columns(
        ((pl.col("total") - pl.col("gap")).abs() / pl.col("gap").abs()).alias("completeness"))
    assert per["completeness"].mean() == pytest.approx((0.1 + 0.1 + 5.0 + 0.1) / 4)
    for c in ("kendall", "spearman_union", "kendall_union", "precision", "auc"):
        per = per.with_columns(pl.lit(None, dtype=pl.Float64).alias(c))
    s = {r["metric"]: r for r in method_summary(per).filter(pl.col("vs").is_null()).iter_rows(named=True)}
    assert s["completeness_median"]["mean"] == pytest.approx(0.1)
    assert s["completeness_ratio"]["mean"] == pytest.approx((0.1 + 0.1 + 0.005 + 0.2) / (1 + 1 + 0.001 + 2))
    for m in ("completeness_median", "completeness_ratio"):
        assert s[m]["lo"] <= s[m]["mean"] <= s[m]["hi"] and s[m]["n"] == 4
    assert "completeness" not in s  # the mean of ratios is no longer reported


def _planted_mediated(tiny_adapters, u0=5, u1=7, beta=4.0):
    """A tiny 3-layer GPT-2 where unit (0, u0) acts on y^c ONLY through layer 1's MLP: it fires
    at the image positions and writes a direction v orthogonal to W_U[c]; layer 1 moves nothing
    across positions (attention output zeroed) and its unit u1 fires when v is there, writing
    W_U[c]; layer 2's attention is uniform with identity OV (it carries that to the predicting
    position) and its MLP writes nothing."""
    model, plm, soft, text, target = _gpt2_copy(tiny_adapters)
    ad, d, h = plm.adapter, plm.adapter.d_model, model.transformer.h
    w_u = model.lm_head.weight[target].detach()
    v = torch.randn(d)
    v = v - v.mean()
    v = v - (v @ w_u) / (w_u @ w_u) * w_u  # orthogonal to W_U[c]
    v = v / v.norm()
    batch = plm.build(soft, [text])

    def mlp_input(layer: int) -> torch.Tensor:
        seen = {}
        hk = h[layer].mlp.c_fc.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
        model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask)
        hk.remove()
        return seen["x"][0]  # [T, d]

    with torch.no_grad():
        h[1].attn.c_proj.weight.zero_(), h[1].attn.c_proj.bias.zero_()
        w = h[2].attn.c_attn.weight  # Conv1D [d, 3d]: Q | K | V
        w.zero_()
        w[:, 2 * d:] = torch.eye(d)
        h[2].attn.c_attn.bias.zero_(), h[2].attn.c_proj.weight.copy_(torch.eye(d)), h[2].attn.c_proj.bias.zero_()
        h[2].mlp.c_proj.weight.zero_(), h[2].mlp.c_proj.bias.zero_()
        x = mlp_input(0)
        want = torch.full((x.shape[0],), -5.0)
        want[batch.image_slice] = 5.0
        sol = torch.linalg.lstsq(torch.cat([x, torch.ones(x.shape[0], 1)], 1).double(),
                                 want.double()[:, None]).solution[:, 0].float()
        h[0].mlp.c_fc.weight[:, u0], h[0].mlp.c_fc.bias[u0] = sol[:-1], sol[-1]
        h[0].mlp.c_proj.weight[u0] = beta * v
        # layer 1's unit reads v: +5 where layer 0 wrote it (image positions), about -5 elsewhere
        x1 = mlp_input(1)
        r = x1 @ v
        img = torch.zeros(x1.shape[0], dtype=torch.bool)
        img[batch.image_slice] = True
        lo, hi = float(r[~img].max()), float(r[img].min())
        assert hi > lo, "v does not separate the image positions"
        gamma = 10.0 / (hi - lo)
        h[1].mlp.c_fc.weight[:, u1] = gamma * v
        h[1].mlp.c_fc.bias[u1] = 5.0 - gamma * hi
        h[1].mlp.c_proj.weight[u1] = beta * w_u / w_u.norm()
    return plm, soft, text, target


def test_integrated_gradients_credits_a_unit_that_acts_through_a_later_mlp(tiny_adapters):
    """The planted layer-0 unit acts only through layer 1's MLP (its ablation drops y^c the
    most, checked). Per-layer integrated gradients (later layers respond) credits it with about
    its exact effect and ranks it first in its layer; scaling every layer together (the variant
    before) holds layer 1's activations on the path and misses that effect."""
    from mmn.neurons.methods import ig_path_logits

    plm, soft, text, target = _planted_mediated(tiny_adapters)
    ad = plm.adapter
    layers = list(range(ad.n_layers))
    dy = single_unit_effects(plm, soft, text, target, [(0, u) for u in range(ad.d_mlp)], rows=64)["dy"]
    assert int(dy.argmax()) == 5 and float(dy[5]) > 0.5
    _, acts, mult = integrated_gradients_pass(plm, soft, [text], [target], layers, steps=32)
    per_layer = (acts[0][0] * mult[0][0]).sum(0)  # [U]: Σ_p A·M of layer 0's units
    assert int(per_layer.argmax()) == 5
    assert float(per_layer[5]) == pytest.approx(float(dy[5]), rel=0.3)
    # the joint path: every layer's image-position A scaled together
    alphas = (torch.arange(32, dtype=torch.float32) + 0.5) / 32
    _, grads = ig_path_logits(plm, soft, text, target, [a[0] for a in acts], layers, alphas)
    joint = (acts[0][0] * grads[0].mean(0)).sum(0)
    # it misses the mediated effect; what is left is the direct path (v changes the final norm's
    # scale), here of the opposite sign
    assert float(joint[5]) < 0.2 * float(per_layer[5])
