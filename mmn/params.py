"""Typed view of ``params.yaml``.

Every stage loads its settings through :func:`load_params`. Unknown keys, wrong types
and out-of-range values raise :class:`ParamsError` naming the offending key path
(e.g. ``caption.batch_size``). The ``profile`` knob picks one entry of ``profiles``
(``embedded`` by default, ``paper`` for the GPU setup of the paper);
:meth:`Params.model` returns the resolved model settings.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mmn.errors import ParamsError  # re-exported: mmn.params.ParamsError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


Device = Literal["auto", "cpu", "cuda"]
TrainData = Literal["coco-train", "split", "eval", "captions"]
DType = Literal["float32", "bfloat16", "float16"]
TrainDType = Literal["float32", "float64", "bfloat16"]


class ModelProfile(_Strict):
    """Which models a profile uses. ``embedded:`` names refer to files inside PyPI packages."""

    data_source: Literal["sample", "coco"]
    lm: str = Field(min_length=1, description="'embedded:smollm2-135m' or a HF causal-LM id/path")
    lm_revision: str | None = None
    encoder: str = Field(
        min_length=1,
        description="'embedded:efficientnet-lite0', 'hf:<id or path>' (BEiT/ViT) or 'timm:<name>'",
    )
    encoder_grid: int = Field(gt=0, le=64, description="side of the square patch grid fed to the LM")
    image_size: int = Field(gt=0, le=1024)
    projection: Literal["train", "limber"]
    limber_url: str | None = None
    device: Device = "auto"
    dtype: DType = "float32"
    iou_categories: list[str] = Field(min_length=1, description="COCO categories for Fig. 5 / selectivity")
    clip_pretrained: str | None = Field(default=None, description="open_clip tag; null = CLIPScore not computed")
    clip_checkpoint: str | None = Field(default=None, description="local open_clip checkpoint file")
    bert_model: str = Field(min_length=1, description="BERTScore model ('embedded:all-MiniLM-L6-v2' or HF id)")
    bert_layers: int | None = Field(default=None, gt=0, description="null = bert_score's default for the model")
    bert_rescale: bool = Field(default=False, description="BERTScore baseline rescaling with bert_score's own "
                               "baseline file for bert_model/bert_layers (the paper's scale); none exists for "
                               "embedded models")
    # Per-profile data sizes (null = the global key), so that `-S profile=laptop` is the one switch.
    train_data: TrainData | None = Field(default=None, description="overrides projection.train.data")
    train_subset: int | None = Field(default=None, ge=0, description="overrides projection.train.subset")
    eval_subset: int | None = Field(default=None, ge=0, description="overrides data.coco.subset")
    train_max_steps: int | None = Field(default=None, ge=1, description="overrides projection.train.max_steps")
    train_batch_size: int | None = Field(default=None, ge=1, description="overrides projection.train.batch_size")
    train_views: int | None = Field(default=None, ge=1, description="overrides projection.train.views")
    train_dtype: TrainDType | None = Field(default=None, description="overrides projection.train.dtype")

    @model_validator(mode="after")
    def _rescale_needs_a_baseline(self) -> ModelProfile:
        if self.bert_rescale and self.bert_model.startswith("embedded:"):
            raise ValueError(f"bert_rescale: true needs a bert_score baseline file, and none exists for "
                             f"{self.bert_model}; set bert_rescale: false (raw F1) or a bert_score model")
        return self

    @field_validator("iou_categories")
    @classmethod
    def _coco_names(cls, v: list[str]) -> list[str]:
        unknown = [c for c in v if c not in coco_category_names()]
        if unknown:
            raise ValueError(f"not COCO category names: {unknown} (e.g. 'person', 'dog', 'teddy bear')")
        return v


@lru_cache(maxsize=1)
def coco_category_names() -> frozenset[str]:
    """The 80 COCO category names (from the categories block the project ships)."""
    import json
    from importlib.resources import files

    cats = json.loads(files("mmn.data").joinpath("sample_annotations.json").read_text())["categories"]
    return frozenset(c["name"] for c in cats)


class CocoParams(_Strict):
    base_url: str = Field(min_length=1)
    split: Literal["val2017", "train2017"] = "val2017"
    annotations_archive: str = "annotations/annotations_trainval2017.zip"
    annotations_sha1: str | None = Field(
        default=None, description="sha1 of the annotations archive; null skips the check"
    )
    subset: int = Field(ge=0, description="number of images to fetch (seeded); 0 = all")
    timeout_s: float = Field(gt=0)
    retries: int = Field(ge=0)


class DataParams(_Strict):
    coco: CocoParams
    on_bad_image: Literal["fail", "skip"] = Field(
        default="fail",
        description="an image that cannot be fetched or decoded: fail download_coco, or leave it out and "
        "record it in data/coco/skipped.csv",
    )


class CaptionSourceParams(_Strict):
    """``projection.train.captions``: an image-caption set (mmn.data.captions_source) for ``data: captions``."""

    path: str | None = Field(default=None, description="captions CSV (image,caption), COCO captions JSON, or "
                             "webdataset shards (one .tar, a folder of them, or a {000..009} range); path or URL")
    images: str | None = Field(default=None, description="csv/coco: image folder, .zip/.tar archive or base URL")
    format: Literal["auto", "csv", "coco", "webdataset"] = "auto"
    sha256: str | list[str] | None = Field(
        default=None, description="sha256 of the captions file (csv, coco) or one per shard (webdataset); "
        "null = not checked (the stage logs the actual one)")
    subset: int = Field(default=0, ge=0, description="seeded subset of the images; 0 = all")


class TrainParams(_Strict):
    max_steps: int = Field(gt=0, description="optimizer steps at most (cosine decay reaches 0 here)")
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0, description="peak learning rate (after warmup; cosine decay to 0 at max_steps)")
    views: int = Field(gt=0, description="views per training image: the plain resize + views-1 random crops")
    warmup_steps: int = Field(ge=0)
    dtype: TrainDType = Field(
        default="float32", description="precision of training (LM, encoder, features, projection); float64 "
        "makes the trained projection insensitive to float-kernel noise (thread count, CPU) at ~2x the time; "
        "the saved projection is float32 either way")
    feature_dtype: Literal["float16", "float32", "float64"] | None = Field(
        default=None, description="dtype of the cached encoder features of the training views (on disk under the "
        "stage's cache); null = the training dtype (float32 under bfloat16); float16 halves disk and reads")
    val_fraction: float = Field(
        default=0.2, ge=0, lt=1, description="training images held out for the validation loss; 0 = none "
        "(train max_steps, keep the last step)")
    val_max_images: int = Field(default=64, gt=0, description="cap on the validation images")
    eval_every: int = Field(default=10, gt=0, description="steps between validation-loss evaluations")
    patience: int = Field(
        default=5, ge=0, description="stop after this many evaluations without a lower validation loss; 0 = never")
    # Which images the projection learns from (stage download_train, data/coco_train/).
    data: TrainData = Field(
        default="eval",
        description="coco-train: a seeded subset of COCO `split` (train2017); captions: the image-caption set "
        "of `captions` (never an evaluated image: compared by content); split: a seeded disjoint "
        "train/eval split of the source's images; eval: the evaluated images themselves (not held out)",
    )
    holdout: float = Field(default=0.2, gt=0, lt=1, description="evaluated fraction of the images under `split`")
    subset: int = Field(default=3000, ge=0, description="COCO train images fetched under `coco-train`; 0 = all")
    split: Literal["train2017", "val2017"] = Field(default="train2017", description="COCO split of `coco-train`")
    captions: CaptionSourceParams = Field(default_factory=CaptionSourceParams)
    shuffle_captions: bool = Field(
        default=False, description="negative control: train on shuffled image-caption pairs (each image "
        "gets another training image's captions, a seeded derangement); the caption check must then fail")


class ProjectionParams(_Strict):
    train: TrainParams


class CaptionParams(_Strict):
    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(gt=0, le=256)
    batch_size: int = Field(gt=0)
    stop_at_newline: bool = True


class AttributeParams(_Strict):
    k: int = Field(gt=0, description="top units (rank_by=unit) or (layer, unit, patch) triples kept per image")
    rank_by: Literal["unit", "triple"] = Field(
        default="unit", description="unit: the paper's 'the 100 u_k with highest g', a unit scored by its max "
        "over image positions of g (k distinct units); triple: top (layer, unit, patch) triples")
    aggregate: Literal["max", "sum"] = Field(
        default="max", description="rank_by=unit: a unit's score over the image positions: max (the paper's g_k) "
        "or sum (sum_p A*M, the first-order estimate of zeroing it at every image position); attribute and ablate "
        "rank by it")
    preactivation: bool = False
    method: Literal["grad_x_act", "direct_logit", "integrated_gradients"] = Field(
        default="grad_x_act", description="grad_x_act: the paper's g = A dy/dA; direct_logit: A (W_U[c] W_out^k) "
        "(MM_Neurons); integrated_gradients: A times the path-averaged gradient from 0 to A, one layer at a time")
    ig_steps: int = Field(default=16, gt=0, le=1024, description="integrated gradients: path points "
                          "(midpoint rule), the rows of one forward + backward per image")
    batch_size: int = Field(gt=0)
    dtype: DType | None = Field(default=None, description="null = the profile's dtype")
    device: Device | None = Field(default=None, description="null = the profile's device")
    layers: list[int] | None = Field(
        default=None, description="LM layers whose units are attributed and ablated; null = all"
    )

    @field_validator("layers")
    @classmethod
    def _layer_list(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("layers must be null (all layers) or a non-empty list")
        bad = [x for x in v if x < 0]
        if bad:
            raise ValueError(f"layers must be >= 0, got {bad}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _preactivation_method(self) -> "AttributeParams":
        if self.preactivation and self.method != "grad_x_act":
            raise ValueError(f"preactivation is defined for method grad_x_act only, not {self.method!r}")
        if self.aggregate == "sum" and self.rank_by == "triple":
            raise ValueError("aggregate: sum scores whole units (over the image positions); rank_by: triple ranks "
                             "(layer, unit, patch) triples: use aggregate: max with rank_by: triple")
        return self


class CompareParams(_Strict):
    """Stage compare_methods: every attribution method against exact single-unit ablation."""

    candidates: int = Field(default=32, gt=0, description="top units per method; their union is ablated one by one")
    precision_k: int = Field(default=10, gt=0, description="k of precision@k (exact top k by dy recovered)")
    sample: int = Field(default=32, ge=0, description="units per image drawn uniformly from the attributed layers, "
                                                      "ablated one by one: the correlations' unselected set")
    batch_size: int = Field(default=32, gt=0, description="rows (ablations or IG path points) per forward")
    max_images: int | None = Field(default=50, gt=0, description="first n images with a target, by id; null = all")

    @model_validator(mode="after")
    def _k_within_candidates(self) -> "CompareParams":
        if self.precision_k > self.candidates:
            raise ValueError(f"precision_k ({self.precision_k}) cannot exceed candidates ({self.candidates})")
        return self


class DecodeParams(_Strict):
    top_n: int = Field(gt=0, le=1000)
    lens: Literal["unembed", "logit_lens"] = Field(
        default="unembed", description="unembed: the paper's decoder(W_out^k), unembedding x raw column (no "
        "final norm, no lm_head bias); logit_lens: final norm, unembedding and lm_head bias")


class FilterParams(_Strict):
    min_words: int = Field(ge=0)
    top_n: int = Field(gt=0)
    min_letters: int = Field(gt=0)

    @model_validator(mode="after")
    def _words_fit(self) -> "FilterParams":
        if self.min_words > self.top_n:
            raise ValueError(f"min_words ({self.min_words}) cannot exceed top_n ({self.top_n})")
        return self


class ScoreParams(_Strict):
    clip_model: str = Field(min_length=1, description="open_clip architecture, e.g. ViT-B-32")
    clip_w: float = Field(gt=0, description="CLIPScore weight w in 100*w*max(cos,0); 1 = the paper's scale, "
                          "2.5 = Hessel et al.'s")
    random_draws: int = Field(gt=0)
    prompt_neighbours: int = Field(gt=0, description="nearest vocabulary tokens per soft token (Table 2)")
    batch_size: int = Field(gt=0)


class IouParams(_Strict):
    quantile: float = Field(gt=0, lt=1)
    mask_size: int = Field(gt=0)
    top_units: int | None = Field(default=None, gt=0,
                                  description="null = all of an image's top units; n = its first n by rank")
    random_draws: int = Field(gt=0)
    selectivity_units: int = Field(gt=0)
    single: Literal["only_object", "one_instance"] = Field(
        default="only_object", description="only_object: the image's only annotation is one object of the "
                                           "category; one_instance: one instance of it, other objects allowed")
    threshold: Literal["image", "dataset"] = Field(
        default="image", description="image: per-image quantile of the map; dataset: NetDissect per-unit "
                                     "quantile over all evaluated images")


class AblateParams(_Strict):
    ks: list[int] = Field(min_length=1)
    mode: Literal["zero", "mean"] = "zero"
    regenerate: bool = True

    @field_validator("ks")
    @classmethod
    def _non_negative(cls, v: list[int]) -> list[int]:
        bad = [k for k in v if k < 0]
        if bad:
            raise ValueError(f"ks must be >= 0, got {bad}")
        return sorted(set(v))


class PlotParams(_Strict):
    """Figures and report (stage ``plot``); bounds the number of files it writes."""

    cards: int = Field(default=12, gt=0, description="neuron cards (Fig. 1, Fig. 4): units with the highest g")
    units_per_image: int = Field(default=5, gt=0, le=8, description="top units per image (Fig. 2, report)")
    images: int = Field(default=50, gt=0, description="images with a Fig. 2 panel and a report page, by id")
    top_images: int = Field(default=4, gt=0, description="top-activating images per unit (Fig. 4)")
    quantile: float = Field(default=0.95, gt=0, lt=1, description="heatmap threshold quantile")
    bins: int = Field(default=20, gt=1, description="histogram bins (Fig. 3)")
    dpi: int = Field(default=100, gt=0, le=300)


class PlantParams(_Strict):
    """A planted multimodal neuron (positive control, :mod:`mmn.controls.plant`)."""

    layer: int = Field(ge=0, description="LM layer of the planted unit")
    unit: int = Field(ge=0, description="unit index in that layer's MLP (overwritten)")
    word: str = Field(min_length=1, pattern=r"^[a-z]+$", description="the concept: a lower-case word; training "
                      "images whose captions name it (or its plural) against the rest give the unit's input direction")
    strength: float = Field(gt=0, description="norm of the unit's output vector (along the word's unembedding "
                            "direction) at the concept's mean activation on the training images")
    max_images: int = Field(default=500, gt=1, description="training images (seeded sample) the direction is "
                            "estimated from")
    write_mix: float = Field(default=0.0, ge=0, le=1, description="share of the gradient of log p(word) at the "
                             "image positions in the output direction: 0 = the word's unembedding only, 1 = the "
                             "gradient only (raises the word where it is predicted, need not decode to it)")
    gradient_of: Literal["logit", "logprob"] = Field(default="logit", description="write_mix's gradient: of the "
                                                     "word's logit (what attribution's g explains) or of log p(word)")


class ControlsParams(_Strict):
    """Positive and negative controls (stages plant and controls)."""

    plant: PlantParams | None = Field(default=None, description="null = the LM as loaded (no planted unit)")
    cascade: list[int] = Field(
        default_factory=lambda: [1, 2, 4, 8], description="cascading model randomisation: the number of "
        "top MLP layers re-initialised at each step (larger than the LM = all); empty = skip")
    top_k: int = Field(default=10, gt=0, description="cascade: overlap of the top k units by g")
    max_images: int | None = Field(default=20, gt=0, description="cascade: first n images with a target; null = all")

    @field_validator("cascade")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(x <= 0 for x in v):
            raise ValueError(f"cascade steps must be > 0, got {v}")
        return sorted(set(v))


class Params(_Strict):
    profile: Literal["embedded", "paper", "laptop"]
    seed: int = Field(ge=0)
    profiles: dict[str, ModelProfile]
    data: DataParams
    projection: ProjectionParams
    caption: CaptionParams
    attribute: AttributeParams
    decode: DecodeParams
    filter: FilterParams
    score: ScoreParams
    iou: IouParams
    ablate: AblateParams
    compare: CompareParams = Field(default_factory=CompareParams)
    plot: PlotParams = Field(default_factory=PlotParams)
    controls: ControlsParams = Field(default_factory=ControlsParams)

    @field_validator("profiles")
    @classmethod
    def _both_profiles(cls, v: dict[str, ModelProfile]) -> dict[str, ModelProfile]:
        missing = {"embedded", "paper"} - set(v)
        if missing:
            raise ValueError(f"missing profile(s): {sorted(missing)}")
        return v

    @model_validator(mode="after")
    def _active_profile_defined(self) -> "Params":
        if self.profile not in self.profiles:
            raise ValueError(f"profile {self.profile!r} is not defined under 'profiles' (have {sorted(self.profiles)})")
        return self

    @model_validator(mode="after")
    def _mean_fill_is_a_mean_of_a(self) -> "Params":
        if self.attribute.preactivation and self.ablate.mode == "mean":
            raise ValueError("ablate.mode: mean fills A with its mean, but attribute.preactivation: true ranks units "
                             "by Z; use ablate.mode: zero or attribute.preactivation: false")
        return self

    @property
    def model(self) -> ModelProfile:
        """The resolved model settings of the active profile."""
        return self.profiles[self.profile]

    @property
    def train_data(self) -> TrainData:
        """``projection.train.data``, or the active profile's ``train_data`` when set."""
        return self.model.train_data or self.projection.train.data

    @property
    def train_loop(self):
        """``projection.train`` with the active profile's ``train_max_steps``/``train_batch_size``/
        ``train_views``/``train_dtype`` (when set): a CPU-sized loop for the 7-image default, a longer one
        for `laptop`."""
        t, m = self.projection.train, self.model
        update = {k: v for k, v in (("max_steps", m.train_max_steps), ("batch_size", m.train_batch_size),
                                    ("views", m.train_views), ("dtype", m.train_dtype)) if v is not None}
        return t.model_copy(update=update) if update else t

    @property
    def coco_eval(self) -> CocoParams:
        """``data.coco`` with the active profile's ``eval_subset`` (when set) as its subset."""
        if self.model.eval_subset is None:
            return self.data.coco
        return self.data.coco.model_copy(update={"subset": self.model.eval_subset})

    @property
    def coco_train(self) -> CocoParams:
        """``data.coco`` (server, archive, retries) on ``projection.train.split`` with
        ``projection.train.subset`` (or the profile's ``train_subset``): the ``coco-train`` source."""
        t = self.projection.train
        subset = t.subset if self.model.train_subset is None else self.model.train_subset
        return self.data.coco.model_copy(update={"split": t.split, "subset": subset})


def _format_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid parameters"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_params(raw: dict, source: Path | str = "params.yaml") -> Params:
    """Validate an already-loaded mapping."""
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(Path(source), err)) from None


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; raises :class:`ParamsError` naming the key.

    Inside a stage (:func:`mmn.runner.stage`) the result is a
    :class:`mmn.stage_params.ParamsView` that refuses keys the stage does not declare."""
    from mmn.stage_params import view_for_active_stage

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping")
    return view_for_active_stage(parse_params(raw, path))
