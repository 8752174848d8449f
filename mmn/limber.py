"""LiMBeR's published projection (the paper profile): fetched once from its URL into a local
cache and loaded into ``nn.Linear`` (:func:`mmn.models.projection.load_limber`). Only the
load_projection stage imports this module (it alone needs the downloader)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from torch import nn

from mmn.models.projection import load_limber


#: where LiMBeR checkpoints from a URL are cached, and how they are fetched
LIMBER_CACHE = Path(".cache/limber")
CKPT_RETRIES = 3
CKPT_TIMEOUT_S = 120.0


def fetch_checkpoint(url: str, cache: Path = LIMBER_CACHE) -> Path:
    """Download a checkpoint URL once into ``cache/<12 hex of sha1(url)>/<file name>`` (paper
    profile; needs internet) through :func:`mmn.download.download`: resumed from its ``.part``
    after an interruption, retried with backoff. No sha1 is checked (params name none); the
    caller records the file's sha256."""
    from mmn.download import download

    dest = Path(cache) / hashlib.sha1(url.encode()).hexdigest()[:12] / Path(url).name
    return download(url, dest, retries=CKPT_RETRIES, timeout=CKPT_TIMEOUT_S, what="LiMBeR checkpoint",
                    show_bar=True)


def limber_projection(src: str, d_enc: int, d_model: int) -> tuple[nn.Linear, dict]:
    """LiMBeR's projection from a local ``proj.ckpt`` or a URL (fetched once into the cache), and
    its meta (source, sha256, held_out: LiMBeR trained on CC3M, disjoint from COCO)."""
    path = Path(src) if Path(src).exists() else fetch_checkpoint(src)
    lin = load_limber(path, d_enc, d_model)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return lin, {"source": "limber", "checkpoint": str(src), "sha256": digest, "held_out": True,
                 "train_data": "CC3M (LiMBeR)"}
