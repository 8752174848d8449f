"""Train the LiMBeR-style projection on a COCO-format training layout (``projection: train``).

The training images (``data/coco_train``) are split, seeded, into the images the
projection is fitted on and a validation split (``projection.train.val_fraction``,
at most ``val_max_images``). Views: view 0 of each training image is the plain resize,
the others random resized crops (scale 0.5–1) with horizontal flips, drawn from a
seeded torch generator; validation images use only their plain resize, scored with
every reference caption. Encoder features are computed once (the encoder is frozen);
with a cache folder they live on disk (:mod:`mmn.projection_features`), so memory does not
grow with the number of training images, and a rerun reuses them.

Gotchas:
* :func:`train_projection` samples (image, caption) pairs by epoch: a seeded permutation of
  every pair of the fitted images, each pair with one of its image's views drawn at random.
* It keeps the checkpoint of the lowest validation loss (evaluated every ``eval_every``
  steps, and once before the first step) and stops after ``patience`` evaluations without a
  lower one.
* With ``TrainConfig.checkpoint`` it saves its whole state (weights, Adam, RNG, the epoch's
  permutation, the history) at every evaluation; a rerun with the same ``resume_key``
  continues from there and ends bit for bit where an uninterrupted run would.
* ``dtype: bfloat16`` runs the LM under CPU/GPU autocast in bfloat16 (projection, optimizer and
  features in float32); ``float64`` casts LM and encoder to double for the block.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2
from tqdm import tqdm

from mmn.data.layout import CocoLayout, LayoutError
from mmn.data.split import seeded_split
from mmn.models.adapters import LMAdapter
from mmn.models.prefix_lm import ImagePrefixLM
from mmn.models.projection import Projection
from mmn.models.vision import PatchEncoder
from mmn.download import file_sha256
from mmn.params import Params
from mmn.projection_features import FeatureStore, build_feature_store, feature_stats, store_key
from mmn.text import caption_target_text



@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of :func:`train_projection` (``projection.train`` in params.yaml)."""

    max_steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    seed: int
    eval_every: int = 10
    patience: int = 5  # evaluations without a lower validation loss before stopping; 0 = never
    dtype: torch.dtype = torch.float32  # of the projection, its features and its optimizer state
    checkpoint: str | None = None  # file of the resumable state, saved at every evaluation; None = none
    resume_key: str = ""  # a checkpoint is resumed only when it was saved under the same key


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup, then cosine decay to 0 at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


@dataclass
class EarlyStopping:
    """Track the lowest validation loss; ``should_stop`` after ``patience`` evaluations without
    a strictly lower one (``patience = 0``: never)."""

    patience: int
    best: float = math.inf
    best_step: int | None = None
    bad: int = 0

    def update(self, step: int, val_loss: float) -> bool:
        """Record the loss evaluated after ``step`` updates; True when it is a new best."""
        if not math.isfinite(val_loss):
            raise ValueError(f"validation loss is {val_loss} at step {step}")
        if val_loss < self.best:
            self.best, self.best_step, self.bad = val_loss, step, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience


@dataclass
class TrainResult:
    """The best checkpoint and the loss history of :func:`train_projection`."""

    projection: Projection  # the checkpoint of the lowest validation loss (the last one without validation)
    history: list[dict] = field(default_factory=list)  # rows {step, train_loss, val_loss}, one per evaluation
    best_step: int = 0  # updates done when the kept checkpoint was taken
    best_val_loss: float | None = None
    initial_val_loss: float | None = None  # before the first update
    steps_run: int = 0
    stopped_early: bool = False
    n_pairs: int = 0  # (image, caption) pairs sampled from, one epoch


def validation_loss(
    proj: Projection,
    features: Tensor,
    pairs: Sequence[tuple[int, list[int]]],
    loss_fn: Callable[[Tensor, list[list[int]]], Tensor],
    batch_size: int,
) -> float:
    """Caption loss over fixed ``(feature row, caption ids)`` pairs, in order, in chunks of
    ``batch_size``; the chunk losses are averaged weighted by chunk size."""
    total = 0.0
    with torch.no_grad():
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s : s + batch_size]
            x = features[[i for i, _ in chunk]].to(proj.weight.device, proj.weight.dtype)
            total += float(loss_fn(proj(x), [c for _, c in chunk])) * len(chunk)
    return total / len(pairs)


