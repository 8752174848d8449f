"""Projection training (best checkpoint, early stopping, standardisation) and held-out caption
quality (own vs shuffled references, the no-information warning), on tiny random models and
hand data."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from mmn.captioning import caption_quality, derangement, noun_in_refs
from mmn.metrics.stats import paired_test
from mmn.models.prefix_lm import ImagePrefixLM
from mmn.models.projection import Projection, load_projection, save_projection
from mmn.projection_training import (
    EarlyStopping,
    TrainConfig,
    lr_at,
    split_train_val,
    train_projection,
    validation_loss,
)

# ------------------------------------------------------------------ early stopping / best checkpoint


def test_early_stopping_on_a_crafted_sequence():
    """Patience 2: best at step 20, two evaluations without a lower loss -> stop after step 40."""
    es = EarlyStopping(patience=2)
    seq = [(0, 5.0), (10, 4.0), (20, 3.0), (30, 3.0), (40, 3.5), (50, 1.0)]
    stopped_at = None
    for step, v in seq:
        es.update(step, v)
        if es.should_stop:
            stopped_at = step
            break
    assert stopped_at == 40 and es.best_step == 20 and es.best == 3.0  # an equal loss is no improvement
    never = EarlyStopping(patience=0)
    for step, v in seq:
        never.update(step, v)
        assert not never.should_stop
    assert never.best_step == 50
    with pytest.raises(ValueError, match="nan"):
        EarlyStopping(1).update(0, math.nan)


def _crafted_run(val_seq: list[float], patience: int, max_steps: int = 50, eval_every: int = 10):
    """train_projection with a differentiable train loss and a crafted validation-loss sequence.

    Records the soft tokens of the validation features at every evaluation, so the returned
    checkpoint can be compared with the state at the best evaluation.
    """
    torch.manual_seed(0)
    feats = torch.randn(6, 3, 4)
    val_feats = torch.randn(2, 3, 4)
    target = torch.randn(5)
    calls: list[torch.Tensor] = []

    def loss_fn(soft: torch.Tensor, caps: list[list[int]]) -> torch.Tensor:
        if torch.is_grad_enabled():  # a training step
            return ((soft - target) ** 2).mean()
        calls.append(soft.detach().clone())
        return torch.tensor(val_seq[len(calls) - 1])

    cfg = TrainConfig(max_steps=max_steps, batch_size=3, lr=0.05, warmup_steps=0, seed=0,
                      eval_every=eval_every, patience=patience)
    caps = {i: [[1, 2]] for i in range(6)}
    res = train_projection(feats, list(range(6)), caps, 5, loss_fn, cfg, val_feats, [(0, [1]), (1, [2])])
    return res, calls, val_feats


def test_best_checkpoint_is_argmin_of_val_loss_and_stops_early():
    # evaluations at steps 0, 10, 20, 30, 40, 50; minimum at step 20; patience 2 -> stops at 40
    res, calls, val_feats = _crafted_run([5.0, 4.0, 2.0, 2.5, 3.0, 1.0], patience=2)
    assert res.steps_run == 40 and res.stopped_early
    assert res.best_step == 20 and res.best_val_loss == 2.0 and res.initial_val_loss == 5.0
    assert [r["step"] for r in res.history] == [10, 20, 30, 40]
    assert [r["val_loss"] for r in res.history] == [4.0, 2.0, 2.5, 3.0]
    assert len(calls) == 5
    with torch.no_grad():
        torch.testing.assert_close(res.projection(val_feats), calls[2], rtol=0, atol=0)
        assert not torch.equal(res.projection(val_feats), calls[4])  # not the last state


def test_no_improvement_keeps_the_untrained_projection():
    res, calls, val_feats = _crafted_run([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], patience=3)
    assert res.best_step == 0 and res.steps_run == 30
    with torch.no_grad():
        torch.testing.assert_close(res.projection(val_feats), calls[0], rtol=0, atol=0)


def test_without_patience_trains_to_max_steps():
    res, _, _ = _crafted_run([5.0, 4.0, 2.0, 2.5, 3.0, 2.2], patience=0)
    assert res.steps_run == 50 and not res.stopped_early and res.best_step == 20
    # max_steps not a multiple of eval_every: the last step is evaluated too
    res, _, _ = _crafted_run([5.0, 4.0, 3.0, 2.0], patience=0, max_steps=25)
    assert [r["step"] for r in res.history] == [10, 20, 25] and res.best_step == 25


def test_lr_schedule_warmup_then_cosine_to_zero():
    cfg = TrainConfig(max_steps=110, batch_size=1, lr=1.0, warmup_steps=10, seed=0)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(60, cfg) == pytest.approx(0.5)
    assert lr_at(110, cfg) == pytest.approx(0.0) and lr_at(500, cfg) == pytest.approx(0.0)


def test_split_train_val_is_seeded_and_disjoint():
    ids = list(range(100, 120))
    fit, val = split_train_val(ids, 0.2, 64, seed=3)
    assert len(val) == 4 and len(fit) == 16 and not set(fit) & set(val) and sorted(fit + val) == ids
    assert split_train_val(ids, 0.2, 64, seed=3) == (fit, val)
    assert split_train_val(ids, 0.2, 64, seed=4)[1] != val
    assert len(split_train_val(ids, 0.5, 3, seed=0)[1]) == 3  # capped
    assert split_train_val([1, 2], 0.2, 64, 0) == ([1], [2]) or split_train_val([1, 2], 0.2, 64, 0) == ([2], [1])
    assert split_train_val([7], 0.2, 64, 0) == ([7], [])  # never the only image
    assert split_train_val(ids, 0.0, 64, 0) == (ids, [])


def test_live_log_writes_dvclive_curves_and_reads_them_back(tmp_path):
    """The DVCLive folder of a training: every logged value in its tsv, the latest of each in
    metrics.json, and read_curves joining them by step (null where a step has no such value)."""
    from mmn.training_log import LiveLog, empty_live, read_curves

    live = LiveLog(tmp_path / "live")
    for name, step, value in [("val/loss", 0, 5.0), ("train/loss", 1, 4.5), ("train/loss", 2, 4.0),
                              ("val/loss", 2, 3.75), ("train/loss", 3, 3.5)]:
        live(name, step, value)
    live.close()
    assert (tmp_path / "live/plots/metrics/train/loss.tsv").read_text() == "step\tloss\n1\t4.5\n2\t4.0\n3\t3.5\n"
    assert (tmp_path / "live/plots/metrics/val/loss.tsv").read_text() == "step\tloss\n0\t5.0\n2\t3.75\n"
    assert json.loads((tmp_path / "live/metrics.json").read_text()) == {"step": 3, "train": {"loss": 3.5},
                                                                       "val": {"loss": 3.75}}
    curves = read_curves(tmp_path / "live/plots")
    assert curves.to_dicts() == [{"step": 0, "train_loss": None, "val_loss": 5.0},
                                 {"step": 1, "train_loss": 4.5, "val_loss": None},
                                 {"step": 2, "train_loss": 4.0, "val_loss": 3.75},
                                 {"step": 3, "train_loss": 3.5, "val_loss": None}]
    empty_live(tmp_path / "live")  # a loaded (untrained) projection
    assert read_curves(tmp_path / "live/plots") is None
    assert json.loads((tmp_path / "live/metrics.json").read_text()) == {}


# ------------------------------------------------------------------ tiny LM: the real training path


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tiny_lm_training_learns_and_inference_applies_the_same_standardisation(tiny_adapters, family, tmp_path):
    """On a tiny random LM, training lowers the validation loss (the validation pairs repeat
    training images), the kept checkpoint is argmin of the recorded validation losses, and the
    soft tokens at inference (after save/load, through ImagePrefixLM.soft_tokens) equal the
    training-time projection of the same features bit for bit."""
    ad, tok = tiny_adapters[family]
    torch.manual_seed(0)
    feats = torch.randn(4, 3, 24) * 5 + 3  # far from standardised: the stored mean/std matter
    caps = {i: [tok(t, add_special_tokens=False).input_ids] for i, t in
            enumerate([" a red bus", " two cats", " a clock", " a horse"])}
    plm = ImagePrefixLM(ad, tok, torch.nn.Linear(1, 1))

    def loss_fn(soft, c):
        return plm.caption_loss(soft, c)

    val_pairs = [(i, caps[i][0]) for i in range(4)]
    cfg = TrainConfig(max_steps=30, batch_size=4, lr=0.05, warmup_steps=2, seed=0, eval_every=5, patience=0)
    res = train_projection(feats, [0, 1, 2, 3], caps, ad.d_model, loss_fn, cfg, feats, val_pairs)
    vals = [res.initial_val_loss] + [r["val_loss"] for r in res.history]
    steps = [0] + [r["step"] for r in res.history]
    assert res.best_val_loss == min(vals) and res.best_step == steps[int(np.argmin(vals))]
    assert res.best_val_loss < res.initial_val_loss  # (a tiny random LM is near-uniform: small drops)
    assert validation_loss(res.projection, feats, val_pairs, loss_fn, 4) == res.best_val_loss
    # standardisation: mean/std of the training features, stored in the projection
    torch.testing.assert_close(res.projection.feature_mean, feats.reshape(-1, 24).mean(0))
    train_soft = res.projection(feats)
    save_projection(tmp_path, res.projection, {})
    loaded, _ = load_projection(tmp_path)
    infer = ImagePrefixLM(ad, tok, loaded)
    assert torch.equal(infer.soft_tokens(feats), train_soft)
    # a bare Linear without the standardisation would give different soft tokens
    assert not torch.allclose(loaded.linear(feats), train_soft)


def test_training_is_deterministic(tiny_adapters):
    ad, tok = tiny_adapters["gpt2"]
    plm = ImagePrefixLM(ad, tok, torch.nn.Linear(1, 1))
    feats = torch.randn(3, 2, 24, generator=torch.Generator().manual_seed(1))
    caps = {i: [[5 + i, 9], [7]] for i in range(3)}
    cfg = TrainConfig(max_steps=6, batch_size=2, lr=0.01, warmup_steps=1, seed=2, eval_every=2, patience=1)
    runs = [train_projection(feats, [0, 1, 2], caps, ad.d_model, plm.caption_loss, cfg, feats[:1], [(0, [5, 9])])
            for _ in range(2)]
    assert runs[0].history == runs[1].history
    assert torch.equal(runs[0].projection.weight, runs[1].projection.weight)


def test_train_from_layout_on_tiny_models(tiny_adapters, tiny_beit, tmp_path):
    """The `projection: train` path for any HF LM/encoder: the sample layout, a tiny Llama and a
    tiny BEiT; a seeded validation split of the training images; meta records it."""
    from mmn.data.layout import CocoLayout
    from mmn.data.sample import materialize_sample
    from mmn.params import load_params, parse_params
    from mmn.projection_training import train_from_layout

    materialize_sample(tmp_path / "coco")
    layout = CocoLayout(tmp_path / "coco")
    raw = load_params().model_dump()
    raw["projection"]["train"].update(max_steps=6, batch_size=4, views=2, warmup_steps=1, eval_every=3,
                                      val_fraction=0.3, patience=0)
    params = parse_params(raw)
    ad, tok = tiny_adapters["llama"]
    proj, res, meta = train_from_layout(layout, ad, tok, tiny_beit, params)
    assert meta["n_val_images"] == 2 and meta["n_train_images"] == 5 and meta["n_views"] == 10
    assert not set(meta["val_image_ids"]) & {r["id"] for r in layout.images if r["id"] not in meta["val_image_ids"]}
    assert (proj.in_features, proj.out_features) == (24, ad.d_model)
    assert [r["step"] for r in res.history] == [3, 6] and meta["steps_run"] == 6
    assert meta["best_val_loss"] == round(min([res.initial_val_loss] + [r["val_loss"] for r in res.history]), 6)


def test_float64_training_restores_the_models_and_saves_float32(tiny_adapters, tiny_beit, tmp_path):
    """`projection.train.dtype: float64`: the LM and encoder are trained in double precision and
    restored bit for bit afterwards; the projection comes back in float32; after one step (same
    init, same batch) its weights and initial validation loss agree with a float32 run's; a rerun
    under 2 threads gives the same weights. (At these tiny sizes the thread count may not change
    any reduction order, so that last check guards the float64 path's determinism only; the
    thread-noise measurement on the real models is benchmarks/bench_train_dtype.py.)"""
    from mmn.data.layout import CocoLayout
    from mmn.data.sample import materialize_sample
    from mmn.params import load_params, parse_params
    from mmn.projection_training import train_from_layout

    materialize_sample(tmp_path / "coco")
    layout = CocoLayout(tmp_path / "coco")
    ad, tok = tiny_adapters["llama"]
    before = {k: v.clone() for k, v in ad.model.state_dict().items()}
    enc_before = {k: v.clone() for k, v in tiny_beit.state_dict().items()}

    def run(dtype: str, steps: int, threads: int):
        raw = load_params().model_dump()
        raw["projection"]["train"].update(max_steps=steps, batch_size=4, views=2, warmup_steps=1, eval_every=1,
                                          val_fraction=0.3, patience=0, dtype=dtype)
        raw["profiles"][raw["profile"]]["train_dtype"] = None  # the global key decides (the embedded profile: float64)
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return train_from_layout(layout, ad, tok, tiny_beit, parse_params(raw))
        finally:
            torch.set_num_threads(old)

    p64, res64, meta64 = run("float64", 4, 1)
    assert meta64["train_dtype"] == "float64" and p64.weight.dtype == torch.float32
    assert p64.feature_mean.dtype == torch.float32
    for k, v in ad.model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    for k, v in tiny_beit.state_dict().items():
        assert v.dtype == enc_before[k].dtype and torch.equal(v, enc_before[k]), k
    p64b, res64b, _ = run("float64", 4, 2)
    # 1 vs 2 threads: whether MKL splits a reduction differently depends on the CPU and shape, so
    # equal up to float64 noise (float32 weights: within an ulp), not necessarily bit for bit
    torch.testing.assert_close(p64.weight, p64b.weight, rtol=1.2e-7, atol=1e-9)
    assert [r["step"] for r in res64.history] == [r["step"] for r in res64b.history]
    for a, b in zip(res64.history, res64b.history, strict=True):
        for key in ("train_loss", "val_loss"):
            assert (a[key] is None) == (b[key] is None) and (a[key] is None or abs(a[key] - b[key]) <= 1e-9 * abs(a[key])), (a, b)
    # one step from the same init on the same batch: float64 and float32 agree to float32 precision
    p32, res32, meta32 = run("float32", 1, 1)
    p64_1, res64_1, _ = run("float64", 1, 1)
    assert "train_dtype" not in meta32
    assert torch.allclose(p32.weight, p64_1.weight, atol=1e-5)
    assert abs(res32.initial_val_loss - res64_1.initial_val_loss) < 1e-4


# ------------------------------------------------------------------ caption quality


def test_derangement_has_no_fixed_point_and_is_seeded():
    for n in (2, 3, 7, 50):
        for seed in range(5):
            p = derangement(n, seed)
            assert sorted(p.tolist()) == list(range(n)) and not np.any(p == np.arange(n))
    assert derangement(10, 1).tolist() == derangement(10, 1).tolist()
    assert derangement(10, 1).tolist() != derangement(10, 2).tolist()
    assert derangement(1, 0).tolist() == [0]


@pytest.mark.parametrize("noun,refs,hit", [
    ("cat", ["A cat sleeps on a sofa."], True),
    ("cat", ["Two Cats sleeping."], True),          # plural, case-insensitive
    ("buses", ["A red bus in the street."], True),  # singular of an -s noun
    ("cat", ["A catalogue on a desk."], False),     # whole words only
    ("dog", ["A cat.", "A horse."], False),
    (None, ["A cat."], False),
    ("teddy bear", ["a teddy bear on a bed"], True),
])
def test_noun_in_refs(noun, refs, hit):
    assert noun_in_refs(noun, refs) is hit


class WordOverlapScorer:
    """Stand-in for BERTScore: Jaccard overlap of lowercase word sets, mean over references."""

    def mean_f1_over_refs(self, cands, refs_per_cand):
        def jac(a, b):
            a, b = set(a.lower().split()), set(b.lower().split())
            return len(a & b) / len(a | b)

        return np.array([np.mean([jac(c, r) for r in rs]) for c, rs in zip(cands, refs_per_cand)])


def _captions(caps: list[str], nouns: list[str | None]) -> pl.DataFrame:
    return pl.DataFrame({"image_id": list(range(1, len(caps) + 1)), "caption": caps, "noun": nouns,
                         "has_noun": [n is not None for n in nouns]})


REFS = {1: ["a cat on a sofa", "a grey cat"], 2: ["a red bus", "a bus in town"], 3: ["a clock tower", "big clock"],
        4: ["a horse in a field", "brown horse"]}


def test_own_vs_shuffled_equals_a_hand_computation():
    df = _captions(["a cat", "a bus", "a dog", "a horse"], ["cat", "bus", "dog", "horse"])
    out, m, informative = caption_quality(df, REFS, WordOverlapScorer(), seed=0)
    shuf = out["shuffled_image_id"].to_list()
    assert all(s != i for s, i in zip(shuf, out["image_id"])) and sorted(shuf) == [1, 2, 3, 4]

    def jac(a, b):
        a, b = set(a.split()), set(b.split())
        return len(a & b) / len(a | b)

    # by hand: "a cat" vs {"a cat on a sofa", "a grey cat"} = (2/4 + 2/3) / 2, ...
    own = [(2 / 4 + 2 / 3) / 2, (2 / 3 + 2 / 4) / 2, (1 / 4 + 0) / 2, (2 / 4 + 1 / 3) / 2]
    shuffled = [np.mean([jac(c, r) for r in REFS[s]]) for c, s in zip(["a cat", "a bus", "a dog", "a horse"], shuf)]
    np.testing.assert_allclose(out["bertscore_own"].to_numpy(), own)
    np.testing.assert_allclose(out["bertscore_shuffled"].to_numpy(), shuffled)
    assert m["bertscore_own"]["mean"] == pytest.approx(np.mean(own))
    assert m["own_vs_shuffled"]["diff"] == pytest.approx(np.mean(np.array(own) - np.array(shuffled)))
    assert m["own_vs_shuffled"] == paired_test(own, shuffled, seed=0)
    assert out["noun_in_refs"].to_list() == [True, True, False, True]
    assert m["noun_in_refs"]["mean"] == 0.75 and m["distinct_nouns"] == 4 and m["n_images"] == 4
    # n = 4: the exact sign-flip test cannot reach p < 0.05 (min p = 2/16)
    assert not informative
    json.dumps(m, allow_nan=False)  # numbers only, JSON-safe


def test_informative_when_own_clearly_beats_shuffled():
    refs = {i: [f"word{i} thing{i}", f"word{i}"] for i in range(1, 13)}
    df = _captions([f"word{i}" for i in range(1, 13)], [f"word{i}" for i in range(1, 13)])
    _, m, informative = caption_quality(df, refs, WordOverlapScorer(), seed=0)
    assert m["bertscore_shuffled"]["mean"] == 0 and m["own_vs_shuffled"]["p"] < 0.01 and informative


def _run_quality_stage(monkeypatch, tmp_path, df, refs, held_out=True):
    """The caption stage's quality report on a word-overlap scorer: (frame, metrics, info, log)."""
    from mmn.captioning import caption_report

    class Fake(WordOverlapScorer):
        description = "word overlap (test)"

    meta = {"held_out": held_out, "source": "trained", "train_data": "split"}
    out, metrics, info, lines = caption_report(df, refs, Fake(), 0, meta)
    return out, metrics, info, "\n".join(lines)


