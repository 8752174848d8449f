"""Params reads checked against the stage declarations (:mod:`mmn.stage_specs`).

While a stage runs (:mod:`mmn.runner` makes it the active stage) :func:`mmn.params.load_params`
returns a :class:`ParamsView` that raises :class:`~mmn.errors.ParamsError` on any read of a key
the stage did not declare. So ``dvc status`` reruns a stage when, and only when, a key it reads
changed. ``params.model.<key>`` and the derived properties (``train_data``, ``train_loop``,
``coco_eval``, ``coco_train``) read keys of the active profile.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from mmn.errors import ParamsError
from mmn.stage_specs import ACTIVE_PROFILE, PROPERTY_READS, STAGE_PARAMS

__all__ = ["ACTIVE_PROFILE", "STAGE_PARAMS", "ParamsView", "covered", "set_active_stage", "reset_active_stage",
           "view_for_active_stage"]

_active: ContextVar[str | None] = ContextVar("mmn_active_stage", default=None)


def set_active_stage(stage: str | None) -> object:
    """Make ``stage`` the one whose reads :func:`mmn.params.load_params` checks; returns a reset token."""
    if stage is not None and stage not in STAGE_PARAMS:
        raise KeyError(f"stage {stage!r} has no entry in mmn.stage_specs.STAGES")
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
        if not covered(key, STAGE_PARAMS[self._stage]):
            raise ParamsError(f"stage {self._stage} reads params key {key!r}, which it does not declare; add it "
                              f"to its StageSpec in mmn/stage_specs.py and to the stage's params in dvc.yaml")
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
        if self._prefix == "" and name in PROPERTY_READS:
            for k in PROPERTY_READS[name]:
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
