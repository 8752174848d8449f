"""Ablation hooks: exact zero/mean at the image positions, nothing else touched."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from torch import nn

from conftest import REPO, tiny_prefix_setup
from helpers.fakes import FakeEncoder, captions
from mmn.hooks import TraceDict
from mmn.models.prefix_lm import ImagePrefixLM
from mmn.neurons.ablation import ablated, random_ranking, rank_units, target_probs, unit_masks
from mmn.neurons.scoring import unit_scores

N_PATCH, D_ENC = 6, 12


@pytest.fixture(params=["gptj", "gpt2", "llama"])
def setup(request, tiny_adapters):
    return tiny_prefix_setup(tiny_adapters, request.param)


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


def test_rank_units():
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


def test_random_ranking_is_nested_with_the_layer_mix_of_every_prefix():
    """Random sets = prefixes of ONE random ranking: nested across k, and every prefix holds
    as many units per layer as the same prefix of the top ranking; distinct; seeded."""
    from collections import Counter

    order = [(2, 0), (0, 5), (2, 1), (2, 7), (0, 1), (3, 3), (2, 2), (0, 0)]
    rnd = random_ranking(order, 8, np.random.default_rng(0))
    assert len(rnd) == len(order) and len(set(rnd)) == len(rnd)
    for k in range(len(order) + 1):
        assert Counter(l for l, _ in rnd[:k]) == Counter(l for l, _ in order[:k])
    assert rnd == random_ranking(order, 8, np.random.default_rng(0))
    assert rnd != random_ranking(order, 8, np.random.default_rng(1))
    # a whole layer: a permutation of it
    full = random_ranking([(1, u) for u in range(8)], 8, np.random.default_rng(3))
    assert sorted(u for _, u in full) == list(range(8))
    with pytest.raises(ValueError, match="n_units=8"):
        random_ranking([(1, u) for u in range(9)], 8, np.random.default_rng(0))


def test_random_ranking_never_draws_excluded_units_and_marks_a_layer_that_runs_out():
    """``exclude`` (an image's own top units) is never drawn; the layer mix of every prefix is
    kept; when a layer's non-excluded units run out the entry is None (a smaller set, not units
    of other layers); the same seed without ``exclude`` is the same permutation, unfiltered."""
    order = [(0, 0), (0, 1), (0, 2), (1, 0), (0, 3), (0, 4), (0, 5)]  # 6 top units in layer 0 of 8
    top = set(order)
    rnd = random_ranking(order, 8, np.random.default_rng(5), exclude=top)
    drawn = [u for u in rnd if u is not None]
    assert not set(drawn) & top and len(set(drawn)) == len(drawn)
    assert [u is None for u in rnd] == [False, False, True, False, True, True, True]  # layer 0: 8 - 5 = 3 free
    assert [l for l, _ in drawn] == [0, 0, 1]
    plain = random_ranking(order, 8, np.random.default_rng(5))
    assert set(plain) & top  # the overlap the exclusion removes
    free = [u for u in plain if u not in top and u[0] == 0]  # the same permutation, top units skipped
    assert free == [u for u in drawn if u[0] == 0][: len(free)]


def test_random_sets_avoid_the_top_units_and_match_their_partner(tiny_adapters):
    """unit_sets: ``random`` has the unfiltered ranking's layer mix, ``random_filtered`` the
    interpretable ranking's (and its k_effective), neither holds a top unit of either ranking,
    and ``overlap_if_not_excluded`` is the share of top units in the unexcluded draw."""
    from collections import Counter

    from mmn.experiments.ablation import KINDS, _ImageAblation

    plm, _ = _plm(tiny_adapters)
    d = plm.adapter.d_mlp
    order_all = [(0, u) for u in range(d - 4)] + [(1, 0), (1, 1)]  # layer 0 nearly all top
    order_int = [(1, 0), (2, 5), (2, 6)]
    allowed = torch.ones(plm.adapter.n_layers, d, dtype=torch.bool)
    run = _ImageAblation(plm, allowed, allowed, [0, 3, len(order_all)], KINDS, set(), 4, False, 0)
    sets, meta = run.unit_sets(7, order_all, order_int)
    by = {(kind, k): (units, k_eff, ov) for units, (kind, k, k_eff, ov) in zip(sets[1:], meta)}
    top = set(order_all) | set(order_int)
    for (kind, k), (units, k_eff, ov) in by.items():
        assert len(units) == k_eff == len(set(units))
        if kind.startswith("random"):
            assert not set(units) & top, (kind, k)
    k_all = len(order_all)
    units, k_eff, ov = by[("random", k_all)]
    # layer 0 has 4 non-top units for d - 4 top ones: the random set is smaller, never topped up elsewhere
    assert Counter(l for l, _ in units) == {0: 4, 1: 2} and k_eff == 6 < k_all
    assert by[("random", 3)][0] and Counter(l for l, _ in by[("random", 3)][0]) == {0: 3}
    assert ov is not None and 0.9 < ov <= 1  # without exclusion: 60 of layer 0's 64 units, nearly all top
    rf = by[("random_filtered", 3)][0]
    assert Counter(l for l, _ in rf) == Counter(l for l, _ in order_int) and by[("random_filtered", 3)][1] == 3
    assert by[("filtered", 0)][1] == 0 and by[("unfiltered", 3)][2] is None


def test_filtered_kind_is_tested_against_its_own_random_control_on_equal_sizes():
    """vs_random_*: filtered against random_filtered, unfiltered against random, over the images
    whose two sets have the same size (vs_random_n); an image where the random set came out
    smaller is left out of the test, and no image left gives null."""
    import polars as pl

    from mmn.experiments.ablation import ablation_curve

    rows = []
    for img, (u, f, r, rf, keff_r) in enumerate([(0.9, 0.5, 0.1, 0.4, 10), (0.8, 0.6, 0.0, 0.5, 10),
                                                 (0.7, 0.4, 0.2, 0.1, 10), (0.95, 0.3, 0.3, 0.3, 4)]):
        for kind, drop, keff in (("unfiltered", u, 10), ("random", r, keff_r), ("filtered", f, 10),
                                 ("random_filtered", rf, 10)):
            rows.append({"image_id": img, "kind": kind, "k": 10, "k_effective": keff, "p_target": 1 - drop,
                         "p_clean": 1.0, "rel_drop": drop})
    c = {r["kind"]: r for r in ablation_curve(pl.DataFrame(rows)).iter_rows(named=True)}
    assert c["unfiltered"]["vs_random_n"] == 3  # image 3's random set holds 4 units, not 10
    assert c["unfiltered"]["vs_random_diff"] == pytest.approx(np.mean([0.8, 0.8, 0.5]))
    assert c["filtered"]["vs_random_n"] == 4
    assert c["filtered"]["vs_random_diff"] == pytest.approx(np.mean([0.1, 0.1, 0.3, 0.0]))
    assert c["random"]["vs_random_p"] is None and c["random_filtered"]["vs_random_n"] is None
    none_left = pl.DataFrame(rows).with_columns(
        pl.when(pl.col("kind") == "random").then(3).otherwise(pl.col("k_effective")).alias("k_effective"))
    u = ablation_curve(none_left).filter(pl.col("kind") == "unfiltered").row(0, named=True)
    assert u["vs_random_n"] == 0 and u["vs_random_p"] is None


def test_ablate_ranks_by_preactivation_when_attribute_does(tiny_adapters, monkeypatch):
    """attribute.preactivation: ablate's top units are the top units of max-over-patches Z·dy/dZ
    (computed here independently from attribution_maps), not of A·dy/dA; the mean fill, a mean
    of A, is refused with it (in the library and in the params)."""
    import yaml

    import mmn.experiments.ablation as A
    from mmn.neurons.attribution import attribution_maps
    from mmn.neurons.scoring import unit_scores
    from mmn.params import ParamsError, parse_params

    plm, tok = _plm(tiny_adapters, "llama")  # SiLU-gated: Z and A rank differently
    caps = captions(tok).head(2)
    interp = torch.ones(plm.adapter.n_layers, plm.adapter.d_mlp, dtype=torch.bool)
    seen = {}
    orig = A._ImageAblation.rows

    def spy(self, r, soft, order_all, order_int, fill):
        seen[r["image_id"]] = (order_all, soft)
        return orig(self, r, soft, order_all, order_int, fill)

    monkeypatch.setattr(A._ImageAblation, "rows", spy)
    for pre in (True, False):
        A.ablate_images(caps, lambda i: i, plm, interp, ks=[0, 5], regenerate=False, progress=False,
                        preactivation=pre)
        for r in caps.iter_rows(named=True):
            order, soft = seen[r["image_id"]]
            _, z, dz = attribution_maps(plm, soft, [list(r["caption_token_ids"][: r["target_pos"]])],
                                        [int(r["target_token_id"])], preactivation=pre)
            assert order == rank_units(unit_scores(z[0], dz[0]), limit=5), (pre, r["image_id"])
        if pre:
            pre_orders = {i: o for i, (o, _) in seen.items()}
    assert any(pre_orders[i] != seen[i][0] for i in seen)  # the setting changes the ranking
    with pytest.raises(ValueError, match="ablate.mode: mean"):
        A.ablate_images(caps, lambda i: i, plm, interp, ks=[0, 5], mode="mean", preactivation=True, progress=False)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["attribute"]["preactivation"], raw["ablate"]["mode"] = True, "mean"
    with pytest.raises(ParamsError, match="ablate.mode: mean"):
        parse_params(raw)


def test_ablate_ranks_by_the_attribute_aggregate(tiny_adapters, monkeypatch):
    """attribute.aggregate=sum: ablate's top units are those of sum over image positions of
    A·dy/dA, computed here by hand from attribution_maps (not max), and the two orders differ."""
    import mmn.experiments.ablation as A
    from mmn.neurons.attribution import attribution_maps

    plm, tok = _plm(tiny_adapters, "gpt2")
    caps = captions(tok).head(2)
    interp = torch.ones(plm.adapter.n_layers, plm.adapter.d_mlp, dtype=torch.bool)
    seen: dict = {}
    orig = A._ImageAblation.rows

    def spy(self, r, soft, order_all, order_int, fill):
        seen.setdefault(r["image_id"], {})[self.aggregate] = (order_all, soft)
        return orig(self, r, soft, order_all, order_int, fill)

    monkeypatch.setattr(A._ImageAblation, "rows", spy)
    for agg in ("sum", "max"):
        A.ablate_images(caps, lambda i: i, plm, interp, ks=[0, 20], regenerate=False, progress=False, aggregate=agg)
    for image_id, by_agg in seen.items():
        r = caps.filter(pl.col("image_id") == image_id).row(0, named=True)
        order, soft = by_agg["sum"]
        _, a, g = attribution_maps(plm, soft, [list(r["caption_token_ids"][: r["target_pos"]])],
                                   [int(r["target_token_id"])])
        flat = (a[0] * g[0]).sum(dim=1).reshape(-1)  # [L*U]: hand sum over positions
        d_mlp = plm.adapter.d_mlp
        expect = [divmod(int(i), d_mlp) for i in torch.sort(flat, descending=True, stable=True).indices[:20]]
        assert [tuple(u) for u in order] == expect, image_id
    assert any(by["sum"][0] != by["max"][0] for by in seen.values())


def test_ablate_images_shards_merge_to_the_single_run_and_layers_cap_k(tiny_adapters):
    """Two shards (every 2nd image) concatenate to the one-process table; with
    ``layers=[last]`` a huge k is capped at that layer's d_mlp units (k_effective)."""
    import polars as pl

    from mmn.experiments.ablation import ablate_images

    ad, tok = tiny_adapters["gpt2"]
    torch.manual_seed(0)
    plm = ImagePrefixLM(ad, tok, nn.Linear(D_ENC, ad.d_model), encoder=FakeEncoder(N_PATCH, D_ENC, 2))
    caps = captions(tok)
    interp = torch.zeros(ad.n_layers, ad.d_mlp, dtype=torch.bool)
    interp[:, ::3] = True
    kw = dict(ks=[0, 3, 10_000], max_new_tokens=3, regenerate=True, seed=0, progress=False)
    full = ablate_images(caps, lambda i: i, plm, interp, **kw)
    parts = [ablate_images(caps, lambda i: i, plm, interp, shard=(r, 2), **kw) for r in range(2)]
    assert parts[0]["image_id"].unique().sort().to_list() == [10, 12, 14]
    merged = pl.concat(parts).sort(["image_id", "kind", "k"])
    assert merged.equals(full)
    last = ad.n_layers - 1
    only = ablate_images(caps, lambda i: i, plm, interp, layers=[last], **kw)
    big = only.filter(pl.col("k") == 10_000)
    keff = {kind: set(g["k_effective"]) for (kind,), g in big.group_by(["kind"])}
    assert keff["unfiltered"] == {ad.d_mlp} and keff["filtered"] == {int(interp[last].sum())}
    # every unit of that layer is a top unit: no unit is left to draw a random set from
    assert keff["random"] == keff["random_filtered"] == {0}
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


