"""Which ``params.yaml`` keys each stage reads: one table, checked at run time and by the tests.

:data:`STAGE_PARAMS` is the single declaration. ``dvc.yaml`` must list exactly these keys
under each stage's ``params:`` (``tests/test_dvc_deps.py``), and while a stage runs
(:func:`mmn.cli.stage_main` sets it active) :func:`mmn.params.load_params` returns a
:class:`ParamsView` that raises :class:`~mmn.params.ParamsError` on any read of a key the
stage did not declare. So ``dvc status`` reruns a stage when, and only when, a key it
reads changed.

``profiles.${profile}.<key>`` is DVC templating (``params.yaml`` is loaded as vars): the stage
depends on the keys it reads of the *active* profile only, so editing another profile (say
``profiles.paper``) leaves the embedded pipeline up to date, and editing ``bert_layers`` reruns
only the stages that score with BERTScore. ``params.model.<key>`` and the derived properties
(``train_data``, ``train_loop``, ``coco_eval``, ``coco_train``) read them. DVC fails on a
declared key that is missing, so every profile in ``params.yaml`` spells out every key
(``null`` where unused; ``tests/test_dvc_deps.py``).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

ACTIVE_PROFILE = "profiles.${profile}"


def _profile(*keys: str) -> tuple[str, ...]:
    """``profile`` (which entry is active) and the given keys of the active profile."""
    return ("profile", *(f"{ACTIVE_PROFILE}.{k}" for k in keys))


# What each group of code reads from the active profile (so e.g. editing bert_layers reruns only
# the stages that score with BERTScore, and iou_categories only iou and plot).
_LM = ("lm", "lm_revision", "device", "dtype")  # mmn.pipeline.build_lm
_LM_CPU_FP32 = ("lm", "lm_revision")  # build_lm(dtype="float32", device="cpu"): no device/dtype read
_ENCODER = ("encoder", "encoder_grid", "image_size")  # mmn.pipeline.build_encoder (+ device)
_PREFIX_LM = (*_LM, *_ENCODER)  # mmn.pipeline.build_prefix_lm
_BERT = ("bert_model", "bert_layers")
_CLIP = ("clip_pretrained", "clip_checkpoint")
_TRAIN_OVERRIDES = ("train_max_steps", "train_batch_size", "train_views", "train_dtype")
_TRAIN_LOOP = tuple(f"projection.train.{k}" for k in (
    "max_steps", "batch_size", "lr", "views", "warmup_steps", "val_fraction", "val_max_images", "eval_every",
    "patience", "dtype"))

#: stage -> the params keys it reads (a key covers everything under it).
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "download_coco": (*_profile("data_source", "eval_subset", "train_data"), "seed", "data.coco",
                      "data.on_bad_image", "projection.train.data", "projection.train.holdout"),
    "download_train": (*_profile("data_source", "eval_subset", "train_data", "train_subset", "projection"), "seed",
                       "data.coco", "data.on_bad_image", "projection.train.data", "projection.train.holdout",
                       "projection.train.subset", "projection.train.split"),
    "load_projection": (*_profile(*_LM, *_ENCODER, "projection", "limber_url", *_TRAIN_OVERRIDES), "seed",
                        *_TRAIN_LOOP, "caption.prompt"),
    "caption": (*_profile(*_PREFIX_LM, *_BERT), "seed", "caption"),
    "attribute": (*_profile(*_PREFIX_LM), "seed", "caption.prompt", "attribute"),
    "decode": (*_profile(*_LM_CPU_FP32), "seed", "decode"),
    "filter": ("seed", "attribute.rank_by", "decode", "filter"),
    "score": (*_profile(*_PREFIX_LM, *_BERT, "bert_rescale", *_CLIP), "seed", "caption.prompt", "score"),
    "iou": (*_profile(*_PREFIX_LM, "iou_categories"), "seed", "caption.prompt", "iou"),
    "ablate": (*_profile(*_PREFIX_LM, *_BERT), "seed", "caption.prompt", "caption.max_new_tokens",
               "caption.stop_at_newline", "decode", "filter", "attribute.layers", "ablate"),
    "compare_methods": (*_profile(*_PREFIX_LM), "seed", "caption.prompt", "attribute.ig_steps", "attribute.layers",
                        "ablate.ks", "compare"),
    "plot": (*_profile(*_PREFIX_LM, "projection", "iou_categories", "bert_model"), "seed", "caption.prompt", "plot"),
}

#: ``Params`` properties -> the keys they read.
_PROPERTY_READS: dict[str, tuple[str, ...]] = {
    "train_data": (*_profile("train_data"), "projection.train.data"),
    "train_loop": (*_profile(*_TRAIN_OVERRIDES), *_TRAIN_LOOP),
    "coco_eval": (*_profile("eval_subset"), "data.coco"),
    "coco_train": (*_profile("train_subset"), "data.coco", "projection.train.split", "projection.train.subset"),
}

_active: ContextVar[str | None] = ContextVar("mmn_active_stage", default=None)


def set_active_stage(stage: str | None) -> object:
    """Make ``stage`` the one whose reads :func:`mmn.params.load_params` checks; returns a reset token."""
    if stage is not None and stage not in STAGE_PARAMS:
        raise KeyError(f"stage {stage!r} has no entry in mmn.stage_params.STAGE_PARAMS")
    return _active.set(stage)


def reset_active_stage(token: object) -> None:
    _active.reset(token)  # type: ignore[arg-type]


def covered(key: str, declared: tuple[str, ...] | list[str]) -> bool:
    """Whether reading ``key`` is allowed by ``declared`` (a key covers the keys under it)."""
    return any(key == d or key.startswith(d + ".") for d in declared)


class ParamsView:
    """Read-only view of a params object that checks (and records) every key read.

    Attribute reads return nested views for sections and plain values for leaves; a leaf
    read whose dotted key is not covered by the stage's declaration raises ``ParamsError``.
    """

    __slots__ = ("_obj", "_prefix", "_stage", "_reads")

    def __init__(self, obj: Any, stage: str, prefix: str = "", reads: set[str] | None = None) -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_reads", set() if reads is None else reads)

    def _check(self, key: str) -> None:
        from mmn.params import ParamsError

        if not covered(key, STAGE_PARAMS[self._stage]):
            raise ParamsError(f"stage {self._stage} reads params key {key!r}, which it does not declare; add it "
                              f"to mmn/stage_params.py STAGE_PARAMS and to the stage's params in dvc.yaml")
        self._reads.add(key)

    def __getattr__(self, name: str) -> Any:
        from pydantic import BaseModel

        obj = self._obj
        if name.startswith(("_", "model_")):
            self._check(self._prefix or "<all>")
            return getattr(obj, name)
        if self._prefix == "" and name == "model":
            self._check("profile")  # which profile; each of its keys is checked when read
            return ParamsView(obj.model, self._stage, ACTIVE_PROFILE, self._reads)
        if self._prefix == "" and name in _PROPERTY_READS:
            for k in _PROPERTY_READS[name]:
                self._check(k)
            return getattr(obj, name)
        key = f"{self._prefix}.{name}" if self._prefix else name
        value = getattr(obj, name)
        if isinstance(value, BaseModel):
            return ParamsView(value, self._stage, key, self._reads)
        self._check(key)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("params are read-only")

    def __repr__(self) -> str:
        return f"ParamsView({self._stage}: {self._prefix or '<root>'})"

    @property
    def reads(self) -> frozenset[str]:
        """The keys read so far through this view (and its nested views)."""
        return frozenset(self._reads)


def view_for_active_stage(params: Any) -> Any:
    """``params`` itself outside a stage; a checking :class:`ParamsView` while a stage runs."""
    stage = _active.get()
    return params if stage is None else ParamsView(params, stage)