class _BestCheckpoint:
    """Validation of :func:`train_projection`: the loss history, early stopping and the state
    of the lowest validation loss (the last state when there is no validation)."""

    def __init__(self, proj: Projection, val_features: Tensor | None, val_pairs: list[tuple[int, list[int]]],
                 loss_fn: Callable[[Tensor, list[list[int]]], Tensor], cfg: TrainConfig) -> None:
        self.proj, self.val_features, self.val_pairs = proj, val_features, val_pairs
        self.loss_fn, self.cfg = loss_fn, cfg
        self.has_val = val_features is not None and len(val_pairs) > 0
        self.stopper = EarlyStopping(cfg.patience)
        self.res = TrainResult(projection=proj)
        self.best_state = self._state()

    def _state(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.proj.linear.state_dict().items()}

    def evaluate(self, step: int, train_losses: list[float]) -> None:
        """Record the mean train loss since the last evaluation and (with validation) the
        validation loss after ``step`` updates; step 0 is the untrained projection."""
        row = {"step": step, "train_loss": sum(train_losses) / len(train_losses) if train_losses else None,
               "val_loss": None}
        if self.has_val:
            row["val_loss"] = validation_loss(self.proj.eval(), self.val_features, self.val_pairs, self.loss_fn,
                                              self.cfg.batch_size)
            if self.stopper.update(step, row["val_loss"]):
                self.best_state = self._state()
        if step > 0:
            self.res.history.append(row)
        elif self.has_val:
            self.res.initial_val_loss = row["val_loss"]

    @property
    def should_stop(self) -> bool:
        return self.has_val and self.stopper.should_stop

    def state(self) -> dict:
        """What a resumed run needs (plain containers and tensors: ``torch.load(weights_only=True)``)."""
        r, s = self.res, self.stopper
        return {"history": list(r.history), "initial_val_loss": r.initial_val_loss, "steps_run": r.steps_run,
                "stopped_early": r.stopped_early, "best_state": self.best_state,
                "stopper": {"best": s.best, "best_step": s.best_step, "bad": s.bad}}

    def restore(self, st: dict) -> None:
        r, s = self.res, self.stopper
        r.history, r.initial_val_loss = list(st["history"]), st["initial_val_loss"]
        r.steps_run, r.stopped_early = int(st["steps_run"]), bool(st["stopped_early"])
        self.best_state = st["best_state"]
        s.best, s.best_step, s.bad = st["stopper"]["best"], st["stopper"]["best_step"], st["stopper"]["bad"]

    def finish(self) -> TrainResult:
        """Load the kept state into the projection and fill the result's best step/loss."""
        res = self.res
        if self.has_val:
            self.proj.linear.load_state_dict(self.best_state)
            res.best_step, res.best_val_loss = int(self.stopper.best_step), self.stopper.best
        else:
            res.best_step = res.steps_run
        return res


class _PairSampler:
    """Batches of ``(feature row, caption ids)``: (image, caption) pairs by epoch (a seeded
    permutation of all pairs, continued across epoch ends), each with one of its image's views
    drawn from ``g``. Its state is the generator's, the permutation and the position in it."""

    def __init__(self, view_image: Sequence[int], captions: Mapping[int, list[list[int]]], g: torch.Generator):
        rows: dict[int, list[int]] = {}
        for row, img in enumerate(view_image):
            rows.setdefault(int(img), []).append(row)
        self.rows, self.captions, self.g = rows, captions, g
        self.pairs = [(img, k) for img in sorted(rows) for k in range(len(captions[img]))]
        if not self.pairs:
            raise ValueError("no (image, caption) pairs to train on")
        self.perm = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def batch(self, size: int) -> tuple[list[int], list[list[int]]]:
        idx, caps = [], []
        for _ in range(size):
            if self.pos >= len(self.perm):
                self.perm, self.pos = torch.randperm(len(self.pairs), generator=self.g), 0
            img, k = self.pairs[int(self.perm[self.pos])]
            self.pos += 1
            views = self.rows[img]
            idx.append(views[int(torch.randint(len(views), (1,), generator=self.g))])
            caps.append(self.captions[img][k])
        return idx, caps

    def state(self) -> dict:
        return {"g": self.g.get_state(), "perm": self.perm, "pos": self.pos}

    def restore(self, s: dict) -> None:
        self.g.set_state(s["g"])
        self.perm, self.pos = s["perm"], int(s["pos"])


