"""Train the LiMBeR-style projection on a COCO-format training layout (``projection: train``).

The training images (``data/coco_train``) are split, seeded, into the images the
projection is fitted on and a validation split (``projection.train.val_fraction``,
at most ``val_max_images``). Views: view 0 of each training image is the plain resize,
the others random resized crops (scale 0.5–1) with horizontal flips, drawn from a
seeded torch generator; validation images use only their plain resize, scored with
every reference caption. Encoder features are computed once (the encoder is frozen)
and kept in memory.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torchvision.transforms import v2
from tqdm import tqdm

from mmn.data.layout import CocoLayout, LayoutError
from mmn.models.adapters import LMAdapter
from mmn.models.prefix_lm import ImagePrefixLM
from mmn.models.projection import Projection, TrainConfig, TrainResult, train_projection
from mmn.models.vision import PatchEncoder
from mmn.params import Params

LOSS_COLUMNS = ("step", "train_loss", "val_loss")


def caption_target_text(caption: str) -> str:
    """COCO caption → continuation of ``A picture of``: leading space, first letter lowercased."""
    c = caption.strip()
    return " " + (c[:1].lower() + c[1:] if c else c)


def split_train_val(image_ids: Sequence[int], val_fraction: float, val_max: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded disjoint ``(fit_ids, val_ids)``, both sorted.

    ``n_val = min(val_max, max(1, round(val_fraction * n)))`` when ``val_fraction > 0`` and
    at least 2 images exist, else 0; at least one image is always left to fit on.
    """
    ids = sorted(int(i) for i in image_ids)
    n_val = 0
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(val_max, max(1, round(val_fraction * len(ids))), len(ids) - 1)
    val = sorted(random.Random(seed).sample(ids, n_val))
    vs = set(val)
    return [i for i in ids if i not in vs], val


@torch.no_grad()
def encode_views(
    layout: CocoLayout, image_ids: Sequence[int], enc: PatchEncoder, views: int, seed: int
) -> tuple[torch.Tensor, list[int]]:
    """``Float[Tensor, "n_images*views P d_enc"]`` (on CPU) and the image id of every view."""
    g = torch.Generator().manual_seed(seed)
    crop = v2.RandomResizedCrop(enc.image_size, scale=(0.5, 1.0), antialias=True)
    feats, owner = [], []
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
        feats.append(enc.encode(batch).float().cpu())
        owner += [image_id] * len(batch)
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


def train_from_layout(
    layout: CocoLayout, adapter: LMAdapter, tok, enc: PatchEncoder, params: Params
) -> tuple[Projection, TrainResult, dict]:
    """Fit the projection on ``layout``'s images (minus the validation split); returns the best
    checkpoint, the training result (loss history) and the metadata for ``meta.json``."""
    tp = params.train_loop
    ids = [r["id"] for r in layout.images]
    if not ids:
        raise LayoutError(f"{layout.instances_path}: no training images")
    fit_ids, val_ids = split_train_val(ids, tp.val_fraction, tp.val_max_images, params.seed)
    feats, owner = encode_views(layout, fit_ids, enc, tp.views, params.seed)
    caps = tokenised_captions(layout, tok, ids)
    val_feats, val_pairs = None, []
    if val_ids:
        val_feats, _ = encode_views(layout, val_ids, enc, 1, params.seed)
        val_pairs = [(row, c) for row, i in enumerate(val_ids) for c in caps[i]]
    plm = ImagePrefixLM(adapter, tok, torch.nn.Linear(1, 1), prompt=params.caption.prompt)
    bar = tqdm(total=tp.max_steps, desc="train projection", leave=False)

    def loss_fn(soft: torch.Tensor, c: list[list[int]]) -> torch.Tensor:
        return plm.caption_loss(soft.to(adapter.device, adapter.dtype), c)

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    cfg = TrainConfig(tp.max_steps, tp.batch_size, tp.lr, tp.warmup_steps, params.seed, tp.eval_every, tp.patience)
    res = train_projection(feats, owner, caps, adapter.d_model, loss_fn, cfg, val_feats, val_pairs, progress,
                           device=adapter.device)
    bar.close()
    meta = {
        "source": "trained",
        "n_train_images": len(fit_ids),
        "n_val_images": len(val_ids),
        "n_views": int(feats.shape[0]),
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
    return res.projection, res, meta


def loss_csv(history: Sequence[dict]) -> str:
    """``step,train_loss,val_loss`` rows (one per evaluation; val_loss empty without validation)."""
    def fmt(v: float | None) -> str:
        return "" if v is None else f"{v:.6f}"

    return ",".join(LOSS_COLUMNS) + "\n" + "".join(
        f"{r['step']},{fmt(r['train_loss'])},{fmt(r['val_loss'])}\n" for r in history
    )
