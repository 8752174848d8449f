"""Projection training at size: encoder features on disk (FeatureStore), streamed standardisation,
(image, caption) pairs by epoch, a resumable checkpoint (killed for real, then resumed), and bf16
autocast; on hand data and tiny random models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mmn.projection_features import FeatureStore, build_feature_store, feature_stats, store_key
from mmn.projection_training import TrainConfig, _PairSampler, train_projection

pytestmark = pytest.mark.timeout(300)


def _views(n_images: int, v: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(100 + i, (torch.randn(v, 3, 5, generator=g, dtype=torch.float64) * 3 + i).to(dtype))
            for i in range(n_images)]


def _consumed_error():
    raise AssertionError("a reused store must not encode again")
    yield  # pragma: no cover


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_store_rows_equal_the_in_memory_features(tmp_path: Path, dtype) -> None:
    views = _views(4, 3, dtype=torch.float64)
    full = torch.cat([f for _, f in views]).to(dtype)
    store = build_feature_store(tmp_path / "s", "k1", iter(views), dtype)
    assert store.shape == (12, 3, 5) and store.owner == [100] * 3 + [101] * 3 + [102] * 3 + [103] * 3
    for idx in ([0], [11, 3, 3, 7], list(range(12))):
        assert torch.equal(store[idx], full[idx]) and store[idx].dtype == dtype
    assert torch.equal(store[2:9], full[2:9])
    with pytest.raises(IndexError):
        store[[12]]
    # same key and dtype: reused without encoding; another key: rebuilt
    assert torch.equal(build_feature_store(tmp_path / "s", "k1", _consumed_error(), dtype)[[5]], full[[5]])
    other = _views(2, 1, seed=3)
    rebuilt = build_feature_store(tmp_path / "s", "k2", iter(other), dtype)
    assert rebuilt.shape == (2, 3, 5) and torch.equal(rebuilt[[1]], other[1][1].to(dtype))
    # a truncated file is not taken for a store
    with open(tmp_path / "s" / "features.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match=r"features.bin has 10 bytes"):
        FeatureStore(tmp_path / "s")
    again = build_feature_store(tmp_path / "s", "k2", iter(other), dtype)
    assert torch.equal(again[[0, 1]], torch.cat([f for _, f in other]).to(dtype))
    assert store_key(a=1, b=[2]) == store_key(b=[2], a=1) != store_key(a=1, b=[3])


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_streamed_stats_equal_the_one_pass_mean_and_std(chunk: int) -> None:
    x = torch.randn(37, 4, 6, dtype=torch.float64) * torch.arange(1, 7) + 100
    mean, std = feature_stats(x, chunk_rows=chunk)
    flat = x.reshape(-1, 6)
    torch.testing.assert_close(mean, flat.mean(0), rtol=1e-13, atol=0)
    torch.testing.assert_close(std, flat.std(0), rtol=1e-11, atol=0)
    m32, s32 = feature_stats(x.float(), chunk_rows=chunk)
    assert m32.dtype == torch.float32 and torch.allclose(m32.double(), flat.mean(0), rtol=1e-6)


def test_pairs_by_epoch_visit_every_image_caption_pair_once() -> None:
    owner = [7, 7, 8, 9, 9, 9]  # image 7 has 2 views, 8 one, 9 three
    caps = {7: [[1], [2]], 8: [[3]], 9: [[4], [5], [6]]}
    s = _PairSampler(owner, caps, torch.Generator().manual_seed(0))
    for _ in range(3):  # three epochs of 6 pairs, batches of 4 crossing the epoch ends
        seen = []
        for _ in range(3):
            idx, c = s.batch(4)
            seen += list(zip(idx, (x[0] for x in c)))
        epochs = [sorted(cap for _, cap in seen[k:k + 6]) for k in (0, 6)]
        assert epochs == [[1, 2, 3, 4, 5, 6]] * 2
        for row, cap in seen:  # the view belongs to the caption's image
            assert owner[row] == {1: 7, 2: 7, 3: 8, 4: 9, 5: 9, 6: 9}[cap]
    again = _PairSampler(owner, caps, torch.Generator().manual_seed(0))
    assert again.batch(5) == _PairSampler(owner, caps, torch.Generator().manual_seed(0)).batch(5)
    rows9 = [i for _ in range(200) for i, c in zip(*again.batch(3)) if c[0] >= 4]
    assert set(rows9) == {3, 4, 5}  # every view of image 9 is drawn


def _loss_fn(soft: torch.Tensor, caps: list[list[int]]) -> torch.Tensor:
    target = torch.tensor([float(c[0]) for c in caps]).view(-1, 1, 1)
    return ((soft - target) ** 2).mean()


def _setup():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(12, 3, 4, generator=g)
    owner = [i // 2 for i in range(12)]
    caps = {i: [[i], [i + 1]] for i in range(6)}
    return feats, owner, caps, feats[:2], [(0, [0]), (1, [2])]


def _cfg(ckpt: str | None, **kw) -> TrainConfig:
    base = dict(max_steps=40, batch_size=4, lr=0.05, warmup_steps=2, seed=3, eval_every=5, patience=0,
                checkpoint=ckpt, resume_key="k")
    return TrainConfig(**{**base, **kw})


def test_an_interrupted_training_resumes_to_the_same_projection(tmp_path: Path) -> None:
    feats, owner, caps, vf, vp = _setup()
    log_straight, log_resumed = [], []
    straight = train_projection(feats, owner, caps, 2, _loss_fn, _cfg(None), vf, vp,
                                log=lambda *a: log_straight.append(a))
    ckpt = str(tmp_path / "ck.pt")

    class Killed(Exception):
        pass

    def die_at_17(step: int, loss: float) -> None:
        if step == 17:
            raise Killed

    with pytest.raises(Killed):
        train_projection(feats, owner, caps, 2, _loss_fn, _cfg(ckpt), vf, vp, progress=die_at_17)
    assert torch.load(ckpt, weights_only=True)["step"] == 15  # the last evaluation before the kill
    steps = []
    resumed = train_projection(feats, owner, caps, 2, _loss_fn, _cfg(ckpt), vf, vp,
                               progress=lambda s, _: steps.append(s), log=lambda *a: log_resumed.append(a))
    assert steps[0] == 15 and len(steps) == 25  # continued, not restarted
    # the log: replayed up to the checkpoint, then continued; the same as the uninterrupted run's
    assert log_resumed == log_straight and len(log_straight) == 40 + 1 + 8
    assert [a for a in log_straight if a[0] == "val/loss"][0][1] == 0
    assert torch.equal(resumed.projection.weight, straight.projection.weight)
    assert resumed.history == straight.history and resumed.best_step == straight.best_step
    # a checkpoint saved under another key (other data or settings) is not resumed
    steps.clear()
    train_projection(feats, owner, caps, 2, _loss_fn, _cfg(ckpt, resume_key="other"), vf, vp,
                     progress=lambda s, _: steps.append(s))
    assert steps[0] == 0


_CHILD = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_training_at_size import _setup, _cfg, _loss_fn
    from mmn.projection_training import train_projection
    feats, owner, caps, vf, vp = _setup()
    def slow(step, loss):
        time.sleep(0.05)
    res = train_projection(feats, owner, caps, 2, _loss_fn, _cfg({ckpt!r}), vf, vp, progress=slow)
    torch.save(res.projection.weight, {out!r})
""")