def test_caption_stage_warns_when_captions_carry_no_image_information(monkeypatch, tmp_path, capsys):
    # every caption is equally far from every image's references: own == shuffled
    refs = {i: ["a photo", "an image"] for i in range(1, 9)}
    df = _captions(["a photo of something"] * 8, ["photo"] * 8)
    _, metrics, info, err = _run_quality_stage(monkeypatch, tmp_path, df, refs)
    assert err.startswith("WARNING: the captions carry no detectable image information")
    assert metrics["image_information"] == 0 and metrics["own_vs_shuffled"]["p"] == 1.0
    assert info["warning"] and info["bert_model"] == "word overlap (test)"
    assert all(isinstance(v, (int, float, dict)) or v is None for v in metrics.values())


def test_caption_stage_quiet_when_captions_match_their_images(monkeypatch, tmp_path, capsys):
    refs = {i: [f"word{i} thing{i}", f"word{i}"] for i in range(1, 13)}
    df = _captions([f"word{i}" for i in range(1, 13)], [f"word{i}" for i in range(1, 13)])
    out, metrics, info, err = _run_quality_stage(monkeypatch, tmp_path, df, refs, held_out=False)
    assert "no detectable image information" not in err and info["warning"] is None
    assert "WARNING: the projection was trained on these evaluation images" in err  # held_out: false
    assert metrics["image_information"] == 1 and metrics["held_out"] == 0
    assert out["noun_in_refs"].all()


