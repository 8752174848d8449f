"""The linear image→LM projection: load LiMBeR's ``proj.ckpt`` or train one LiMBeR-style.

Gotchas:
* LiMBeR checkpoints are state dicts of ``nn.Linear(1024, 4096)`` (keys ``weight``,
  ``bias``, possibly under one prefix); they are loaded with ``weights_only=True``.
* LiMBeR applies dropout after the projection while training; we run in eval mode.
* Training standardises encoder features per channel (mean/std of the training views).
  :class:`Projection` stores that mean/std next to the Linear and applies
  ``linear((x - mean) / std)`` in training and at inference alike; a LiMBeR checkpoint
  gets mean 0 / std 1, which is exactly the identity in floating point.
* :func:`train_projection` keeps the checkpoint of the lowest validation loss (evaluated
  every ``eval_every`` steps, and once before the first step) and stops after ``patience``
  evaluations without a lower one.
"""

from __future__ import annotations

import json
import math
import pickle
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
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

    def __init__(self, d_in: int, d_out: int, mean: Tensor | None = None, std: Tensor | None = None,
                 bias: bool = True) -> None:
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
    def from_linear(cls, lin: nn.Linear, mean: Tensor | None = None, std: Tensor | None = None) -> Projection:
        """Wrap an existing Linear (its parameters are copied)."""
        out = cls(lin.in_features, lin.out_features, mean, std, bias=lin.bias is not None)
        out.linear.load_state_dict(lin.state_dict())
        return out.to(lin.weight.device)

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    @property
    def bias(self) -> Tensor | None:
        return self.linear.bias

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def standardise(self, features: Tensor) -> Tensor:
        """``(features - mean) / std`` in the features' dtype and device."""
        m = self.feature_mean.to(features.device, features.dtype)
        s = self.feature_std.to(features.device, features.dtype)
        return (features - m) / s

    def forward(self, features: Tensor) -> Tensor:
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


def feature_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std (``[d]`` each, std clamped to >= 1e-6) of ``Float[Tensor, "... d"]``."""
    flat = features.reshape(-1, features.shape[-1]).float()
    return flat.mean(0), flat.std(0).clamp_min(1e-6)


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
            x = features[[i for i, _ in chunk]].to(proj.weight.device).float()
            total += float(loss_fn(proj(x), [c for _, c in chunk])) * len(chunk)
    return total / len(pairs)


def train_projection(
    features: Tensor,
    view_image: list[int],
    captions: Mapping[int, list[list[int]]],
    d_model: int,
    loss_fn: Callable[[Tensor, list[list[int]]], Tensor],
    cfg: TrainConfig,
    val_features: Tensor | None = None,
    val_pairs: Sequence[tuple[int, list[int]]] = (),
    progress: Callable[[int, float], None] | None = None,
    device: torch.device | str | None = None,
) -> TrainResult:
    """Train a :class:`Projection` ``d_enc → d_model`` with a frozen encoder and LM (LiMBeR-style).

    ``features``: ``Float[Tensor, "views P d_enc"]`` precomputed encoder outputs of the
    training views; ``view_image[i]`` = image of view i; ``captions[img]`` = tokenised
    reference captions. Each step draws ``batch_size`` views and one of their captions
    (seeded). ``loss_fn(soft_tokens, caption_ids)`` is the mean caption cross-entropy after the
    prompt. The features are standardised with their own per-channel mean/std, stored in the
    projection. With ``val_pairs`` (rows of ``val_features`` ``[n_val, P, d_enc]`` with one
    caption each) the validation loss is evaluated before the first step, every
    ``eval_every`` steps and after the last; the checkpoint of its minimum is returned and
    training stops after ``patience`` evaluations without a new minimum. Without validation
    it trains ``max_steps`` and returns the last step. Deterministic for a given seed.
    The features stay where they are (e.g. CPU memory); each batch and the projection live on
    ``device`` (default: the features' device). The returned projection is on the CPU.
    """
    device = torch.device(device) if device is not None else features.device
    g = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    mean, std = feature_stats(features)
    torch.manual_seed(cfg.seed)
    proj = Projection(features.shape[-1], d_model, mean, std).to(device)
    opt = torch.optim.Adam(proj.linear.parameters(), lr=cfg.lr)
    has_val = val_features is not None and len(val_pairs) > 0
    stopper = EarlyStopping(cfg.patience)
    res = TrainResult(projection=proj)
    best_state = {k: v.clone() for k, v in proj.linear.state_dict().items()}

    def evaluate(step: int, train_losses: list[float]) -> None:
        nonlocal best_state
        row = {"step": step, "train_loss": sum(train_losses) / len(train_losses) if train_losses else None,
               "val_loss": None}
        if has_val:
            row["val_loss"] = validation_loss(proj.eval(), val_features, val_pairs, loss_fn, cfg.batch_size)
            if stopper.update(step, row["val_loss"]):
                best_state = {k: v.clone() for k, v in proj.linear.state_dict().items()}
        if step > 0:
            res.history.append(row)
        elif has_val:
            res.initial_val_loss = row["val_loss"]

    evaluate(0, [])
    n = features.shape[0]
    since_eval: list[float] = []
    for step in range(cfg.max_steps):
        proj.train()
        idx = torch.randint(0, n, (cfg.batch_size,), generator=g).tolist()
        caps = [rng.choice(captions[view_image[i]]) for i in idx]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = loss_fn(proj(features[idx].to(device).float()), caps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        since_eval.append(float(loss.detach()))
        if progress is not None:
            progress(step, since_eval[-1])
        done = step + 1
        res.steps_run = done
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            evaluate(done, since_eval)
            since_eval = []
            if has_val and stopper.should_stop:
                res.stopped_early = done < cfg.max_steps
                break
    if has_val:
        proj.linear.load_state_dict(best_state)
        res.best_step, res.best_val_loss = int(stopper.best_step), stopper.best
    else:
        res.best_step = res.steps_run
    res.projection = proj.cpu().eval()
    return res
