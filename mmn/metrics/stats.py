"""Statistics for the score tables: KS test, confidence intervals, the random-embedding
baseline and nearest-token decoding of soft prompts (the paper's Table 2 / Fig. 3).

Gotchas:

* :func:`random_like_embeddings` matches each dimension's mean and std independently
  (a diagonal Gaussian); correlations between dimensions and the norm distribution of
  the real rows are not matched. Pass only the real-vocabulary rows (GPT-J pads its
  embedding matrix beyond the tokenizer).
* :func:`nearest_tokens` ranks by cosine, not dot product, so a row of ``emb`` is its
  own nearest token unless another row points the same way (duplicate rows tie).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
from torch import Tensor


def ks_2samp(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Two-sample Kolmogorov–Smirnov test (two-sided, scipy's default method): ``{"D", "p"}``."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError(f"ks_2samp needs two non-empty samples, got sizes {a.size} and {b.size}")
    r = scipy.stats.ks_2samp(a, b)
    return {"D": float(r.statistic), "p": float(r.pvalue)}


def mean_ci(
    x: Sequence[float] | np.ndarray,
    level: float = 0.95,
    method: str = "normal",
    n_boot: int = 10_000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean with a two-sided ``level`` CI: ``{"mean", "lo", "hi", "n"}``.

    ``method="normal"``: mean ± z·s/√n (s with ddof=1). ``method="bootstrap"``: percentile
    bootstrap of the mean with ``n_boot`` resamples from ``numpy.random.default_rng(seed)``.
    With one value the interval is (nan, nan); NaNs in ``x`` are an error.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("mean_ci of an empty sample")
    if not np.isfinite(x).all():
        raise ValueError("mean_ci got non-finite values")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    m, n = float(x.mean()), int(x.size)
    if n < 2:
        return {"mean": m, "lo": float("nan"), "hi": float("nan"), "n": n}
    alpha = 1.0 - level
    if method == "normal":
        half = float(scipy.stats.norm.ppf(1 - alpha / 2) * x.std(ddof=1) / np.sqrt(n))
        lo, hi = m - half, m + half
    elif method == "bootstrap":
        rng = np.random.default_rng(seed)
        means = np.concatenate([x[rng.integers(0, n, size=(min(1000, n_boot - i), n))].mean(axis=1)
                                for i in range(0, n_boot, 1000)])
        lo, hi = (float(v) for v in np.quantile(means, [alpha / 2, 1 - alpha / 2]))
    else:
        raise ValueError(f"method must be 'normal' or 'bootstrap', got {method!r}")
    return {"mean": m, "lo": float(lo), "hi": float(hi), "n": n}


def random_like_embeddings(emb: Tensor, n: int, seed: int) -> Tensor:
    """``Float[Tensor, "n d"]`` Gaussian vectors with ``emb``'s per-dimension mean and std.

    ``emb`` is ``[vocab, d]``; the result has its dtype and device. Sampled in float32 on
    CPU with ``torch.Generator().manual_seed(seed)``, so it is reproducible across devices.
    """
    if emb.ndim != 2:
        raise ValueError(f"emb must be [vocab, d], got shape {tuple(emb.shape)}")
    e = emb.detach().float().cpu()
    mean, std = e.mean(0), e.std(0)
    g = torch.Generator().manual_seed(int(seed))
    z = torch.randn(int(n), e.shape[1], generator=g)
    return (z * std + mean).to(dtype=emb.dtype, device=emb.device)


@torch.no_grad()
def nearest_tokens(vectors: Tensor, emb: Tensor, k: int = 5, batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """The ``k`` rows of ``emb`` [vocab, d] with the highest cosine to each of ``vectors`` [n, d].

    Returns ``(ids Long[Tensor, "n k"], cos Float[Tensor, "n k"])``, best first, on ``emb``'s
    device; computed in float32 in chunks of ``batch_size`` vectors.
    """
    if vectors.ndim != 2 or emb.ndim != 2 or vectors.shape[1] != emb.shape[1]:
        raise ValueError(f"need vectors [n, d] and emb [vocab, d], got {tuple(vectors.shape)} and {tuple(emb.shape)}")
    if not 1 <= k <= emb.shape[0]:
        raise ValueError(f"k must be in 1..{emb.shape[0]}, got {k}")
    e = F.normalize(emb.float(), dim=-1)
    ids, coss = [], []
    for i in range(0, vectors.shape[0], batch_size):
        v = F.normalize(vectors[i:i + batch_size].to(e.device).float(), dim=-1)
        c, j = torch.topk(v @ e.T, k, dim=1)
        ids.append(j)
        coss.append(c)
    if not ids:
        return torch.zeros(0, k, dtype=torch.long, device=e.device), torch.zeros(0, k, device=e.device)
    return torch.cat(ids), torch.cat(coss)
