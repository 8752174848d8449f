"""Per-unit scores from per-position attributions: THE "max over image positions of A·M".

Every method (:mod:`mmn.neurons.methods`) gives, at each image position p, an activation A
and a multiplier M (∂y^c/∂A for the paper's gradient × activation); the paper scores a
unit by g_k = max_p A_{p,k}·M_{p,k} (§3.1, Eq. 2). Attribution's top k, the ablation
ranking and the method comparison all score units with :func:`unit_scores`.
"""

from __future__ import annotations

from typing import Literal, overload

from torch import Tensor

Aggregate = Literal["max", "sum"]
AGGREGATES: tuple[str, ...] = ("max", "sum")


@overload
def unit_scores(a: Tensor, m: Tensor, aggregate: Aggregate = "max", *, patch: Literal[False] = False) -> Tensor: ...
@overload
def unit_scores(a: Tensor, m: Tensor, aggregate: Aggregate = "max", *, patch: Literal[True]) -> tuple[Tensor, Tensor]: ...
def unit_scores(a: Tensor, m: Tensor, aggregate: str = "max", *, patch: bool = False):  # str: a bad value raises ValueError below
    """Per-unit score of ``g = a · m`` over the image positions: ``[..., P, U] -> [..., U]``
    (positions are the second-to-last axis), in ``g``'s dtype.

    ``aggregate="max"``: max over positions (the paper's g_k); ``"sum"``: Σ_p a·m.
    ``patch=True`` also returns the first position of the largest ``g`` per unit
    (``Long[..., U]``): under ``max`` the score is ``g`` read there; under ``sum`` it is a
    label only (the score is not ``g`` at that position).
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    g = a * m
    if not patch:
        return g.sum(dim=-2) if aggregate == "sum" else g.amax(dim=-2)
    best = g.argmax(dim=-2, keepdim=True)  # first maximal position on ties
    score = g.sum(dim=-2) if aggregate == "sum" else g.gather(-2, best).squeeze(-2)
    return score, best.squeeze(-2)
