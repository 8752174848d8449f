"""mmn.metrics: CLIPScore on a tiny random open_clip model, BERTScore on the embedded
MiniLM (loaded once), receptive-field IoU (hand-drawn masks, coco-mini), statistics."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from conftest import COCO_MINI, REPO  # noqa: E402

# ----------------------------------------------------------------------------- CLIPScore

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _images(n: int = 4) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, size=(40 + 3 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


TEXTS = ["a cat on a mat", "horses, racing, ponies, ridden", "a red bus", "kitchen, oven, sink"]


@pytest.fixture(scope="module")
def tiny_clip():
    import open_clip
    from open_clip.model import CLIP

    torch.manual_seed(0)
    model = CLIP(**TINY_CLIP).eval()
    preprocess = open_clip.image_transform(32, is_train=False)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # bundled BPE vocab, no download
    return model, preprocess, tokenizer


def _hand_cos(model, preprocess, tokenizer, images, texts) -> torch.Tensor:
    with torch.no_grad():
        ie = model.encode_image(torch.stack([preprocess(im.convert("RGB")) for im in images]))
        te = model.encode_text(tokenizer(texts))
    return F.normalize(ie, dim=-1) @ F.normalize(te, dim=-1).T


def test_clipscore_matches_hand_computation(tiny_clip):
    from mmn.metrics.clipscore import HESSEL_W, PAPER_W, ClipScorer

    model, preprocess, tokenizer = tiny_clip
    scorer = ClipScorer.from_model(model, preprocess, tokenizer, batch_size=3, w=HESSEL_W)  # batches cross a boundary
    images = _images()
    cos = _hand_cos(model, preprocess, tokenizer, images, TEXTS)
    expected = 250.0 * cos.clamp(min=0)
    np.testing.assert_allclose(scorer.score(images, TEXTS), expected.diagonal().numpy(), rtol=1e-5, atol=1e-4)
    img_emb, txt_emb = scorer.image_embeddings(images), scorer.text_embeddings(TEXTS)
    assert img_emb.shape == (4, 16) and txt_emb.shape == (4, 16)
    np.testing.assert_allclose(img_emb.norm(dim=-1).numpy(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(scorer.score_matrix(img_emb, txt_emb), expected.numpy(), rtol=1e-5, atol=1e-4)
    # aligned pairs without the n x n matrix: the hand-computed diagonal
    np.testing.assert_allclose(scorer.pair_scores(img_emb, txt_emb), expected.diagonal().numpy(), rtol=1e-5,
                               atol=1e-4)
    # negative cosines score 0: flip the text side
    flipped = scorer.score_matrix(img_emb, -txt_emb)
    np.testing.assert_allclose(flipped, (250.0 * (-cos).clamp(min=0)).numpy(), rtol=1e-5, atol=1e-4)
    assert (flipped[cos.numpy() > 0] == 0).all()
    # the default w = 1 is the paper's (torchmetrics) scale: exactly 1/2.5 of Hessel's
    w1 = ClipScorer.from_model(model, preprocess, tokenizer)
    assert w1.w == PAPER_W == 1.0
    np.testing.assert_allclose(w1.score(images, TEXTS) * 2.5, scorer.score(images, TEXTS), rtol=1e-5, atol=1e-4)


def test_clipscore_hand_vectors_and_alignment(tiny_clip):
    from mmn.metrics.clipscore import HESSEL_W, ClipScorer

    scorer = ClipScorer.from_model(*tiny_clip, w=HESSEL_W)
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    txt = torch.tensor([[-1.0, 0.0], [0.6, 0.8], [0.0, -3.0]])
    np.testing.assert_allclose(scorer.score_matrix(img, txt), [[0.0, 150.0, 0.0], [0.0, 200.0, 0.0]], atol=1e-4)
    # default (paper) scale: 100 * max(cos, 0)
    np.testing.assert_allclose(ClipScorer.from_model(*tiny_clip).score_matrix(img, txt),
                               [[0.0, 60.0, 0.0], [0.0, 80.0, 0.0]], atol=1e-4)
    with pytest.raises(ValueError, match="aligned pairs"):
        scorer.score(_images(2), TEXTS)


def test_clip_from_params_local_checkpoint(tiny_clip, tmp_path):
    import open_clip

    from mmn.metrics.clipscore import ClipScorer

    model, _, _ = tiny_clip
    name = "mmn-tiny-test-clip"
    (tmp_path / f"{name}.json").write_text(json.dumps(TINY_CLIP))
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    open_clip.add_model_config(tmp_path / f"{name}.json")
    try:
        scorer = ClipScorer.from_params(name, None, ckpt, "cpu")
        images = _images()
        cos = _hand_cos(model, scorer.preprocess, scorer.tokenizer, images, TEXTS)
        np.testing.assert_allclose(scorer.score(images, TEXTS), 250.0 * cos.clamp(min=0).diagonal().numpy(),
                                   rtol=1e-5, atol=1e-4)
        assert str(ckpt) in scorer.description
    finally:
        open_clip.factory._MODEL_CONFIGS.pop(name, None)


def test_clip_unavailable_never_downloads(tmp_path):
    from mmn.metrics.clipscore import ClipScorer, ClipUnavailable

    with pytest.raises(ClipUnavailable, match="need internet; none cached"):
        ClipScorer.from_params("ViT-B-32", "openai", None, "cpu", cache_dir=str(tmp_path))
    with pytest.raises(ClipUnavailable, match="neither a pretrained tag nor a checkpoint"):
        ClipScorer.from_params("ViT-B-32", None, None, "cpu")
    with pytest.raises(ClipUnavailable, match="no pretrained tag"):
        ClipScorer.from_params("ViT-B-32", "no-such-tag", None, "cpu")
    with pytest.raises(ClipUnavailable, match="does not exist"):
        ClipScorer.from_params("ViT-B-32", "openai", tmp_path / "missing.pt", "cpu")
    with pytest.raises(ClipUnavailable, match="no model config"):
        ClipScorer.from_params("No-Such-Model", "openai", None, "cpu")


def test_cached_pretrained_finds_hf_cache_without_network(tmp_path):
    from mmn.metrics.clipscore import _is_torchscript, cached_pretrained

    assert cached_pretrained("ViT-B-32", "openai", str(tmp_path)) is None
    # the HF Hub cache layout open_clip's download would leave (repo of the openai tag)
    repo = tmp_path / "models--timm--vit_base_patch32_clip_224.openai"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snap / "open_clip_model.safetensors").write_bytes(b"x")
    assert cached_pretrained("ViT-B-32", "openai", str(tmp_path)) == str(snap / "open_clip_model.safetensors")
    # OpenAI's original .pt files are TorchScript archives; state-dict files are not
    with warnings.catch_warnings():  # torch.jit is deprecated, but OpenAI's files are TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "ts.pt")
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "sd.pt")
    assert _is_torchscript(str(tmp_path / "ts.pt")) and not _is_torchscript(str(tmp_path / "sd.pt"))


# ----------------------------------------------------------------------------- BERTScore

CANDS = ["a cat sitting on a mat", "horses, racing, ponies, ridden", "kitchen", "dark"]
REFS_MULTI = [
    ["a cat lies on a rug", "the kitten is sleeping", "a cat on a mat"],
    ["a cowboy riding a horse", "people racing horses on a track"],
    ["a kitchen with an oven and a sink", "a clean kitchen", "a stove", "white cabinets"],
    ["an empty room", "nothing here"],
]


@pytest.fixture(scope="session")
def bert():
    from mmn.metrics.bertscore import BertScorer

    return BertScorer.from_params("embedded:all-MiniLM-L6-v2", device="cpu")


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from mmn.metrics.bertscore import resolve_model_type

    path, layers = resolve_model_type("embedded:all-MiniLM-L6-v2")
    assert layers == 6 and Path(path, "config.json").is_file()
    return path


def test_bertscore_single_ref_matches_bert_score(bert, minilm_path):
    import bert_score

    refs = [r[0] for r in REFS_MULTI]
    _, _, f = bert_score.score(CANDS, refs, model_type=minilm_path, num_layers=6, device="cpu")
    got = bert.f1(CANDS, refs)
    assert got.shape == (4,) and got.dtype == np.float64
    np.testing.assert_allclose(got, f.numpy(), rtol=1e-5, atol=1e-6)
    assert bert.f1(["a cat on a mat"], ["a cat on a mat"])[0] == pytest.approx(1.0, abs=1e-5)
    assert bert.tokenizer.model_max_length == 512
    assert bert.description == "embedded:all-MiniLM-L6-v2 (layer 6)"


def test_bertscore_multi_ref_and_mean(bert, minilm_path):
    import bert_score

    _, _, f = bert_score.score(CANDS, REFS_MULTI, model_type=minilm_path, num_layers=6, device="cpu")
    np.testing.assert_allclose(bert.f1(CANDS, REFS_MULTI), f.numpy(), rtol=1e-5, atol=1e-6)
    flat_c = [c for c, rs in zip(CANDS, REFS_MULTI) for _ in rs]
    flat_r = [r for rs in REFS_MULTI for r in rs]
    _, _, fp = bert_score.score(flat_c, flat_r, model_type=minilm_path, num_layers=6, device="cpu")
    fp = fp.numpy()
    bounds = np.cumsum([0] + [len(rs) for rs in REFS_MULTI])
    expected_mean = [fp[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:])]
    expected_max = [fp[a:b].max() for a, b in zip(bounds[:-1], bounds[1:])]
    np.testing.assert_allclose(bert.mean_f1_over_refs(CANDS, REFS_MULTI), expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f.numpy(), expected_max, rtol=1e-5, atol=1e-6)  # bert_score's max-over-refs


def test_bertscore_edge_cases(bert):
    from mmn.errors import ModelError
    from mmn.metrics.bertscore import BertScorer

    # empty strings score 0 (bert_score's documented behaviour; it crashes on them itself)
    np.testing.assert_array_equal(bert.f1(["", "a cat", "  "], ["a cat", "", "x"]), [0.0, 0.0, 0.0])
    multi = bert.f1(["", "a cat"], [["a cat", "x"], ["", "a cat"]])
    assert multi[0] == 0.0 and multi[1] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(bert.mean_f1_over_refs(["a cat"], [["", "a cat"]]), [0.5], atol=1e-5)

    long = " ".join(["horse"] * 700)  # longer than 512 tokens: truncated, not an error
    assert np.isfinite(bert.f1([long], ["a horse"])).all()
    assert bert.f1([], []).shape == (0,)
    with pytest.raises(ValueError, match="candidates vs"):
        bert.f1(["a"], ["b", "c"])
    with pytest.raises(ValueError, match="empty list"):
        bert.f1(["a"], [[]])
    with pytest.raises(ValueError, match="refs\\[1\\]"):
        bert.f1(["a", "b"], [["x"], "y"])
    with pytest.raises(ValueError, match="non-empty list"):
        bert.mean_f1_over_refs(["a"], [[]])
    with pytest.raises(ModelError, match="unknown embedded"):
        BertScorer.from_params("embedded:nope", 6)
    with pytest.raises(ValueError, match="baseline"):
        BertScorer.from_params("embedded:all-MiniLM-L6-v2", 6, rescale_with_baseline=True)
    with pytest.raises(ValueError, match="1..6"):
        BertScorer.from_params("embedded:all-MiniLM-L6-v2", 12)


def test_bertscore_baseline_is_bert_scores_own_file():
    """b for roberta-large at its tuned layer 17 is read from the file inside the bert_score package."""
    import bert_score
    import pandas as pd

    from mmn.metrics.bertscore import baseline_file, read_baseline

    f = baseline_file("roberta-large")
    assert f.parent.parent.parent == Path(bert_score.__file__).parent and f.is_file()
    assert read_baseline(f, 17) == pytest.approx(0.8312, abs=1e-4)
    df = pd.read_csv(f)
    assert read_baseline(f, 17) == float(df.iloc[17]["F"])  # bert_score's own row lookup (iloc[num_layers])
    with pytest.raises(ValueError, match="layer 99"):
        read_baseline(f, 99)


def test_bertscore_rescale_matches_bert_score(bert, minilm_path, tmp_path):
    """rescaled = (raw - b)/(1 - b), b from bert_score's roberta-large file (row of layer 6), and
    equal to bert_score.score(..., rescale_with_baseline=True) pointed at the same file."""
    import shutil

    import bert_score
    import pandas as pd

    from mmn.metrics.bertscore import BertScorer, baseline_file

    f = tmp_path / "baseline.tsv"
    shutil.copy(baseline_file("roberta-large"), f)  # bert_score's file, used for the MiniLM at layer 6
    b = float(pd.read_csv(f).iloc[6]["F"])
    resc = BertScorer.from_params("embedded:all-MiniLM-L6-v2", 6, device="cpu", rescale=True, baseline_path=f)
    assert resc.baseline == pytest.approx(b) and resc.rescaled and not bert.rescaled
    assert "rescaled" in resc.description
    refs = [r[0] for r in REFS_MULTI]
    raw = bert.f1(CANDS, refs)
    got = resc.f1(CANDS, refs)
    np.testing.assert_allclose(got, (raw - b) / (1 - b), rtol=1e-6)
    _, _, f_bs = bert_score.score(CANDS, refs, model_type=minilm_path, num_layers=6, device="cpu", lang="en",
                                  rescale_with_baseline=True, baseline_path=str(f))
    np.testing.assert_allclose(got, f_bs.numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, raw, atol=1e-3)  # the rescale really changed the numbers
    assert resc.min_score() == pytest.approx(-b / (1 - b))


def test_bertscore_f1_guard_on_a_crafted_pair(bert, minilm_path):
    """Signed cosines: P = -0.10, R = 0.11 gives bert_score's 2PR/(P+R) = -2.2; the guard clamps
    P, R at 0 first, so F = 0; positive P, R keep bert_score's F exactly."""
    import bert_score

    from mmn.metrics.bertscore import BertScorer, guarded_f1

    # a real MiniLM pair (the decoded text) with R < 0 < P: bert_score's F is not 0
    cand, ref = ["Historically, text, Limit, Text, Fine"], ["two dogs"]
    p_bs, r_bs, f_bs = bert_score.score(cand, ref, model_type=minilm_path, num_layers=6, device="cpu")
    assert p_bs.item() > 0 > r_bs.item() and f_bs.item() != 0
    assert f_bs.item() == pytest.approx(2 * p_bs.item() * r_bs.item() / (p_bs.item() + r_bs.item()), rel=1e-4)
    assert bert.f1(cand, ref)[0] == 0.0

    p = np.array([-0.10, -0.5, 0.6, 0.0, 0.3])
    r = np.array([0.11, -0.4, 0.3, 0.0, -0.2])
    assert 2 * p[0] * r[0] / (p[0] + r[0]) == pytest.approx(-2.2)
    np.testing.assert_allclose(guarded_f1(p, r), [0.0, 0.0, 0.4, 0.0, 0.0])

    s = BertScorer(bert.model, bert.tokenizer, "crafted")  # P, R crafted instead of computed
    s.precision_recall = lambda c, r: (np.array([-0.10, 0.6]), np.array([0.11, 0.3]))
    np.testing.assert_allclose(s.pair_f1(["Historically, text, Limit, Text, Fine", "a cat"], ["x y", "a cat"]),
                               [0.0, 0.4], rtol=1e-6)
    s.baseline = 0.5
    np.testing.assert_allclose(s.pair_f1(["a", "b"], ["c", "d"]), [-1.0, -0.2], rtol=1e-6)