def _plm(tiny_adapters, family="gpt2"):
    ad, tok = tiny_adapters[family]
    torch.manual_seed(0)
    return ImagePrefixLM(ad, tok, nn.Linear(D_ENC, ad.d_model), encoder=FakeEncoder(N_PATCH, D_ENC, 2)), tok


def test_ablate_images_random_sets_are_nested_across_k(tiny_adapters, monkeypatch):
    """The masks actually ablated: for each image the random set of a smaller k is a subset
    of a larger k's, with the unfiltered set's layer mix at every k; the per-image ranking
    differs between images."""
    import mmn.experiments.ablation as A

    plm, tok = _plm(tiny_adapters)
    ad = plm.adapter
    seen = []
    real = A.target_probs

    def spy(plm_, soft, text, target, masks, fill=None):
        seen.append(masks.clone())
        return real(plm_, soft, text, target, masks, fill)

    monkeypatch.setattr(A, "target_probs", spy)
    ks = [0, 2, 5, 11, 40]
    interp = torch.ones(ad.n_layers, ad.d_mlp, dtype=torch.bool)
    A.ablate_images(captions(tok, 3), lambda i: i, plm, interp, ks=ks, regenerate=False,
                    progress=False)
    assert len(seen) == 3
    rnd_sets = []
    for masks in seen:  # [L, 1 + kinds*ks, U]; rows: clean, then kinds in KINDS order, ks ascending
        rows = masks[:, 1:].permute(1, 0, 2)  # [rows, L, U]
        unf, rnd = rows[: len(ks)], rows[2 * len(ks):]
        for j, k in enumerate(ks):
            assert int(rnd[j].sum()) == int(unf[j].sum()) == min(k, ad.n_layers * ad.d_mlp)
            torch.testing.assert_close(rnd[j].sum(-1), unf[j].sum(-1))  # same units per layer
            if j:
                assert bool((rnd[j - 1] <= rnd[j]).all()), f"random set of k={ks[j - 1]} not inside k={k}"
        rnd_sets.append(rnd[-1])
    assert not torch.equal(rnd_sets[0], rnd_sets[1])


