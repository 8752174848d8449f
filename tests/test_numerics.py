"""mmn.numerics.warm_up_vml: every VML-routed op once, one element (one chunk, one thread),
float32 and float64, once per process; and the two entry points every process passes call it."""

from __future__ import annotations

import torch

import mmn.numerics as numerics
from conftest import tiny_lm
from mmn.models.lm import prepare_lm
from mmn.numerics import seed_everything


def _record(monkeypatch) -> list[tuple[str, int, torch.dtype]]:
    calls = []
    ops = []
    for op in numerics._VML_OPS:
        def rec(x, _op=op):
            calls.append((_op.__name__, x.numel(), x.dtype))
            return _op(x)
        rec.__name__ = op.__name__
        ops.append(rec)
    monkeypatch.setattr(numerics, "_VML_OPS", tuple(ops))
    monkeypatch.setattr(numerics, "_done", False)
    return calls


def test_warm_up_calls_each_op_on_one_element_in_both_dtypes_once(monkeypatch):
    calls = _record(monkeypatch)
    numerics.warm_up_vml()
    numerics.warm_up_vml()  # idempotent: the second call does nothing
    names = {n for n, _, _ in calls}
    # the ops our models hit: RoPE cos/sin, GELU erf/tanh, softmax-free exp/log/sqrt paths
    assert {"cos", "sin", "exp", "erf", "tanh", "log", "sqrt"} <= names
    assert all(numel == 1 for _, numel, _ in calls)  # one element: one chunk, so one thread
    assert sorted(calls, key=str) == sorted([(n, 1, d) for n in names for d in (torch.float32, torch.float64)],
                                            key=str)


def test_stages_and_lm_loading_warm_up(monkeypatch, tokenizer):
    calls = _record(monkeypatch)
    seed_everything(0)  # every stage calls it first
    assert len(calls) == 2 * len(numerics._VML_OPS)
    calls.clear()
    monkeypatch.setattr(numerics, "_done", False)
    prepare_lm(tiny_lm("llama", len(tokenizer)), tokenizer)  # every LM load (benchmarks, library use)
    assert len(calls) == 2 * len(numerics._VML_OPS)