PAIRS_SIGNED = [("Historically, text, Limit, Text, Fine", "two dogs"), ("a dog", "a man riding a wave on a surfboard"),
                ("kitchen", "a clean kitchen"), ("vehicles, Trucks, trucks, trucking, lorry", "a bus on a street"),
                ("dark", "an empty room at night with the lights off")]


def test_bertscore_batched_equals_each_pair_scored_alone(bert, minilm_path):
    """Batched matching (many pairs of different lengths in one bmm) gives, pair by pair, the
    P and R that bert_score computes for that pair alone (no padding, so no zero-floored
    cosines), signed-cosine pairs included; and the result does not depend on the batch."""
    import bert_score

    cands, refs = [c for c, _ in PAIRS_SIGNED], [r for _, r in PAIRS_SIGNED]
    p, r = bert.precision_recall(cands, refs)
    for i, (c, ref) in enumerate(PAIRS_SIGNED):
        p1, r1, _ = bert_score.score([c], [ref], model_type=minilm_path, num_layers=6, device="cpu")
        assert p[i] == pytest.approx(p1.item(), abs=2e-6) and r[i] == pytest.approx(r1.item(), abs=2e-6), c
    assert (r < 0).any()  # the set really has a signed-cosine pair
    p_rev, r_rev = bert.precision_recall(cands[::-1], refs[::-1])
    np.testing.assert_allclose(p_rev[::-1], p, atol=1e-6)
    np.testing.assert_allclose(r_rev[::-1], r, atol=1e-6)
    small = type(bert)(bert.model, bert.tokenizer, "small blocks", batch_size=2, max_pairs=2)
    np.testing.assert_allclose(small.precision_recall(cands, refs)[0], p, atol=1e-6)