def test_drop_of_mean_and_mean_of_drops_on_a_hand_case():
    """Two images: p_clean 0.5 -> 0.1 (drop 0.8) and 0.01 -> 0.02 (drop -1.0): the mean of
    per-image drops is -0.1, the drop of the mean 1 - 0.06/0.255; the paired test against
    random matches scipy on the same differences."""
    import polars as pl
    import scipy.stats

    from mmn.experiments.ablation import ablation_curve, ablation_metrics, drop_of_mean

    rows = []
    for img, pc, pu, pr in ((1, 0.5, 0.1, 0.5), (2, 0.01, 0.02, 0.01), (3, 0.2, 0.05, 0.19)):
        for kind, p in (("unfiltered", pu), ("random", pr)):
            rows.append({"image_id": img, "kind": kind, "k": 10, "k_effective": 10, "p_target": p, "p_clean": pc,
                         "rel_drop": 1 - p / pc})
    df = pl.DataFrame(rows)
    two = df.filter(pl.col("image_id") < 3, pl.col("kind") == "unfiltered")
    assert two["rel_drop"].mean() == pytest.approx(-0.1)
    assert drop_of_mean(two["p_target"], two["p_clean"]) == pytest.approx(1 - 0.06 / 0.255)
    assert drop_of_mean([0.1], [0.0]) is None
    c = ablation_curve(df)
    u = c.filter(pl.col("kind") == "unfiltered").row(0, named=True)
    du = [0.8, -1.0, 0.75]
    dr = [0.0, 0.0, 0.05]
    assert u["rel_drop"] == pytest.approx(np.mean(du))
    assert u["drop_of_mean"] == pytest.approx(1 - (0.1 + 0.02 + 0.05) / (0.5 + 0.01 + 0.2))
    assert u["rel_drop_lo"] <= u["rel_drop"] <= u["rel_drop_hi"]
    assert u["vs_random_diff"] == pytest.approx(np.mean(np.subtract(du, dr)))
    # n = 3: the sign-flip test is exact over 2**3 flips
    ref = scipy.stats.permutation_test((np.array(du), np.array(dr)), lambda x, y, axis: np.mean(x - y, axis=axis),
                                       permutation_type="samples", alternative="two-sided")
    assert u["vs_random_p"] == pytest.approx(ref.pvalue)
    r = c.filter(pl.col("kind") == "random").row(0, named=True)
    assert r["vs_random_p"] is None and r["drop_of_mean"] == pytest.approx(1 - 0.7 / 0.71)
    m = ablation_metrics(c, [0, 10])
    assert m["unfiltered"]["k10"]["rel_drop"]["mean"] == pytest.approx(np.mean(du))
    assert m["unfiltered"]["k10"]["vs_random_p"] == pytest.approx(ref.pvalue)
    assert "vs_random_p" not in m["random"]["k10"] and m["n_images"] == 3