def test_projection_built_from_linear_equals_linear():
    lin = torch.nn.Linear(4, 3)
    p = Projection.from_linear(lin)
    x = torch.randn(2, 4)
    assert torch.equal(p(x), lin(x))


def test_captions_gate_checks_the_quality_columns(tmp_path):
    """caption_quality's output passes check_captions(with_quality=True); a missing column, a
    score out of range or a 'shuffled' image equal to the row's own image fails it."""
    from mmn.io import write_parquet
    from mmn.quality import QualityError, check_captions
    from helpers.tables import good_captions

    base = good_captions()
    refs = {i: ["a dog on grass", "a cat"] for i in base["image_id"]}
    out, _, _ = caption_quality(base, refs, WordOverlapScorer(), seed=0)
    check_captions(out, with_quality=True)
    write_parquet(out, tmp_path / "c.parquet")
    check_captions(tmp_path / "c.parquet", with_quality=True)
    with pytest.raises(QualityError, match="bertscore_shuffled"):
        check_captions(out.drop("bertscore_shuffled"), with_quality=True)
    with pytest.raises(QualityError, match="bertscore_own"):
        check_captions(out.with_columns(pl.lit(1.5).alias("bertscore_own")), with_quality=True)
    with pytest.raises(QualityError, match="shuffled_image_id equals image_id"):
        check_captions(out.with_columns(pl.col("image_id").alias("shuffled_image_id")), with_quality=True)