def test_bertscore_references_are_embedded_once(bert):
    """A reference caption is embedded once, however many candidates and calls score against it."""
    from mmn.metrics.bertscore import BertScorer

    s = BertScorer(bert.model, bert.tokenizer, "counting")
    seen: list[str] = []
    enc = s._encode
    s._encode = lambda sents: (seen.extend(sents), enc(sents))[1]
    refs = REFS_MULTI[0]
    s.mean_f1_over_refs(["a cat", "a dog", "a cat"], [refs, refs, refs])
    s.mean_f1_over_refs(["a bird"], [refs])
    assert sorted(x for x in seen if x in refs) == sorted(refs)  # each reference once, over both calls
    assert seen.count("a cat") == 1 and seen.count("a bird") == 1  # a repeated candidate: once per call


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bertscore_half_precision_agrees_with_fp32(bert, dtype):
    """The encoder under bf16 / fp16 autocast (matching stays fp32): every F1 within 1e-3 of fp32."""
    from mmn.metrics.bertscore import BertScorer

    half = BertScorer(bert.model, bert.tokenizer, "half", dtype=dtype)
    cands = CANDS + [c for c, _ in PAIRS_SIGNED]
    groups = REFS_MULTI + [[r, "a photo of something"] for _, r in PAIRS_SIGNED]
    f32 = bert.mean_f1_over_refs(cands, groups)
    f16 = half.mean_f1_over_refs(cands, groups)
    assert np.abs(f16 - f32).max() <= 1e-3
    assert np.median(f32) > 0.1  # non-trivial scores
    assert np.abs(f16 - f32).max() > 0  # half precision really ran
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        BertScorer(bert.model, bert.tokenizer, "x", dtype=torch.float64)


