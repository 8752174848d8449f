"""The linear image→LM projection: load LiMBeR's ``proj.ckpt`` or train one LiMBeR-style.

Gotchas:
* LiMBeR checkpoints are state dicts of ``nn.Linear(1024, 4096)`` (keys ``weight``,
  ``bias``, possibly under one prefix); they are loaded with ``weights_only=True``.
* LiMBeR applies dropout after the projection while training; we run in eval mode.
* Training standardises encoder features per channel (mean/std of the training views).
  :class:`Projection` stores that mean/std next to the Linear and applies
  ``linear((x - mean) / std)`` in training and at inference alike; a LiMBeR checkpoint
  gets mean 0 / std 1, which is exactly the identity in floating point.
* Training lives in :mod:`mmn.projection_training`.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from jaxtyping import Float
from torch import Tensor, nn

from mmn.errors import ModelError


class ProjectionError(ModelError, ValueError):
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


class Projection(nn.Module):
    """The image→LM map: ``soft = linear((features - mean) / std)``.

    ``Float[Tensor, "... d_in"]`` → ``Float[Tensor, "... d_out"]``. ``feature_mean`` /
    ``feature_std`` (``[d_in]`` buffers) are the per-channel statistics of the training
    features; every soft token of the pipeline goes through :meth:`forward`
    (via :meth:`mmn.models.prefix_lm.ImagePrefixLM.soft_tokens`).
    """

    def __init__(self, d_in: int, d_out: int, mean: Float[Tensor, "d_in"] | None = None,
                 std: Float[Tensor, "d_in"] | None = None, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=bias)
        mean = torch.zeros(d_in) if mean is None else mean.detach().float().cpu().clone()
        std = torch.ones(d_in) if std is None else std.detach().float().cpu().clone()
        if mean.shape != (d_in,) or std.shape != (d_in,):
            raise ValueError(f"mean/std must have shape ({d_in},), got {tuple(mean.shape)} and {tuple(std.shape)}")
        if not bool((std > 0).all()):
            raise ValueError("feature std must be > 0 in every channel")
        self.register_buffer("feature_mean", mean)
        self.register_buffer("feature_std", std)

    @classmethod
    def from_linear(cls, lin: nn.Linear, mean: Float[Tensor, "d_in"] | None = None,
                    std: Float[Tensor, "d_in"] | None = None) -> Projection:
        """Wrap an existing Linear (its parameters are copied)."""
        out = cls(lin.in_features, lin.out_features, mean, std, bias=lin.bias is not None)
        out.linear.load_state_dict(lin.state_dict())
        return out.to(lin.weight.device)

    @property
    def weight(self) -> Float[Tensor, "d_out d_in"]:
        return self.linear.weight

    @property
    def bias(self) -> Float[Tensor, "d_out"] | None:
        return self.linear.bias

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def standardise(self, features: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_in"]:
        """``(features - mean) / std`` in the features' dtype and device."""
        m = self.feature_mean.to(features.device, features.dtype)
        s = self.feature_std.to(features.device, features.dtype)
        return (features - m) / s

    def forward(self, features: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
        return self.linear(self.standardise(features))


def save_projection(out_dir: Path, proj: Projection | nn.Linear, meta: dict) -> None:
    """Write ``projection.safetensors`` (weight, bias, feature_mean, feature_std) + ``meta.json``
    into ``out_dir`` (caller handles atomicity)."""
    if isinstance(proj, nn.Linear):
        proj = Projection.from_linear(proj)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": proj.weight.detach().cpu().contiguous(),
               "feature_mean": proj.feature_mean.detach().cpu().contiguous(),
               "feature_std": proj.feature_std.detach().cpu().contiguous()}
    if proj.bias is not None:
        tensors["bias"] = proj.bias.detach().cpu().contiguous()
    save_file(tensors, str(out_dir / "projection.safetensors"))
    meta = {**meta, "d_in": proj.in_features, "d_out": proj.out_features}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_projection(out_dir: Path) -> tuple[Projection, dict]:
    """Read what :func:`save_projection` wrote (files without mean/std: mean 0, std 1)."""
    out_dir = Path(out_dir)
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
        t = load_file(str(out_dir / "projection.safetensors"))
    except (OSError, json.JSONDecodeError) as err:
        raise ProjectionError(f"{out_dir}: cannot read the projection ({type(err).__name__}: {err}); "
                              "rerun load_projection") from None
    proj = Projection(meta["d_in"], meta["d_out"], t.get("feature_mean"), t.get("feature_std"), bias="bias" in t)
    with torch.no_grad():
        proj.linear.weight.copy_(t["weight"])
        if "bias" in t:
            proj.linear.bias.copy_(t["bias"])
    return proj.eval(), meta