@pytest.mark.parametrize("informative", [0, 1])
def test_report_first_page_shows_caption_quality_and_the_loss_curve(tmp_path, informative):
    from helpers.report import build_synthetic, make_inputs

    inp = make_inputs()
    inp.metrics["captions"].update(image_information=informative, held_out=informative)
    inp.projection_loss = pl.DataFrame({"step": [10, 20, 30], "train_loss": [3.0, 2.0, 1.5],
                                        "val_loss": [3.2, 2.5, 2.7]})
    inp.projection_meta = {"best_step": 20, "steps_run": 30, "train_data": "split"}
    plots, report, w = build_synthetic(tmp_path, inp)
    index = (report / "index.html").read_text()
    first = index[: index.index("<h1>Images")]
    assert "Projection and caption quality" in first and "0.35" in first and "0.23" in first
    assert ("WARNING" in first) is (not informative) and ("Not held out" in first) is (not informative)
    assert (report / "img/fig/projection_loss.png").is_file() and "img/fig/projection_loss.png" in first
    assert (plots / "projection_loss.png") in w.figures


def test_seed_aggregation_by_hand(tmp_path):
    """scripts/seeds.py: metric leaves across seed folders -> n, mean, sample sd, min, max."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("seeds", REPO / "scripts" / "seeds.py")
    seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeds)
    for i, (own, kept) in enumerate([(0.30, 0.02), (0.34, 0.04), (0.38, None)]):
        d = tmp_path / f"seed-{i}"
        d.mkdir()
        (d / "captions.json").write_text(json.dumps({"bertscore_own": {"mean": own, "lo": 0.1, "hi": 0.5, "n": 7}}))
        (d / "neurons.json").write_text(json.dumps({"kept_fraction": kept, "flag": True}))
    agg = seeds.aggregate({d.name: seeds.seed_metrics(d) for d in sorted(tmp_path.glob("seed-*"))})
    assert set(agg) == {"captions.bertscore_own.mean", "neurons.kept_fraction"}  # lo/hi/n, bools, nulls out
    a = agg["captions.bertscore_own.mean"]
    assert a["n"] == 3 and a["mean"] == pytest.approx(0.34) and a["sd"] == pytest.approx(0.04)
    assert (a["min"], a["max"]) == (0.30, 0.38)
    k = agg["neurons.kept_fraction"]
    assert k["n"] == 2 and k["mean"] == pytest.approx(0.03) and k["sd"] == pytest.approx(0.01 * 2 ** 0.5)
    assert "| captions.bertscore_own.mean | 3 | 0.34 ± 0.04 |" in seeds.table(agg)


def test_load_projection_reads_split_json_and_rejects_overlap(tmp_path):
    from mmn.data.sample import materialize_sample
    from mmn.data.split import read_split_info
    from mmn.projection_training import projection_metrics
    from mmn.quality import QualityError, check_train_eval_disjoint

    from mmn.data.split import SplitError

    with pytest.raises(SplitError, match=r"split.json: file not found"):
        read_split_info(tmp_path)
    (tmp_path / "split.json").write_text('{"mode": "split"}')
    with pytest.raises(SplitError, match=r"split.json: missing key 'held_out'"):
        read_split_info(tmp_path)
    (tmp_path / "split.json").write_text('{"mode": "split", "held_out": true, "n_train": 1, "n_eval": 2, '
                                         '"train_ids": [1]}')
    assert read_split_info(tmp_path).held_out is True
    materialize_sample(tmp_path / "train", [1, 2, 3])
    materialize_sample(tmp_path / "eval", [3, 4])
    materialize_sample(tmp_path / "eval2", [4, 5])
    train = tmp_path / "train"
    with pytest.raises(QualityError, match=r"1 of the 3 training images in .*train are also evaluated in .*eval: "
                                           r"image id\(s\) 3"):
        check_train_eval_disjoint(train, tmp_path / "eval")
    assert check_train_eval_disjoint(train, tmp_path / "eval2") == []
    assert check_train_eval_disjoint(train, tmp_path / "eval", allow_overlap=True) == [3]  # eval mode: flagged
    m = projection_metrics({"held_out": False, "steps_run": 30, "best_step": 20, "best_val_loss": 2.5})
    assert m == {"held_out": 0, "steps_run": 30, "best_step": 20, "best_val_loss": 2.5, "n_train_images": None,
                 "n_val_images": None, "initial_val_loss": None}