# ----------------------------------------------------------------------------- IoU

N_PIX = 224 * 224


def _block(r: int, c: int) -> np.ndarray:
    b = np.zeros((224, 224), dtype=bool)
    b[16 * r:16 * (r + 1), 16 * c:16 * (c + 1)] = True
    return b


def test_iou_rectangles():
    from mmn.metrics.iou import iou

    a = np.zeros((20, 20), dtype=bool)
    b = np.zeros((20, 20), dtype=bool)
    a[0:10, 0:10] = True  # 100
    b[5:15, 5:15] = True  # 100, overlap 5×5 = 25 → 25 / 175
    assert iou(a, b) == pytest.approx(25 / 175)
    assert iou(a, a) == 1.0
    c = np.zeros((20, 20), dtype=bool)
    c[0:10, 10:20] = True  # touches a, no overlap
    assert iou(a, c) == 0.0
    assert iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 0.0  # empty union
    with pytest.raises(ValueError, match="shapes differ"):
        iou(a, np.zeros((20, 21), bool))


def test_receptive_field_hot_patch():
    from mmn.metrics.iou import iou, receptive_field, threshold_map

    r, c = 5, 9
    acts = torch.zeros(196)
    acts[r * 14 + c] = 1.0  # row-major position
    m = receptive_field(acts)
    assert m.shape == (224, 224)
    assert np.unravel_index(m.argmax(), m.shape)[0] // 16 == r and np.unravel_index(m.argmax(), m.shape)[1] // 16 == c
    np.testing.assert_allclose(receptive_field(acts.reshape(14, 14).numpy()), m)
    np.testing.assert_allclose(receptive_field(acts.to(torch.bfloat16)), m)
    # 98% of the map is tied at 0: strictly above the 0.95 quantile is the bilinear support,
    # a 32×32 square centred on the patch; ">=" would take the whole image
    mask = threshold_map(m, 0.95)
    ys, xs = np.nonzero(mask)
    assert mask.sum() == 32 * 32
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (16 * r - 8, 16 * r + 23, 16 * c - 8, 16 * c + 23)
    assert (ys.mean(), xs.mean()) == (16 * r + 7.5, 16 * c + 7.5)
    assert iou(mask, _block(r, c)) == pytest.approx(0.25)
    assert threshold_map(m, 0.95, inclusive=True).all()
    # a quantile that keeps one patch's worth of pixels recovers the patch closely
    tight = threshold_map(m, 1 - 256 / N_PIX)
    assert iou(tight, _block(r, c)) > 0.75


