"""Process-level numeric set-up that CPU bit-reproducibility depends on.

Gotcha (MKL VML first-call race, pytorch/pytorch#188792): ATen sends contiguous float
``cos``/``sin``/``exp``/``erf``/... to MKL VML, one chunk per OpenMP thread, and MKL picks
each VML function's kernel lazily on its first call. When that first call runs on several
threads at once, one thread can run its whole chunk with the low-accuracy (EP) kernel.
Here it hit the rotary embedding's first ``cos`` in a few percent of fresh processes:
thread 0's half of ``cos`` computed with VML's EP kernel reproduces, bit for bit, the
alternative logits those processes gave (a logit 2e-4 off; ``p_target`` 4e-4 relative
off in one CI forced rerun). Only the first call is affected, so calling every
VML-routed op once on a one-element tensor (one chunk, one thread) before any real work
removes it. Idempotent and cheap (well under a millisecond after the first time).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

# ATen's VML-routed unary ops (aten/src/ATen/cpu/vml.h, IMPLEMENT_VML_MKL), float and double;
# ops a torch build routes elsewhere are harmless to call
_VML_OPS = (torch.acos, torch.asin, torch.atan, torch.cos, torch.erf, torch.erfc, torch.erfinv, torch.exp,
            torch.expm1, torch.log, torch.log10, torch.log1p, torch.log2, torch.sin, torch.sqrt, torch.tan,
            torch.tanh, torch.trunc, torch.abs)
_done = False


def warm_up_vml() -> None:
    """Resolve MKL VML's lazy kernel dispatch on one thread, once per process (see module doc)."""
    global _done
    if _done:
        return
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for op in _VML_OPS:
            op(x)
    _done = True


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; make CPU kernels deterministic (incl. MKL VML's first call)."""
    warm_up_vml()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
