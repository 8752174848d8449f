"""Train the LiMBeR-style projection on a COCO-format layout (embedded profile).

Views: view 0 of each image is the plain resize, the others random resized crops
(scale 0.5–1) with horizontal flips, drawn from a seeded torch generator. Encoder
features of all views are computed once (the encoder is frozen).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.transforms import v2
from tqdm import tqdm

from mmn.data.layout import CocoLayout
from mmn.models.adapters import LMAdapter
from mmn.models.prefix_lm import ImagePrefixLM
from mmn.models.projection import TrainConfig, train_projection
from mmn.models.vision import PatchEncoder
from mmn.params import Params


def caption_target_text(caption: str) -> str:
    """COCO caption → continuation of ``A picture of``: leading space, first letter lowercased."""
    c = caption.strip()
    return " " + (c[:1].lower() + c[1:] if c else c)


@torch.no_grad()
def encode_views(layout: CocoLayout, enc: PatchEncoder, views: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """``Float[Tensor, "n_images*views P d_enc"]`` and the image index of every view."""
    g = torch.Generator().manual_seed(seed)
    crop = v2.RandomResizedCrop(enc.image_size, scale=(0.5, 1.0), antialias=True)
    feats, owner = [], []
    for idx, rec in enumerate(tqdm(layout.images, desc="encode views", leave=False)):
        img = layout.load_image(rec["id"])
        batch = [img]
        for _ in range(views - 1):
            # torchvision draws crop parameters from torch's global RNG: fork a seeded state
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
                v = crop(img)
                if torch.rand(1).item() < 0.5:
                    v = v2.functional.horizontal_flip(v)
            batch.append(v)
        feats.append(enc.encode(batch).cpu())
        owner += [idx] * len(batch)
    return torch.cat(feats), owner


def train_from_layout(
    layout: CocoLayout, adapter: LMAdapter, tok, enc: PatchEncoder, params: Params
) -> tuple[nn.Linear, list[float], dict]:
    tp = params.projection.train
    feats, owner = encode_views(layout, enc, tp.views, params.seed)
    caps = {
        i: [tok(caption_target_text(c), add_special_tokens=False).input_ids for c in layout.captions[rec["id"]]]
        for i, rec in enumerate(layout.images)
    }
    empty = [layout.images[i]["id"] for i, c in caps.items() if not c]
    if empty:
        raise ValueError(f"{layout.captions_path}: images without captions: {empty[:10]}")
    plm = ImagePrefixLM(adapter, tok, nn.Linear(1, 1), prompt=params.caption.prompt)
    bar = tqdm(total=tp.steps, desc="train projection", leave=False)

    def loss_fn(soft: torch.Tensor, c: list[list[int]]) -> torch.Tensor:
        return plm.caption_loss(soft.to(adapter.device, adapter.dtype), c)

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    cfg = TrainConfig(tp.steps, tp.batch_size, tp.lr, tp.warmup_steps, params.seed)
    lin, losses = train_projection(feats, owner, caps, adapter.d_model, loss_fn, cfg, progress)
    bar.close()
    meta = {
        "source": "trained",
        "n_images": len(layout.images),
        "n_views": int(feats.shape[0]),
        "steps": tp.steps,
        "batch_size": tp.batch_size,
        "lr": tp.lr,
        "seed": params.seed,
        "final_loss": round(losses[-1], 6),
    }
    return lin, losses, meta