def test_receptive_field_smooth_bump_area():
    from mmn.metrics.iou import iou, receptive_field, threshold_map

    r, c = 5, 9
    yy, xx = np.mgrid[0:14, 0:14]
    acts = np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / 2.0).ravel()
    mask = threshold_map(receptive_field(acts), 0.95)
    assert abs(mask.mean() - 0.05) < 0.001  # ≈ 5% of the pixels
    ys, xs = np.nonzero(mask)
    assert 16 * r <= ys.mean() < 16 * (r + 1) and 16 * c <= xs.mean() < 16 * (c + 1)
    assert (mask & _block(r, c)).sum() == 256  # the patch's block lies inside
    assert iou(mask, _block(r, c)) == pytest.approx(256 / mask.sum())


def test_receptive_field_errors_and_constant_map():
    from mmn.metrics.iou import receptive_field, threshold_map

    with pytest.raises(ValueError, match="square grid"):
        receptive_field(np.zeros(50))
    out = receptive_field(np.arange(12.0), size=(30, 40), grid=(3, 4))
    assert out.shape == (30, 40)
    assert not threshold_map(np.ones((8, 8))).any()
    assert threshold_map(np.ones((8, 8)), inclusive=True).all()
    with pytest.raises(ValueError, match="finite"):
        threshold_map(np.array([[np.nan, 1.0]]))