def test_a_killed_training_process_resumes(tmp_path: Path) -> None:
    """SIGKILL a training process once it has saved a checkpoint; the rerun continues from it
    and ends with the weights of an uninterrupted run."""
    feats, owner, caps, vf, vp = _setup()
    straight = train_projection(feats, owner, caps, 2, _loss_fn, _cfg(None), vf, vp)
    ckpt, out = str(tmp_path / "ck.pt"), str(tmp_path / "w.pt")
    code = _CHILD.format(tests=str(Path(__file__).parent), ckpt=ckpt, out=out)
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": "0"})
    deadline = time.time() + 120
    while not os.path.exists(ckpt) and time.time() < deadline and child.poll() is None:
        time.sleep(0.02)
    assert os.path.exists(ckpt), "the child saved no checkpoint"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL and not os.path.exists(out)
    killed_at = int(torch.load(ckpt, weights_only=True)["step"])
    assert 0 < killed_at < 40
    steps = []
    resumed = train_projection(feats, owner, caps, 2, _loss_fn, _cfg(ckpt), vf, vp,
                               progress=lambda s, _: steps.append(s))
    assert steps[0] == killed_at and torch.equal(resumed.projection.weight, straight.projection.weight)


def test_bfloat16_autocast_trains_the_lm_in_bf16_and_keeps_the_projection_float32(tiny_adapters, tiny_beit,
                                                                                   tmp_path) -> None:
    from mmn.data.layout import CocoLayout
    from mmn.data.sample import materialize_sample
    from mmn.params import load_params, parse_params
    from mmn.projection_training import train_from_layout

    materialize_sample(tmp_path / "coco")
    layout = CocoLayout(tmp_path / "coco")
    ad, tok = tiny_adapters["llama"]
    seen: list[torch.dtype] = []
    mlp = ad.model.model.layers[0].mlp.down_proj
    h = mlp.register_forward_hook(lambda m, i, o: seen.append(o.dtype))

    def run(dtype: str, cache: Path | None):
        raw = load_params().model_dump()
        raw["projection"]["train"].update(max_steps=6, batch_size=4, views=2, warmup_steps=1, eval_every=3,
                                          val_fraction=0.3, patience=0, dtype=dtype)
        raw["profiles"][raw["profile"]]["train_dtype"] = None
        return train_from_layout(layout, ad, tok, tiny_beit, parse_params(raw), cache_dir=cache)

    try:
        p16, res16, meta16 = run("bfloat16", tmp_path / "cache")
        assert seen and all(d == torch.bfloat16 for d in seen)
        seen.clear()
        p32, res32, _ = run("float32", None)
        assert seen and all(d == torch.float32 for d in seen)
    finally:
        h.remove()
    assert p16.weight.dtype == torch.float32 and meta16["train_dtype"] == "bfloat16"
    assert not (tmp_path / "cache" / "checkpoint.pt").exists()  # finished: the checkpoint is gone
    assert (tmp_path / "cache" / "features" / "meta.json").is_file()  # the features stay for a rerun
    # same data, init and batches: the two precisions agree to bf16 precision after 6 steps
    assert abs(res16.initial_val_loss - res32.initial_val_loss) < 0.05 * abs(res32.initial_val_loss)
    assert torch.allclose(p16.weight, p32.weight, atol=0.05)
    assert meta16["n_pairs"] == 5 * 5 and meta16["epochs"] == round(6 * 4 / 25, 3)


def test_the_resume_key_follows_the_caption_texts_not_the_file_bytes(tmp_path: Path) -> None:
    """A rerun that fetched the same captions from another URL (a mirror on another port) writes
    another captions.json; its checkpoint must still resume. Other caption texts must not."""
    import json

    from mmn.data.layout import CocoLayout
    from mmn.data.sample import materialize_sample
    from mmn.params import load_params
    from mmn.projection_training import training_key

    materialize_sample(tmp_path / "coco")
    layout, params = CocoLayout(tmp_path / "coco"), load_params()
    key = training_key(layout, "feat", params, [1])
    path = layout.captions_path
    d = json.loads(path.read_text())
    d["info"] = {**d.get("info", {}), "url": "http://127.0.0.1:40000/captions.csv"}
    path.write_text(json.dumps(d))
    moved = CocoLayout(tmp_path / "coco")
    assert training_key(moved, "feat", params, [1]) == key
    assert training_key(moved, "feat", params, [2]) != key  # other validation images
    d["annotations"][0]["caption"] += " again"
    path.write_text(json.dumps(d))
    assert training_key(CocoLayout(tmp_path / "coco"), "feat", params, [1]) != key