def _leaves(d) -> list:
    return [x for v in d.values() for x in (_leaves(v) if isinstance(v, dict) else [v])]


def test_ablation_metrics_are_compact_numbers_for_headline_ks():
    import polars as pl

    from mmn.experiments.ablation import KINDS, ablation_curve, ablation_metrics, headline_ks

    ks = [0, 50, 100, 200, 400, 800, 1600, 3200, 6400]
    assert headline_ks(ks) == [100, 6400]
    assert headline_ks([0, 10]) == [10] and headline_ks([0, 5, 20]) == [5, 20] and headline_ks([0]) == []
    rng = np.random.default_rng(0)
    rows = [{"image_id": i, "kind": kind, "k": k, "k_effective": k, "p_target": float(p * rng.uniform(0.2, 1)),
             "p_clean": p, "rel_drop": 0.0} for i in range(6) for p in [float(rng.uniform(0.1, 0.9))]
            for kind in KINDS for k in ks]
    df = pl.DataFrame(rows).with_columns((1 - pl.col("p_target") / pl.col("p_clean")).alias("rel_drop"))
    curve = ablation_curve(df)
    assert curve.height == len(KINDS) * len(ks)
    m = ablation_metrics(curve, ks)
    leaves = _leaves(m)
    assert len(leaves) <= 64  # the full results (data/results/); metrics/ablation.json takes 11 of them
    assert all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in leaves)
    assert set(m["filtered"]) == {"k100", "k6400"}