@pytest.fixture(scope="module")
def coco():
    if not (COCO_MINI / "annotations" / "instances.json").is_file():
        pytest.skip(f"coco-mini not found at {COCO_MINI}")
    import contextlib
    import io

    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(COCO_MINI / "annotations" / "instances.json"))


def test_coco_mask_matches_ann_to_mask(coco):
    from mmn.metrics.iou import coco_mask

    image_id, cat = 22892, coco.getCatIds(catNms=["cat"])[0]  # one dominant cat (README)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], catIds=[cat], iscrowd=None))
    full = np.zeros((coco.imgs[image_id]["height"], coco.imgs[image_id]["width"]), dtype=bool)
    for a in anns:
        full |= coco.annToMask(a).astype(bool)
    expected = np.asarray(Image.fromarray(full.astype(np.uint8) * 255).resize((224, 224), Image.NEAREST)) > 0
    got = coco_mask(coco, image_id, cat)
    assert got.dtype == bool and got.shape == (224, 224)
    np.testing.assert_array_equal(got, expected)
    assert abs(got.mean() - full.mean()) < 0.01  # squashing keeps the area fraction
    assert coco_mask(coco, image_id, cat, size=(100, 60)).shape == (100, 60)
    person = coco.getCatIds(catNms=["person"])[0]
    multi = [i for i in coco.getImgIds(catIds=[person]) if len(coco.getAnnIds(imgIds=[i], catIds=[person])) >= 2][0]
    union = coco_mask(coco, multi, person)
    for a in coco.loadAnns(coco.getAnnIds(imgIds=[multi], catIds=[person])):
        one = np.asarray(Image.fromarray(coco.annToMask(a) * 255).resize((224, 224), Image.NEAREST)) > 0
        assert (union | one).sum() == union.sum()  # every instance inside the union
    absent = next(i for i in coco.getImgIds() if i not in set(coco.getImgIds(catIds=[cat])))
    with pytest.raises(ValueError, match="no annotation"):
        coco_mask(coco, absent, cat)