def _save_checkpoint(path: str, state: dict) -> None:
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-save leaves the previous checkpoint


def train_projection(
    features: Tensor | FeatureStore,
    view_image: list[int],
    captions: Mapping[int, list[list[int]]],
    d_model: int,
    loss_fn: Callable[[Tensor, list[list[int]]], Tensor],
    cfg: TrainConfig,
    val_features: Tensor | None = None,
    val_pairs: Sequence[tuple[int, list[int]]] = (),
    progress: Callable[[int, float], None] | None = None,
    device: torch.device | str | None = None,
    log: Callable[[str, int, float], None] | None = None,
) -> TrainResult:
    """Train a :class:`Projection` ``d_enc → d_model`` with a frozen encoder and LM (LiMBeR-style).

    ``features``: ``Float[Tensor, "views P d_enc"]`` precomputed encoder outputs of the
    training views (a tensor, or a :class:`FeatureStore` on disk); ``view_image[i]`` = image of
    view i; ``captions[img]`` = tokenised reference captions. Each step takes the next
    ``batch_size`` (image, caption) pairs of the epoch's seeded permutation, each with a random
    view of its image. ``loss_fn(soft_tokens, caption_ids)`` is the mean caption cross-entropy
    after the prompt. The features are standardised with their own per-channel mean/std, stored
    in the projection. With ``val_pairs`` (rows of ``val_features`` ``[n_val, P, d_enc]`` with
    one caption each) the validation loss is evaluated before the first step, every
    ``eval_every`` steps and after the last; the checkpoint of its minimum is returned and
    training stops after ``patience`` evaluations without a new minimum. Without validation
    it trains ``max_steps`` and returns the last step. Deterministic for a given seed, resumed
    or not (``cfg.checkpoint``). Each batch and the projection live on ``device`` (default: the
    features' device, CPU for a store). The returned projection is on the CPU. ``log(name, step,
    value)`` gets ``train/loss`` after every update and ``val/loss`` at every evaluation (step 0:
    the untrained projection); a resumed run first replays what was logged up to its checkpoint.
    """
    device = torch.device(device) if device is not None else getattr(features, "device", torch.device("cpu"))
    g = torch.Generator().manual_seed(cfg.seed)
    mean, std = feature_stats(features)
    torch.manual_seed(cfg.seed)
    proj = Projection(features.shape[-1], d_model, mean, std).to(device, cfg.dtype)
    opt = torch.optim.Adam(proj.linear.parameters(), lr=cfg.lr)
    tracker = _BestCheckpoint(proj, val_features, list(val_pairs), loss_fn, cfg)
    sampler = _PairSampler(view_image, captions, g)
    logged: list[tuple[str, int, float]] = []

    def emit(name: str, step: int, value: float) -> None:
        logged.append((name, step, value))
        if log is not None:
            log(name, step, value)

    start = 0
    ck = torch.load(cfg.checkpoint, weights_only=True) if cfg.checkpoint and os.path.exists(cfg.checkpoint) else None
    if ck is not None and ck.get("key") == cfg.resume_key:
        proj.linear.load_state_dict(ck["proj"])
        opt.load_state_dict(ck["opt"])
        sampler.restore(ck["sampler"])
        tracker.restore(ck["tracker"])
        start = int(ck["step"])
        for name, step, value in ck["log"]:
            emit(name, int(step), float(value))
    else:
        tracker.evaluate(0, [])
        if tracker.has_val:
            emit("val/loss", 0, tracker.res.initial_val_loss)
    since_eval: list[float] = []
    end = start if tracker.should_stop else cfg.max_steps  # a checkpoint saved when training stopped
    for step in range(start, end):
        proj.train()
        idx, caps = sampler.batch(cfg.batch_size)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = loss_fn(proj(features[idx].to(device, cfg.dtype)), caps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        since_eval.append(float(loss.detach()))
        done = step + 1
        emit("train/loss", done, since_eval[-1])
        if progress is not None:
            progress(step, since_eval[-1])
        tracker.res.steps_run = done
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            tracker.evaluate(done, since_eval)
            since_eval = []
            if tracker.has_val:
                emit("val/loss", done, tracker.res.history[-1]["val_loss"])
            if tracker.should_stop:
                tracker.res.stopped_early = done < cfg.max_steps
            if cfg.checkpoint:
                _save_checkpoint(cfg.checkpoint, {"key": cfg.resume_key, "step": done, "proj": proj.linear.state_dict(),
                                                  "opt": opt.state_dict(), "sampler": sampler.state(),
                                                  "tracker": tracker.state(), "log": list(logged)})
            if tracker.should_stop:
                break
    res = tracker.finish()
    res.projection = proj.cpu().float().eval()  # saved and used in float32 whatever cfg.dtype
    res.n_pairs = len(sampler.pairs)
    return res


def split_train_val(image_ids: Sequence[int], val_fraction: float, val_max: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded disjoint ``(fit_ids, val_ids)``, both sorted (:func:`mmn.data.split.seeded_split`;
    duplicate ids collapse).

    ``n_val = min(val_max, max(1, round(val_fraction * n)))`` when ``val_fraction > 0`` and
    at least 2 images exist, else 0; at least one image is always left to fit on.
    """
    ids = sorted({int(i) for i in image_ids})
    n_val = 0
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(val_max, max(1, round(val_fraction * len(ids))), len(ids) - 1)
    part = seeded_split(ids, n_val, seed)
    return part.train, part.eval


@torch.no_grad()
def iter_views(
    layout: CocoLayout, image_ids: Sequence[int], enc: PatchEncoder, views: int, seed: int,
) -> Iterator[tuple[int, Tensor]]:
    """``(image id, Float[Tensor, "views P d_enc"])`` per image, on CPU in the encoder's dtype: view 0
    the plain resize, the others seeded random resized crops with flips."""
    g = torch.Generator().manual_seed(seed)
    crop = v2.RandomResizedCrop(enc.image_size, scale=(0.5, 1.0), antialias=True)
    for image_id in tqdm(image_ids, desc="encode views", leave=False):
        img = layout.load_image(image_id)
        batch = [img]
        for _ in range(views - 1):
            # torchvision draws crop parameters from torch's global RNG: fork a seeded state
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
                v = crop(img)
                if torch.rand(1).item() < 0.5:
                    v = v2.functional.horizontal_flip(v)
            batch.append(v)
        yield image_id, enc.encode(batch).cpu()


def encode_views(
    layout: CocoLayout, image_ids: Sequence[int], enc: PatchEncoder, views: int, seed: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, list[int]]:
    """``Float[Tensor, "n_images*views P d_enc"]`` (on CPU, in ``dtype``) and the image id of every view, in memory."""
    feats, owner = [], []
    for image_id, f in iter_views(layout, image_ids, enc, views, seed):
        feats.append(f.to(dtype))
        owner += [image_id] * f.shape[0]
    return torch.cat(feats), owner


def tokenised_captions(layout: CocoLayout, tok, image_ids: Sequence[int]) -> dict[int, list[list[int]]]:
    """Reference captions of each image as token ids of :func:`caption_target_text`."""
    caps = {
        i: [tok(caption_target_text(c), add_special_tokens=False).input_ids for c in layout.captions[i]]
        for i in image_ids
    }
    empty = [i for i, c in caps.items() if not c]
    if empty:
        raise LayoutError(f"{layout.captions_path}: training images without captions: {empty[:10]}")
    return caps


def shuffled_captions(caps: Mapping[int, list[list[int]]], seed: int) -> dict[int, list[list[int]]]:
    """Label randomisation (a negative control): each image gets the captions of another image,
    a seeded derangement (a random cyclic order: no image keeps its own; needs >= 2 images)."""
    ids = sorted(caps)
    if len(ids) < 2:
        raise ValueError("shuffle_captions needs at least 2 training images")
    order = [ids[i] for i in np.random.default_rng([seed, 7]).permutation(len(ids))]
    return {a: caps[b] for a, b in zip(order, order[1:] + order[:1])}


TRAIN_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.float32}
"""Projection (and optimizer) dtype per ``projection.train.dtype``; bfloat16 = float32 weights with the LM
under bfloat16 autocast."""
FEATURE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


@contextmanager
def models_in_dtype(dtype: torch.dtype, *modules: torch.nn.Module) -> Iterator[None]:
    """Cast ``modules`` to ``dtype`` for the block, then back to their own dtypes.

    Gotcha: in place (no copy of the LM); float32 -> float64 -> float32 restores the weights
    bit for bit, so callers may keep using the models afterwards.
    """
    before = [next(m.parameters()).dtype for m in modules]
    try:
        for m in modules:
            m.to(dtype)
        yield
    finally:
        for m, d in zip(modules, before, strict=True):
            m.to(d)


def train_from_layout(
    layout: CocoLayout, adapter: LMAdapter, tok, enc: PatchEncoder, params: Params, cache_dir: Path | None = None,
    log: Callable[[str, int, float], None] | None = None,
) -> tuple[Projection, TrainResult, dict]:
    """Fit the projection on ``layout``'s images (minus the validation split); returns the best
    checkpoint, the training result (loss history) and the metadata for ``meta.json``.

    ``cache_dir``: the training views' features go to a store on disk there (flat memory, reused
    by a rerun) and the loop saves a resumable checkpoint there at every evaluation, deleted
    once training has finished; None = features in memory, no checkpoint. ``log``: the loss
    curves as they are computed (:class:`mmn.training_log.LiveLog`)."""
    tp = params.train_loop
    ids = [r["id"] for r in layout.images]
    if not ids:
        raise LayoutError(f"{layout.instances_path}: no training images")
    fit_ids, val_ids = split_train_val(ids, tp.val_fraction, tp.val_max_images, params.seed)
    dtype = TRAIN_DTYPES[tp.dtype]
    with models_in_dtype(dtype, adapter.model, enc) if dtype != torch.float32 else nullcontext():
        res, n_views = _train(layout, adapter, tok, enc, params, fit_ids, val_ids, dtype, cache_dir, log)
    meta = {
        "source": "trained",
        "n_train_images": len(fit_ids),
        "n_val_images": len(val_ids),
        "n_views": n_views,
        "n_pairs": res.n_pairs,
        "epochs": round(res.steps_run * tp.batch_size / res.n_pairs, 3),
        "max_steps": tp.max_steps,
        "steps_run": res.steps_run,
        "best_step": res.best_step,
        "stopped_early": res.stopped_early,
        "best_val_loss": None if res.best_val_loss is None else round(res.best_val_loss, 6),
        "initial_val_loss": None if res.initial_val_loss is None else round(res.initial_val_loss, 6),
        "batch_size": tp.batch_size,
        "lr": tp.lr,
        "seed": params.seed,
        "val_image_ids": val_ids,
    }
    if tp.shuffle_captions:  # absent = real pairs
        meta["shuffle_captions"] = True
    if tp.dtype != "float32":  # absent = float32, so projections trained before the option keep their bytes
        meta["train_dtype"] = tp.dtype
    return res.projection, res, meta


def training_key(layout: CocoLayout, features_key: str, params: Params, val_ids: list[int]) -> str:
    """What a resumable checkpoint's state depends on: the feature store, LM, prompt, validation
    ids, the caption texts per image and the loop's settings. Keyed on the captions' texts, not
    the captions file's bytes: the file also records where it was fetched from (a mirror's port
    changes from run to run), which must not throw away an hour of training."""
    tp = params.train_loop
    return store_key(features=features_key, lm=params.model.lm, prompt=params.caption.prompt, val=val_ids,
                     captions=sorted(layout.captions.items()),
                     loop=tp.model_dump(exclude={"data", "holdout", "subset", "split", "captions"}))


def _train(layout: CocoLayout, adapter: LMAdapter, tok, enc: PatchEncoder, params: Params, fit_ids: list[int],
           val_ids: list[int], dtype: torch.dtype, cache_dir: Path | None,
           log: Callable[[str, int, float], None] | None = None) -> tuple[TrainResult, int]:
    """Encode the views (encoder frozen; in memory, or in a store under ``cache_dir``) and run the
    loop; ``(result, n_views)``."""
    tp, m = params.train_loop, params.model
    feat_dtype = FEATURE_DTYPES[tp.feature_dtype] if tp.feature_dtype else dtype
    checkpoint, resume_key = None, ""
    if cache_dir is None:
        feats, owner = encode_views(layout, fit_ids, enc, tp.views, params.seed, feat_dtype)
    else:
        by_id = layout.image_by_id
        key = store_key(encoder=m.encoder, grid=m.encoder_grid, image_size=m.image_size, views=tp.views,
                        seed=params.seed, dtype=str(feat_dtype), encode_dtype=str(dtype),
                        images=[(i, file_sha256(layout.images_dir / by_id[i]["file_name"])) for i in fit_ids])
        feats = build_feature_store(Path(cache_dir) / "features", key,
                                    iter_views(layout, fit_ids, enc, tp.views, params.seed), feat_dtype)
        owner = feats.owner
        checkpoint = str(Path(cache_dir) / "checkpoint.pt")
        resume_key = training_key(layout, key, params, val_ids)
    caps = tokenised_captions(layout, tok, sorted([*fit_ids, *val_ids]))
    if tp.shuffle_captions:
        caps = shuffled_captions(caps, params.seed)
    val_feats, val_pairs = None, []
    if val_ids:
        val_feats, _ = encode_views(layout, val_ids, enc, 1, params.seed, dtype)
        val_pairs = [(row, c) for row, i in enumerate(val_ids) for c in caps[i]]
    plm = ImagePrefixLM(adapter, tok, torch.nn.Linear(1, 1), prompt=params.caption.prompt)
    bar = tqdm(total=tp.max_steps, desc="train projection", leave=False)

    autocast = (torch.autocast(device_type=adapter.device.type, dtype=torch.bfloat16) if tp.dtype == "bfloat16"
                else nullcontext())

    def loss_fn(soft: torch.Tensor, c: list[list[int]]) -> torch.Tensor:
        with autocast:
            return plm.caption_loss(soft.to(adapter.device, adapter.dtype), c)

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    cfg = TrainConfig(tp.max_steps, tp.batch_size, tp.lr, tp.warmup_steps, params.seed, tp.eval_every, tp.patience,
                      dtype, checkpoint, resume_key)
    res = train_projection(feats, owner, caps, adapter.d_model, loss_fn, cfg, val_feats, val_pairs, progress,
                           device=adapter.device, log=log)
    bar.close()
    if checkpoint:
        Path(checkpoint).unlink(missing_ok=True)  # finished: a forced rerun starts from scratch
    return res, int(feats.shape[0])


def training_lines(res: TrainResult, meta: dict) -> list[str]:
    """The load_projection stage's log lines for a training run; "WARNING" lines when there was no
    validation split or the validation loss never fell below the untrained projection's."""
    h = res.history
    lines = [f"trained projection on {meta['n_train_images']} images ({meta['n_views']} views), "
             f"{meta['n_val_images']} validation images; {res.steps_run} steps"
             f"{' (stopped early)' if res.stopped_early else ''}; train loss {h[0]['train_loss']:.3f} -> "
             f"{h[-1]['train_loss']:.3f}"]
    if res.best_val_loss is None:
        return lines + ["WARNING: no validation split (projection.train.val_fraction: 0 or one image): kept the "
                        "last step"]
    lines.append(f"validation loss {res.initial_val_loss:.3f} (untrained) -> best {res.best_val_loss:.3f} at step "
                 f"{res.best_step} (kept)")
    if res.best_step == 0:
        lines.append("WARNING: the validation loss never fell below the untrained projection's; the projection "
                     "carries no learned image information")
    return lines


def projection_metrics(meta: dict) -> dict:
    """Numbers-only summary for metrics/projection.json (null where not applicable)."""
    keys = ("n_train_images", "n_val_images", "steps_run", "best_step", "best_val_loss", "initial_val_loss")
    out = {k: meta.get(k) for k in keys}
    out["held_out"] = int(bool(meta.get("held_out")))
    return out