def test_ablated_captions_honour_stop_at_newline(tiny_adapters):
    """A tiny model made to emit a newline after every ordinary token: with
    ``stop_at_newline`` the regenerated captions stop there (one token, no newline);
    without it they run on through newlines."""
    plm, tok = _plm(tiny_adapters)
    model = plm.adapter.model
    nl = tok("\n").input_ids[-1]
    assert "\n" in tok.decode([nl])
    state = {}

    def pre(mod, args, kwargs):
        state["ids"] = kwargs.get("input_ids")

    def post(mod, args, out):
        ids = state.get("ids")
        if ids is None:  # the prefix step (inputs_embeds): leave the model's own choice
            return out
        boost = (ids[:, -1] != nl).to(out.dtype) * 1e4  # after an ordinary token: newline
        out = out.clone()
        out[:, -1, nl] += boost
        return out

    h1 = model.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = model.get_output_embeddings().register_forward_hook(post)
    from mmn.experiments.ablation import ablate_images

    try:
        kw = dict(ks=[0, 3], max_new_tokens=6, regenerate=True, progress=False)
        interp = torch.ones(plm.adapter.n_layers, plm.adapter.d_mlp, dtype=torch.bool)
        caps = captions(tok, 3)
        on = ablate_images(caps, lambda i: i, plm, interp, stop_at_newline=True, **kw)
        off = ablate_images(caps, lambda i: i, plm, interp, stop_at_newline=False, **kw)
    finally:
        h1.remove(), h2.remove()
    assert not any("\n" in c for c in on["caption"].to_list())
    assert all(len(tok(c, add_special_tokens=False).input_ids) <= 2 for c in on["caption"].to_list())
    assert all("\n" in c for c in off["caption"].to_list())
    # p(c) does not depend on how captions are generated
    assert on["p_target"].to_list() == off["p_target"].to_list()


