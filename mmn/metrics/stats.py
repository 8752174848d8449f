"""Statistics: KS test, bootstrap CIs over images, paired tests over images, the random-embedding
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
from jaxtyping import Float, Int
from torch import Tensor


def ks_2samp(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Two-sample Kolmogorov–Smirnov test (two-sided, scipy's default method): ``{"D", "p"}``."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError(f"ks_2samp needs two non-empty samples, got sizes {a.size} and {b.size}")
    r = scipy.stats.ks_2samp(a, b)
    return {"D": float(r.statistic), "p": float(r.pvalue)}


def bootstrap_ci(
    x: Sequence[float] | np.ndarray,
    level: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
) -> dict[str, float]:
    """Mean over images with a two-sided ``level`` bootstrap CI: ``{"mean", "lo", "hi", "n"}``.

    ``x`` holds ONE value per image (never per-item values that share an image: those are
    pseudo-replicates). ``scipy.stats.bootstrap`` with the percentile method and
    ``numpy.random.default_rng(seed)``, so reruns are identical. With fewer than 2 values, or
    when every value is the same (no spread to resample), ``lo``/``hi`` are NaN-free: the
    interval collapses to the mean for a constant sample and is ``None`` for n < 2 (JSON null).
    Non-finite values are an error (name what produced them upstream).
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("bootstrap_ci of an empty sample")
    if not np.isfinite(x).all():
        raise ValueError(f"bootstrap_ci got {int((~np.isfinite(x)).sum())} non-finite values")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    m, n = float(x.mean()), int(x.size)
    if n < 2:
        return {"mean": m, "lo": None, "hi": None, "n": n}
    if np.all(x == x[0]):
        return {"mean": m, "lo": m, "hi": m, "n": n}
    r = scipy.stats.bootstrap((x,), np.mean, confidence_level=level, n_resamples=n_resamples,
                              method="percentile", vectorized=True,
                              rng=np.random.default_rng(seed))
    return {"mean": m, "lo": float(r.confidence_interval.low),
            "hi": float(r.confidence_interval.high), "n": n}


def bootstrap_statistic(
    samples: Sequence[np.ndarray],
    statistic,
    level: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
) -> dict[str, float]:
    """Any statistic of per-image samples with a percentile bootstrap CI over images:
    ``{"value", "lo", "hi", "n"}``. ``samples``: equal-length arrays, one value per image each,
    resampled together (``paired``); ``statistic(*samples, axis=-1)`` is vectorised, e.g. a
    median or a ratio of sums. ``lo``/``hi`` are None for n < 2, as in :func:`bootstrap_ci`."""
    xs = [np.asarray(x, dtype=np.float64).ravel() for x in samples]
    n = int(xs[0].size)
    if n == 0 or any(x.size != n for x in xs):
        raise ValueError(f"bootstrap_statistic needs equal-length non-empty samples, got {[x.size for x in xs]}")
    if not all(np.isfinite(x).all() for x in xs):
        raise ValueError("bootstrap_statistic got non-finite values")
    value = float(statistic(*xs, axis=-1))
    if n < 2:
        return {"value": value, "lo": None, "hi": None, "n": n}
    r = scipy.stats.bootstrap(tuple(xs), statistic, confidence_level=level, n_resamples=n_resamples,
                              method="percentile", vectorized=True, paired=True, rng=np.random.default_rng(seed))
    lo, hi = float(r.confidence_interval.low), float(r.confidence_interval.high)
    if not (np.isfinite(lo) and np.isfinite(hi)):  # a constant statistic: scipy gives NaN
        lo = hi = value
    return {"value": value, "lo": lo, "hi": hi, "n": n}


PAIRED_RESAMPLES = 9999  # paired_test's sign flips; its Monte Carlo p cannot go below MC_FLOOR
MC_FLOOR = 2 / (PAIRED_RESAMPLES + 1)  # two-sided: 2 x (0 + 1) / (R + 1) = 0.0002


def at_mc_floor(p: float | None, n_resamples: int = PAIRED_RESAMPLES) -> bool:
    """Whether ``p`` is the Monte Carlo floor 2/(R+1) of :func:`paired_test` (no flip reached the
    observed difference: the true p is at most this, not equal to it). An exact test (2**n <= R)
    never gives it: its smallest p is 2/2**n > 2/(R+1)."""
    return p is not None and abs(p - 2 / (n_resamples + 1)) < 1e-12


def format_p(p: float | None, n_resamples: int = PAIRED_RESAMPLES) -> str:
    """A p-value as printed: ``p ≤ 0.0002`` at the Monte Carlo floor, else ``p = 0.031`` (2 digits)."""
    if p is None:
        return "p = n/a"
    return f"p ≤ {2 / (n_resamples + 1):.2g}" if at_mc_floor(p, n_resamples) else f"p = {p:.2g}"


def paired_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    level: float = 0.95,
    n_resamples: int = PAIRED_RESAMPLES,
    seed: int = 0,
) -> dict[str, float]:
    """Paired comparison of two per-image samples (``a[i]`` and ``b[i]`` from the same image).

    Returns ``{"diff", "lo", "hi", "p", "n"}``: the mean of ``a - b`` with its bootstrap CI
    (:func:`bootstrap_ci`) and the two-sided p-value of a paired sign-flip permutation test
    of the mean difference (``scipy.stats.permutation_test``, ``permutation_type="samples"``;
    exact when 2**n <= n_resamples). ``p`` is None for n < 2; all-zero differences give p = 1.
    Gotcha: a Monte Carlo p never goes below 2/(n_resamples + 1); print it with
    :func:`format_p` ("p ≤ 0.0002"), never as an exact value.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_test needs samples of equal length, got {a.size} and {b.size}")
    d = a - b
    ci = bootstrap_ci(d, level=level, n_resamples=n_resamples, seed=seed)
    out = {"diff": ci["mean"], "lo": ci["lo"], "hi": ci["hi"], "p": None, "n": ci["n"]}
    if d.size < 2:
        return out
    if np.all(d == 0):
        out["p"] = 1.0
        return out
    r = scipy.stats.permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis),
                                     permutation_type="samples", vectorized=True,
                                     n_resamples=n_resamples, alternative="two-sided",
                                     rng=np.random.default_rng(seed))
    out["p"] = float(r.pvalue)
    return out


def random_like_embeddings(emb: Float[Tensor, "vocab d_model"], n: int, seed: int) -> Float[Tensor, "n d_model"]:
    """``n`` Gaussian vectors with ``emb``'s per-dimension mean and std.

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


# ``_d_model``: documented, not checked by jaxtyping: a mismatch is this function's own ValueError
@torch.no_grad()
def nearest_tokens(vectors: Float[Tensor, "n _d_model"], emb: Float[Tensor, "vocab _d_model"], k: int = 5,
                   batch_size: int = 1024) -> tuple[Int[Tensor, "n k"], Float[Tensor, "n k"]]:
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
