"""CLIPScore (Hessel et al. 2021) on open_clip: ``100 · w · max(cos(E_img, E_txt), 0)``, default w = 1.

Scale. Hessel et al. define CLIP-S = w · max(cos, 0) with w = 2.5 and report it ×100
(``HESSEL_W``; a score then lies in [0, 250]). The paper's tables (GPT captions 23.62, COCO
nouns 27.89, random 19.22) are on a different scale: with CLIP ViT-B/32 a matching caption has
cos ≈ 0.25–0.33, so those numbers are ``100 · max(cos, 0)``, i.e. w = 1 — torchmetrics'
``CLIPScore`` convention. The default here is that scale (``PAPER_W = 1``); pass
``w=HESSEL_W`` for Hessel's. Scores at different ``w`` differ by the constant factor only;
always state ``w`` next to a CLIPScore.

Gotchas:

* No text prefix by default (Hessel et al. prepend "A photo depicts"; torchmetrics and,
  it appears, the paper do not). Set ``text_prefix`` to change it.
* Texts longer than the model's context (77 tokens for OpenAI CLIP) are truncated by the
  open_clip tokenizer.
* :meth:`ClipScorer.from_params` never falls back to random weights and downloads only
  with ``allow_download=True``: without a cached ``pretrained`` tag or a local
  ``checkpoint`` it raises :class:`ClipUnavailable` with the reason, so the caller can
  report plainly that CLIPScore was not computed.
* The tag's settings are applied even when its weights come from a file: OpenAI CLIP
  needs QuickGELU, which open_clip's plain ``ViT-B-32`` config lacks (open_clip only warns).
  OpenAI's original ``.pt`` files are TorchScript archives; they are loaded with
  ``weights_only=False`` (open_clip's own state-dict files keep ``weights_only=True``).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from jaxtyping import Float
from torch import Tensor

from mmn.errors import ModelError

HESSEL_W = 2.5  # Hessel et al. 2021
PAPER_W = 1.0   # the paper's tables: 100 * cos


def scale_description(w: float) -> str:
    """How a CLIPScore at weight ``w`` reads, for tables and report pages."""
    which = ("the paper's scale" if w == PAPER_W else "Hessel et al.'s scale; the paper's is w = 1"
             if w == HESSEL_W else "the paper's scale is w = 1")
    return f"CLIPScore = 100 * w * max(cos, 0) with w = {w:g} ({which}); range 0..{100 * w:g}"


class ClipUnavailable(ModelError):
    """CLIP weights (or the model/tokenizer) cannot be obtained offline; the message says why."""


def _hf_cached_file(model_id: str, filename: str | None, cache_dir: str | None) -> str | None:
    """A file of an HF Hub repo if it is already in the local cache (no network access)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    filename = filename or HF_WEIGHTS_NAME
    names = [filename]
    if filename == HF_WEIGHTS_NAME:
        names.insert(0, HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        names.insert(0, filename[:-4] + ".safetensors")
    for name in names:
        hit = try_to_load_from_cache(repo_id=model_id, filename=name, cache_dir=cache_dir)
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def cached_pretrained(model: str, tag: str, cache_dir: str | None = None) -> str | None:
    """Local path of open_clip's ``model``/``tag`` weights if already cached, else None.

    Looks where open_clip's own download would put them (HF Hub cache, or
    ``cache_dir``/``~/.cache/clip`` for URL downloads) without touching the network.
    Raises :class:`ClipUnavailable` when the tag is unknown for ``model``.
    """
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        raise ClipUnavailable(
            f"open_clip has no pretrained tag {tag!r} for {model!r}; known tags: "
            f"{open_clip.list_pretrained_tags_by_model(model)}"
        )
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    if cfg.get("hf_hub"):
        model_id, filename = os.path.split(cfg["hf_hub"])
        hit = _hf_cached_file(model_id, filename or None, cache_dir)
        if hit:
            return hit
    if cfg.get("url"):
        target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        if target.is_file():
            return str(target)
    return None


def _is_torchscript(path: str) -> bool:
    """True for a TorchScript zip archive (OpenAI's original CLIP ``.pt`` files)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


class ClipScorer:
    """CLIP image/text embeddings and CLIPScore. Build with :meth:`from_params` or :meth:`from_model`."""

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], Tensor],
        tokenizer: Callable[[list[str]], Tensor],
        *,
        device: str | torch.device = "cpu",
        w: float = PAPER_W,
        text_prefix: str = "",
        batch_size: int = 64,
        description: str = "custom",
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.w = float(w)
        self.text_prefix = text_prefix
        self.batch_size = int(batch_size)
        self.description = description

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], Tensor],
        tokenizer: Callable[[list[str]], Tensor],
        **kwargs: Any,
    ) -> ClipScorer:
        """Wrap an already built open_clip-style model (``encode_image``/``encode_text``)."""
        device = kwargs.pop("device", None)
        if device is None:
            device = next(model.parameters()).device
        return cls(model, preprocess, tokenizer, device=device, **kwargs)

    @classmethod
    def from_params(
        cls,
        model: str,
        pretrained: str | None,
        checkpoint: str | os.PathLike | None,
        device: str | torch.device = "cpu",
        *,
        cache_dir: str | None = None,
        allow_download: bool = False,
        w: float = PAPER_W,
        text_prefix: str = "",
        batch_size: int = 64,
    ) -> ClipScorer:
        """open_clip ``model`` (e.g. ``ViT-B-32``) with weights from a local ``checkpoint``
        file, else from the cached ``pretrained`` tag (e.g. ``openai``), else — only with
        ``allow_download=True`` — downloaded by open_clip into ``cache_dir``.

        With both, the checkpoint supplies the weights and the tag only its settings
        (QuickGELU, image mean/std, resize). Raises :class:`ClipUnavailable` with the reason
        when there are no weights to load.
        """
        import open_clip

        model = model.replace("/", "-")  # "ViT-B/32" (OpenAI spelling) → "ViT-B-32"
        if model not in open_clip.list_models():
            raise ClipUnavailable(f"open_clip has no model config {model!r}")
        tag_cfg: dict = {}
        if pretrained:
            tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
            if not tag_cfg and checkpoint is None:
                raise ClipUnavailable(
                    f"open_clip has no pretrained tag {pretrained!r} for {model!r}; known tags: "
                    f"{open_clip.list_pretrained_tags_by_model(model)}"
                )
        if checkpoint is not None:
            path = Path(checkpoint)
            if not path.is_file():
                raise ClipUnavailable(f"CLIP checkpoint {path} does not exist")
            weights = str(path)
            source = f"{model} from {path}"
        elif pretrained:
            weights = cached_pretrained(model, pretrained, cache_dir)
            if weights is None and allow_download:
                weights = pretrained  # a tag: open_clip downloads it
            elif weights is None:
                raise ClipUnavailable(
                    f"open_clip {model}/{pretrained} weights need internet; none cached "
                    f"(looked in the HF Hub cache and {cache_dir or '~/.cache/clip'}); "
                    "pass a local checkpoint file, or allow_download=True where there is internet"
                )
            source = f"{model}/{pretrained} from {'download' if weights == pretrained else weights}"
        else:
            raise ClipUnavailable(f"no CLIP weights for {model}: neither a pretrained tag nor a checkpoint given")

        try:
            net, _, preprocess = open_clip.create_model_and_transforms(
                model,
                pretrained=weights,
                device=device,
                force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
                image_mean=tag_cfg.get("mean"),
                image_std=tag_cfg.get("std"),
                image_interpolation=tag_cfg.get("interpolation"),
                image_resize_mode=tag_cfg.get("resize_mode"),
                pretrained_image=False,
                pretrained_text=False,
                cache_dir=cache_dir,
                weights_only=not (os.path.isfile(weights) and _is_torchscript(weights)),
            )
            tokenizer = open_clip.get_tokenizer(model, cache_dir=cache_dir)
        except (OSError, RuntimeError, ValueError) as e:  # e.g. an HF tokenizer that is not cached
            raise ClipUnavailable(f"could not build open_clip {source}: {e}") from e
        return cls(net, preprocess, tokenizer, device=device, w=w, text_prefix=text_prefix,
                   batch_size=batch_size, description=source)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> Float[Tensor, "n d_emb"]:
        """L2-normalised image embeddings (float32, on CPU)."""
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.stack([self.preprocess(im.convert("RGB")) for im in images[i:i + self.batch_size]])
            out.append(self.model.encode_image(x.to(self.device)).float().cpu())
        if not out:
            return torch.zeros(0, self.embed_dim)
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> Float[Tensor, "n d_emb"]:
        """L2-normalised text embeddings (float32, on CPU)."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            toks = self.tokenizer([self.text_prefix + t for t in texts[i:i + self.batch_size]])
            out.append(self.model.encode_text(toks.to(self.device)).float().cpu())
        if not out:
            return torch.zeros(0, self.embed_dim)
        return F.normalize(torch.cat(out), dim=-1)

    @property
    def embed_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, Tensor):
            return int(proj.shape[-1])
        return int(getattr(self.model, "embed_dim", 0) or 0)

    def pair_scores(self, img_emb: Float[Tensor, "n d_emb"], txt_emb: Float[Tensor, "n d_emb"]) -> np.ndarray:
        """``[n]`` CLIPScores of aligned pairs (row i with row i): the diagonal of
        :meth:`score_matrix` in O(n) memory (Table 2 has ~200 prompts per image)."""
        cos = (F.normalize(img_emb.float(), dim=-1) * F.normalize(txt_emb.float(), dim=-1)).sum(-1)
        return (100.0 * self.w * cos.clamp(min=0)).numpy().astype(np.float64)

    def score_matrix(self, img_emb: Float[Tensor, "n_img d_emb"], txt_emb: Float[Tensor, "n_txt d_emb"]) -> np.ndarray:
        """``[n_img, n_txt]`` CLIPScores ``100 · w · max(cos, 0)`` of every image-text pair.

        Inputs are re-normalised, so raw (unnormalised) embeddings work too.
        """
        cos = F.normalize(img_emb.float(), dim=-1) @ F.normalize(txt_emb.float(), dim=-1).T
        return (100.0 * self.w * cos.clamp(min=0)).numpy().astype(np.float64)

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """CLIPScore of ``images[i]`` with ``texts[i]`` for each i: shape ``[n]``."""
        if len(images) != len(texts):
            raise ValueError(f"score needs aligned pairs: {len(images)} images vs {len(texts)} texts")
        cos = (self.image_embeddings(images) * self.text_embeddings(texts)).sum(-1)
        return (100.0 * self.w * cos.clamp(min=0)).numpy().astype(np.float64)