def test_check_ablation_rejects_more_units_than_k_and_drops_above_one():
    import polars as pl

    from mmn.quality import QualityError, check_ablation

    good = pl.DataFrame({"image_id": [1, 1], "kind": ["random", "random"], "k": [0, 5], "k_effective": [0, 5],
                         "p_target": [0.4, 0.1], "p_clean": [0.4, 0.4], "rel_drop": [0.0, 0.75]})
    check_ablation(good)
    with pytest.raises(QualityError, match="k_effective_ok"):
        check_ablation(good.with_columns(pl.Series("k_effective", [0, 6])))
    with pytest.raises(QualityError, match="rel_drop"):
        check_ablation(good.with_columns(pl.Series("rel_drop", [0.0, 1.5])))


def test_ablate_stage_decides_interpretability_on_fp32_cpu_like_decode_and_filter(tiny_adapters, tmp_path,
                                                                                   monkeypatch):
    """stages.ablate loads an fp32 CPU LM and its mask equals decode_units + apply_filter
    (what the decode and filter stages write) for EVERY unit."""
    from types import SimpleNamespace

    import polars as pl

    import mmn.pipeline
    from mmn.neurons.decode import decode_units
    from mmn.neurons.filter import apply_filter, load_wordlist
    from mmn.params import DecodeParams, FilterParams
    from mmn.experiments.ablation import interpretable_fp32

    ad, tok = tiny_adapters["gpt2"]
    # a word list of every alphabetic token text below id 20000 (so some units pass, some fail)
    texts = {tok.decode([i]).strip().lower() for i in range(20000)}
    wl = tmp_path / "words"
    wl.write_text("\n".join(sorted(t for t in texts if t.isalpha() and t.isascii())))
    calls = []

    def fake_build_lm(params, dtype=None, device=None, plant=None):
        calls.append((dtype, device))
        return ad, tok

    monkeypatch.setattr(mmn.pipeline, "build_lm", fake_build_lm)
    dec = DecodeParams(top_n=12)
    filt = FilterParams(min_words=4, top_n=10, min_letters=3)
    mask = interpretable_fp32(SimpleNamespace(decode=dec, filter=filt), wl)
    assert calls == [("float32", "cpu")]
    # the stage's own LM, already fp32 on the CPU, is reused: same mask, no second load
    reused = interpretable_fp32(SimpleNamespace(decode=dec, filter=filt), wl,
                                SimpleNamespace(adapter=ad, tokenizer=tok))
    assert calls == [("float32", "cpu")] and torch.equal(reused, mask)
    units = pl.DataFrame({"layer": [l for l in range(ad.n_layers) for _ in range(ad.d_mlp)],
                          "unit": [u for _ in range(ad.n_layers) for u in range(ad.d_mlp)]})
    neu = apply_filter(decode_units(ad, tok, units, top_n=dec.top_n, lens=dec.lens), load_wordlist(wl),
                       min_words=filt.min_words, top_n=filt.top_n, min_letters=filt.min_letters)
    ref = torch.zeros(ad.n_layers, ad.d_mlp, dtype=torch.bool)
    for r in neu.iter_rows(named=True):
        ref[r["layer"], r["unit"]] = r["interpretable"]
    assert 0 < int(ref.sum()) < ref.numel()
    assert torch.equal(mask.cpu(), ref)