def test_single_instance_images(coco):
    from mmn.metrics.iou import single_instance_images

    names = ["cat", "person", "train", "dog"]
    got = single_instance_images(coco, names)
    assert set(got) == set(names)
    for name in names:
        cid = coco.getCatIds(catNms=[name])[0]
        expected = []
        for img in coco.getImgIds(catIds=[cid]):
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[img], catIds=[cid], iscrowd=None))
            if sum(not a["iscrowd"] for a in anns) == 1 and not any(a["iscrowd"] for a in anns):
                expected.append(img)
        assert got[name] == sorted(expected)
    assert 22892 in got["cat"]
    assert got["person"] and len(got["person"]) < 48  # some person images have several people
    with pytest.raises(ValueError, match="'unicorn'.*valid names"):
        single_instance_images(coco, ["cat", "unicorn"])


# ----------------------------------------------------------------------------- stats


def test_ks_2samp():
    from mmn.metrics.stats import ks_2samp

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=200), rng.normal(0.3, 1.0, size=150)
    ref = scipy.stats.ks_2samp(a, b)
    assert ks_2samp(a, b) == {"D": pytest.approx(ref.statistic), "p": pytest.approx(ref.pvalue)}
    disjoint = ks_2samp(np.arange(10.0), np.arange(20.0, 30.0))
    assert disjoint["D"] == 1.0 and disjoint["p"] < 1e-4
    same = ks_2samp(a, a)
    assert same["D"] == 0.0 and same["p"] == 1.0
    with pytest.raises(ValueError):
        ks_2samp([], [1.0])


def test_bootstrap_ci_contains_mean_shrinks_with_n_and_is_seeded():
    from mmn.metrics.stats import bootstrap_ci

    rng = np.random.default_rng(1)
    small, large = rng.normal(10.0, 2.0, size=25), rng.normal(10.0, 2.0, size=2500)
    a, b = bootstrap_ci(small, seed=3), bootstrap_ci(small, seed=3)
    assert a == b  # seeded
    big = bootstrap_ci(large)
    for r in (a, big):
        assert r["lo"] < r["mean"] < r["hi"]
    assert (big["hi"] - big["lo"]) < (a["hi"] - a["lo"]) / 5  # ~ 1/sqrt(n): 10x the n, ~1/10 the width
    # Against the normal-theory interval at large n (independent computation).
    half = 1.959963984540054 * large.std(ddof=1) / np.sqrt(large.size)
    assert big["lo"] == pytest.approx(large.mean() - half, abs=0.02)
    assert big["hi"] == pytest.approx(large.mean() + half, abs=0.02)
    assert bootstrap_ci([4.0]) == {"mean": 4.0, "lo": None, "hi": None, "n": 1}
    assert bootstrap_ci([2.0, 2.0, 2.0]) == {"mean": 2.0, "lo": 2.0, "hi": 2.0, "n": 3}
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_ci([1.0, float("nan")])


def test_paired_test_exact_sign_flip_on_a_hand_case():
    from mmn.metrics.stats import paired_test

    # 5 pairs, every difference positive: of the 2**5 sign patterns only the observed one and
    # its mirror are as extreme, so the exact two-sided p is 2/32.
    a, b = np.array([3.0, 4.0, 5.0, 6.0, 7.0]), np.array([1.0, 2.0, 3.5, 4.0, 5.5])
    r = paired_test(a, b)
    assert r["n"] == 5 and r["diff"] == pytest.approx(np.mean(a - b))
    assert r["p"] == pytest.approx(2 / 32)
    assert r["lo"] <= r["diff"] <= r["hi"]
    assert paired_test(a, a)["p"] == 1.0
    # Pairing matters: a shift shared by both members of a pair cancels.
    rng = np.random.default_rng(0)
    base = rng.normal(0, 10, size=40)
    assert paired_test(base + 0.5 + rng.normal(0, 0.1, 40), base)["p"] < 1e-3
    with pytest.raises(ValueError, match="equal length"):
        paired_test([1.0, 2.0], [1.0])


