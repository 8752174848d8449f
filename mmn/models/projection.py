"""The linear image→LM projection: load LiMBeR's ``proj.ckpt`` or train one LiMBeR-style.

Gotchas:
* LiMBeR checkpoints are state dicts of ``nn.Linear(1024, 4096)`` (keys ``weight``,
  ``bias``, possibly under one prefix); they are loaded with ``weights_only=True``.
* LiMBeR applies dropout after the projection while training; we run in eval mode.
* Training standardises encoder features per channel; the standardisation is folded
  into the saved Linear, so the saved projection takes raw encoder features.
"""

from __future__ import annotations

import json
import math
import pickle
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


class ProjectionError(ValueError):
    """A projection checkpoint that cannot be used; the message names the file."""


def load_limber(path: Path | str, d_in: int, d_out: int) -> nn.Linear:
    """Load a LiMBeR projection state dict into ``nn.Linear(d_in, d_out)``."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise ProjectionError(
            f"{path}: not a loadable state dict with weights_only=True ({type(err).__name__}: {str(err)[:200]})"
        ) from None
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ProjectionError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    weights = [k for k in obj if k == "weight" or k.endswith(".weight")]
    biases = [k for k in obj if k == "bias" or k.endswith(".bias")]
    if len(weights) != 1 or len(biases) > 1 or len(obj) != len(weights) + len(biases):
        raise ProjectionError(f"{path}: expected one Linear's 'weight' (+ 'bias'), found keys {sorted(obj)}")
    w = obj[weights[0]]
    if tuple(w.shape) != (d_out, d_in):
        raise ProjectionError(
            f"{path}: weight has shape {tuple(w.shape)}, expected ({d_out}, {d_in}) "
            f"= Linear({d_in} encoder dims -> {d_out} LM dims)"
        )
    lin = nn.Linear(d_in, d_out, bias=bool(biases))
    with torch.no_grad():
        lin.weight.copy_(w.float())
        if biases:
            b = obj[biases[0]]
            if tuple(b.shape) != (d_out,):
                raise ProjectionError(f"{path}: bias has shape {tuple(b.shape)}, expected ({d_out},)")
            lin.bias.copy_(b.float())
    return lin.eval()


def save_projection(out_dir: Path, lin: nn.Linear, meta: dict) -> None:
    """Write ``projection.safetensors`` + ``meta.json`` into ``out_dir`` (caller handles atomicity)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": lin.weight.detach().cpu().contiguous()}
    if lin.bias is not None:
        tensors["bias"] = lin.bias.detach().cpu().contiguous()
    save_file(tensors, str(out_dir / "projection.safetensors"))
    meta = {**meta, "d_in": lin.in_features, "d_out": lin.out_features}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_projection(out_dir: Path) -> tuple[nn.Linear, dict]:
    """Read what :func:`save_projection` wrote."""
    meta = json.loads((Path(out_dir) / "meta.json").read_text())
    t = load_file(str(Path(out_dir) / "projection.safetensors"))
    lin = nn.Linear(meta["d_in"], meta["d_out"], bias="bias" in t)
    with torch.no_grad():
        lin.weight.copy_(t["weight"])
        if "bias" in t:
            lin.bias.copy_(t["bias"])
    return lin.eval(), meta


@dataclass
class TrainConfig:
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    seed: int


def fold_standardisation(lin: nn.Linear, mean: Tensor, std: Tensor) -> nn.Linear:
    """Return Linear' with Linear'(x) == lin((x - mean) / std)."""
    out = nn.Linear(lin.in_features, lin.out_features, bias=True)
    with torch.no_grad():
        w = lin.weight / std[None, :]
        out.weight.copy_(w)
        b = lin.bias if lin.bias is not None else torch.zeros(lin.out_features)
        out.bias.copy_(b - w @ mean)
    return out.eval()


def train_projection(
    features: Tensor,
    view_image: list[int],
    captions: Mapping[int, list[list[int]]],
    d_model: int,
    loss_fn: Callable[[Tensor, list[list[int]]], Tensor],
    cfg: TrainConfig,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[nn.Linear, list[float]]:
    """Train ``Linear(d_enc, d_model)`` with a frozen encoder and LM (LiMBeR-style).

    ``features``: ``Float[Tensor, "views P d_enc"]`` precomputed encoder outputs of
    augmented views; ``view_image[i]`` = image index of view i; ``captions[img]`` =
    tokenised reference captions. ``loss_fn(soft_tokens, caption_ids)`` returns the
    mean caption cross-entropy after the prompt. Deterministic for a given seed.
    Returns the projection (standardisation folded in) and the loss per step.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    flat = features.reshape(-1, features.shape[-1]).float()
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
    torch.manual_seed(cfg.seed)
    lin = nn.Linear(features.shape[-1], d_model)
    opt = torch.optim.Adam(lin.parameters(), lr=cfg.lr)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))

    losses: list[float] = []
    n = features.shape[0]
    for step in range(cfg.steps):
        idx = torch.randint(0, n, (cfg.batch_size,), generator=g).tolist()
        caps = [rng.choice(captions[view_image[i]]) for i in idx]
        x = (features[idx].float() - mean) / std
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = loss_fn(lin(x), caps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
    return fold_standardisation(lin.eval(), mean, std), losses