def test_ablate_stage_writes_curve_metrics_and_info_and_passes_stop_at_newline(tiny_adapters, tmp_path,
                                                                               monkeypatch):
    """stages.ablate in-process with a tiny LM: caption.stop_at_newline reaches the generator,
    the curve table has one row per (kind, k), metrics are compact numbers, strings go to info."""
    import json

    import polars as pl
    import yaml
    from click.testing import CliRunner

    import mmn.data.layout
    import mmn.experiments.ablation as A
    import mmn.pipeline
    import stages.ablate as S
    from mmn.metrics import bertscore

    plm, tok = _plm(tiny_adapters)
    ad = plm.adapter
    raw = yaml.safe_load(open("params.yaml"))
    raw["ablate"].update(ks=[0, 3, 100, 200], regenerate=True)
    raw["caption"].update(stop_at_newline=False, max_new_tokens=3)
    raw["attribute"]["layers"] = None
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    caps = captions(tok, 4).with_columns(pl.lit("a clean caption").alias("caption"))
    caps.write_parquet(tmp_path / "captions.parquet")
    interp = torch.zeros(ad.n_layers, ad.d_mlp, dtype=torch.bool)
    interp[:, ::2] = True
    seen = {}
    real = A.ablate_images

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    class Layout:
        def __init__(self, root):
            pass

        def load_image(self, i):
            return i

    class Bert:
        def f1(self, cands, refs):
            return [0.5 + 0.01 * len(c) for c in cands]

    monkeypatch.setenv("PYTHONHASHSEED", "0")  # stage_main would re-exec the interpreter otherwise
    monkeypatch.setattr(A, "ablate_images", spy)
    monkeypatch.setattr(A, "interpretable_fp32", lambda params, wordlist, plm=None, plant=None: interp)
    monkeypatch.setattr(mmn.pipeline, "build_prefix_lm", lambda params, d, plant=None: plm)
    monkeypatch.setattr(mmn.data.layout, "CocoLayout", Layout)
    monkeypatch.setattr(bertscore.BertScorer, "from_params", classmethod(lambda cls, *a, **k: Bert()))
    out = {n: tmp_path / n for n in ("ablation.parquet", "curve.csv", "ablation.json", "full.json", "info.json")}
    r = CliRunner().invoke(S.main, ["--params", str(tmp_path / "params.yaml"), "--captions",
                                    str(tmp_path / "captions.parquet"), "--out", str(out["ablation.parquet"]),
                                    "--curve", str(out["curve.csv"]), "--metrics", str(out["ablation.json"]),
                                    "--results", str(out["full.json"]),
                                    "--info", str(out["info.json"]), "--wordlist", str(tmp_path / "params.yaml"),
                                    "--coco", str(tmp_path), "--projection", str(tmp_path),
                                    "--plant", str(tmp_path)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert seen["stop_at_newline"] is False and seen["max_new_tokens"] == 3
    curve = pl.read_csv(out["curve.csv"])
    assert curve.height == len(A.KINDS) * 4 and set(curve["n"]) == {4}
    from mmn.headline import headline

    m = json.loads(out["full.json"].read_text())
    assert json.loads(out["ablation.json"].read_text()) == headline("ablation", m)
    assert m["n_images"] == 4 and set(m["unfiltered"]) == {"k100", "k200"}
    leaves = _leaves(m)
    assert len(leaves) <= 64 and all(v is None or isinstance(v, (int, float)) for v in leaves)
    u = curve.filter(pl.col("kind") == "unfiltered", pl.col("k") == 100).row(0, named=True)
    assert m["unfiltered"]["k100"]["rel_drop"]["mean"] == pytest.approx(u["rel_drop"], abs=1e-6)
    info = json.loads(out["info.json"].read_text())
    assert info["settings"]["caption.stop_at_newline"] is False and info["interpretable_units"] == int(interp.sum())
    assert info["stage"] == "ablate" and info["outputs"]["curve"] == str(out["curve.csv"])
    df = pl.read_parquet(out["ablation.parquet"])
    assert df["bertscore_f1"].null_count() == 0