def test_random_like_embeddings():
    from mmn.metrics.stats import random_like_embeddings

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(3000, 8, generator=g) * torch.linspace(0.1, 2.0, 8) + torch.linspace(-1.0, 1.0, 8)
    emb = emb.to(torch.float16)
    out = random_like_embeddings(emb, 50_000, seed=7)
    assert out.shape == (50_000, 8) and out.dtype == torch.float16
    e, o = emb.float(), out.float()
    torch.testing.assert_close(o.mean(0), e.mean(0), atol=0.03, rtol=0)
    torch.testing.assert_close(o.std(0), e.std(0), atol=0, rtol=0.02)
    torch.testing.assert_close(random_like_embeddings(emb, 10, 7), random_like_embeddings(emb, 10, 7))
    assert not torch.equal(random_like_embeddings(emb, 10, 7), random_like_embeddings(emb, 10, 8))


def test_nearest_tokens():
    from mmn.metrics.stats import nearest_tokens

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(500, 16, generator=g)
    rows = torch.tensor([3, 77, 499])
    ids, cos = nearest_tokens(emb[rows] * 5.0, emb, k=5, batch_size=2)  # scale does not matter for cosine
    assert ids.shape == (3, 5) and cos.shape == (3, 5)
    assert ids[:, 0].tolist() == rows.tolist()
    torch.testing.assert_close(cos[:, 0], torch.ones(3))
    assert (cos[:, :-1] >= cos[:, 1:]).all()
    full = F.normalize(emb[rows], dim=-1) @ F.normalize(emb, dim=-1).T
    torch.testing.assert_close(cos, full.topk(5, dim=1).values)
    with pytest.raises(ValueError):
        nearest_tokens(torch.zeros(2, 15), emb)


def test_every_bertscore_is_built_from_the_profile(monkeypatch):
    """caption quality, Table 1/2 (score) and the ablated captions (ablate) build BERTScore only
    through ``BertScorer.from_profile`` (an AST scan of stages/ and mmn/ finds no other
    construction), and under the paper profile's settings it passes the profile's model, layer
    and rescale (a stand-in records them): caption and ablate scores are on Table 1's scale."""
    import ast

    import yaml

    from mmn.metrics.bertscore import BertScorer
    from mmn.params import parse_params

    others, users = [], set()
    for f in [*REPO.glob("stages/*.py"), *REPO.glob("mmn/**/*.py")]:
        if f.name == "bertscore.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "BertScorer":
                (users.add(f.stem) if node.attr == "from_profile" else others.append(f"{f.name}: .{node.attr}"))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "BertScorer":
                others.append(f"{f.name}: BertScorer(...)")
    assert not others and {"caption", "ablate", "scores"} <= users, (others, users)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    seen: dict = {}
    monkeypatch.setattr(BertScorer, "from_params", classmethod(lambda cls, *a, **k: seen.update(args=a, **k) or "bert"))
    for profile, rescale in (("paper", True), ("embedded", False)):
        params = parse_params({**raw, "profile": profile})
        assert BertScorer.from_profile(params, "cpu") == "bert"
        m = params.model
        assert seen["args"] == (m.bert_model, m.bert_layers) and seen["rescale"] is rescale is m.bert_rescale


def test_bootstrap_statistic_of_paired_samples():
    """bootstrap_statistic: the statistic of the full samples, a CI from resampling images (pairs
    kept together: a ratio of sums of perfectly proportional pairs has no spread), None CI for
    n = 1, and a clear error on unequal lengths."""
    from mmn.metrics.stats import bootstrap_statistic

    ratio = lambda e, g, axis=-1: e.sum(axis=axis) / g.sum(axis=axis)  # noqa: E731
    g = np.array([1.0, 2.0, 3.0, 4.0])
    b = bootstrap_statistic((0.5 * g, g), ratio)
    assert b["value"] == pytest.approx(0.5) and b["lo"] == pytest.approx(0.5) and b["hi"] == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    e = rng.uniform(0, 1, 30)
    b = bootstrap_statistic((e, g.repeat(8)[:30]), ratio)
    assert b["value"] == pytest.approx(e.sum() / g.repeat(8)[:30].sum()) and b["lo"] < b["value"] < b["hi"]
    assert bootstrap_statistic((np.array([1.0]), np.array([2.0])), ratio) == {"value": 0.5, "lo": None, "hi": None,
                                                                              "n": 1}
    with pytest.raises(ValueError, match="equal-length"):
        bootstrap_statistic((np.ones(3), np.ones(2)), ratio)
