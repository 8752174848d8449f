"""Every stage's declaration, once: the files it reads, the files it writes and the params keys
it reads. The stage runner (:mod:`mmn.runner`) builds each stage's command-line options from it,
reads the inputs and writes the outputs through it, and records it in the stage's info JSON;
``tests/test_dvc_deps.py`` checks ``dvc.yaml`` against it (paths and params, stage by stage).

``dvc.yaml`` stays a plain file a user reads and edits; when it and this table disagree the test
names the stage and the path or key. (Checked rather than generated: a generator would have to
keep dvc.yaml's comments, templating and plot definitions, and would be a second thing to run.)

Params keys: ``profiles.${profile}.<key>`` is DVC templating (``params.yaml`` is loaded as vars):
a stage depends on the keys it reads of the *active* profile only, so editing another profile
leaves the pipeline up to date, and editing ``bert_layers`` reruns only the stages that score
with BERTScore. A key covers everything under it. While a stage runs, reading an undeclared key
raises (:class:`mmn.stage_params.ParamsView`). DVC fails on a declared key that is missing, so
every profile in ``params.yaml`` spells out every key (``null`` where unused).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ACTIVE_PROFILE = "profiles.${profile}"


def _profile(*keys: str) -> tuple[str, ...]:
    """``profile`` (which entry is active) and the given keys of the active profile."""
    return ("profile", *(f"{ACTIVE_PROFILE}.{k}" for k in keys))


# What each group of code reads from the active profile.
_LM = ("lm", "lm_revision", "device", "dtype")  # mmn.pipeline.build_lm
_LM_CPU_FP32 = ("lm", "lm_revision")  # build_lm(dtype="float32", device="cpu"): no device/dtype read
_ENCODER = ("encoder", "encoder_grid", "image_size")  # mmn.pipeline.build_encoder (+ device)
_PREFIX_LM = (*_LM, *_ENCODER)  # mmn.pipeline.build_prefix_lm
_BERT = ("bert_model", "bert_layers", "bert_rescale")  # mmn.pipeline.build_bert
_CLIP = ("clip_pretrained", "clip_checkpoint")
_TRAIN_OVERRIDES = ("train_max_steps", "train_batch_size", "train_views", "train_dtype")
_TRAIN_LOOP = tuple(f"projection.train.{k}" for k in (
    "max_steps", "batch_size", "lr", "views", "warmup_steps", "val_fraction", "val_max_images", "eval_every",
    "patience", "dtype", "feature_dtype", "shuffle_captions"))

#: ``Params`` properties -> the keys they read.
PROPERTY_READS: dict[str, tuple[str, ...]] = {
    "train_data": (*_profile("train_data"), "projection.train.data"),
    "train_loop": (*_profile(*_TRAIN_OVERRIDES), *_TRAIN_LOOP),
    "coco_eval": (*_profile("eval_subset"), "data.coco"),
    "coco_train": (*_profile("train_subset"), "data.coco", "projection.train.split", "projection.train.subset"),
}

# the files several stages share
COCO, TRAIN, PROJECTION = "data/coco", "data/coco_train", "data/projection"
PLANT = "data/plant"  # stage plant: the planted unit of a positive control (or none); every LM after it has it
PROJECTION_LIVE = "data/projection_live"  # DVCLive folder of the training curves (mmn.training_log)
CAPTIONS, ATTRIBUTIONS = "data/captions.parquet", "data/attributions.parquet"
NEURONS, INTERPRETABLE = "data/neurons.parquet", "data/interpretable.parquet"
#: the full results of each stage that writes metrics, by the metrics file's stem: DVC-cached
#: (``results``); the ``summary`` stage copies them into git-tracked ``summary/<stem>.json``
RESULT_STEMS = ("projection", "captions", "neurons", "scores", "iou", "ablation", "methods", "controls")


def results(stem: str) -> str:
    return f"data/results/{stem}.json"


WORDLIST = "data/wordlist/american-english"  # SCOWL-derived Debian wamerican (DVC-tracked; scripts/setup.sh)
#: inputs that no stage produces (DVC-tracked files): what to do when one is missing
MISSING_HINTS = {WORDLIST: "word list missing; run scripts/setup.sh (fetches Debian wamerican) or "
                           f"`dvc pull {WORDLIST}.dvc` from a remote"}
COCO_CACHE = ".cache/coco"  # resumable download cache: not a DVC output
PROJECTION_CACHE = ".cache/projection"  # training features on disk + the resumable checkpoint: not a DVC output


@dataclass(frozen=True)
class StageSpec:
    """One stage: ``inputs``/``outputs`` map a name (the ``--name`` option, ``_`` as ``-``) to its
    default path; ``metrics`` names the outputs that dvc.yaml lists under ``metrics:``, and
    ``plots`` those under ``plots:``; a stage with ``metrics`` also writes its full results to
    the ``results`` output (:mod:`mmn.headline`; DVC-cached, copied to git-tracked ``summary/`` by
    the ``summary`` stage); ``options`` are extra path options that DVC
    does not track (caches). ``seeded``: the runner calls :func:`mmn.numerics.seed_everything` first
    (the model stages; the downloads and filter draw nothing from the global RNGs)."""

    name: str
    params: tuple[str, ...]
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: tuple[str, ...] = ()
    options: dict[str, str] = field(default_factory=dict)
    seeded: bool = True
    hash_seed: bool = False  # dvc.yaml's cmd pins PYTHONHASHSEED=0 (set-ordered text batching)

    @property
    def cmd(self) -> str:
        """The command dvc.yaml runs (without its trailing comment)."""
        return ("PYTHONHASHSEED=0 " if self.hash_seed else "") + f"python -m stages.{self.name}"

    def paths(self) -> dict[str, str]:
        """Every declared DVC path: inputs and outputs."""
        return {**self.inputs, **self.outputs}


def _spec(name: str, params: tuple[str, ...], **kw) -> tuple[str, StageSpec]:
    return name, StageSpec(name, params, **kw)


_MODEL_IN = {"coco": COCO, "projection": PROJECTION, "plant": PLANT}

#: stage -> its declaration, in DAG order.
STAGES: dict[str, StageSpec] = dict([
    _spec("download_coco",
          (*_profile("data_source", "eval_subset", "train_data"), "seed", "data.coco", "data.on_bad_image",
           "projection.train.data", "projection.train.holdout"),
          outputs={"out": COCO}, options={"cache": COCO_CACHE}, seeded=False),
    _spec("download_train",
          (*_profile("data_source", "eval_subset", "train_data", "train_subset", "projection"), "seed", "data.coco",
           "data.on_bad_image", "projection.train.data", "projection.train.holdout", "projection.train.subset",
           "projection.train.split", "projection.train.captions"),
          inputs={"eval": COCO}, outputs={"out": TRAIN}, options={"cache": COCO_CACHE}, seeded=False),
    _spec("load_projection",
          (*_profile(*_LM, *_ENCODER, "projection", "limber_url", *_TRAIN_OVERRIDES), "seed", *_TRAIN_LOOP,
           "caption.prompt"),
          inputs={"coco": COCO, "train": TRAIN},
          outputs={"out": PROJECTION, "metrics": "metrics/projection.json", "results": results("projection"),
                   "live_metrics": f"{PROJECTION_LIVE}/metrics.json", "live_plots": f"{PROJECTION_LIVE}/plots"},
          options={"cache": PROJECTION_CACHE}, metrics=("metrics", "live_metrics")),
    _spec("plant", (*_profile(*_PREFIX_LM), "seed", "caption.prompt", "controls.plant"),
          inputs={"train": TRAIN, "projection": PROJECTION}, outputs={"out": PLANT}),
    _spec("caption", (*_profile(*_PREFIX_LM, *_BERT), "seed", "caption"),
          inputs=_MODEL_IN,
          outputs={"out": CAPTIONS, "info": "data/info/caption.json", "metrics": "metrics/captions.json",
                   "results": results("captions")},
          metrics=("metrics",), hash_seed=True),
    _spec("attribute", (*_profile(*_PREFIX_LM), "seed", "caption.prompt", "attribute"),
          inputs={**_MODEL_IN, "captions": CAPTIONS}, outputs={"out": ATTRIBUTIONS}),
    _spec("decode", (*_profile(*_LM_CPU_FP32), "seed", "decode"),
          inputs={"attributions": ATTRIBUTIONS, "plant": PLANT}, outputs={"out": NEURONS}),
    _spec("filter", ("seed", "attribute.rank_by", "decode", "filter"),
          inputs={"attributions": ATTRIBUTIONS, "neurons": NEURONS, "wordlist": WORDLIST},
          outputs={"out": INTERPRETABLE, "layers_out": "data/layer_distribution.csv",
                   "info": "data/info/filter.json", "metrics": "metrics/neurons.json",
                   "results": results("neurons")},
          metrics=("metrics",), seeded=False),
    _spec("score", (*_profile(*_PREFIX_LM, *_BERT, *_CLIP), "seed", "caption.prompt", "score"),
          inputs={**_MODEL_IN, "captions": CAPTIONS, "attributions": ATTRIBUTIONS, "neurons": INTERPRETABLE},
          outputs={"out": "data/scores.parquet", "info": "data/info/score.json", "metrics": "metrics/scores.json",
                   "results": results("scores")},
          metrics=("metrics",), hash_seed=True),
    _spec("iou", (*_profile(*_PREFIX_LM, "iou_categories"), "seed", "caption.prompt", "iou"),
          inputs={**_MODEL_IN, "captions": CAPTIONS, "attributions": ATTRIBUTIONS, "neurons": INTERPRETABLE},
          outputs={"out": "data/iou.parquet", "categories_out": "data/iou_categories.csv",
                   "selectivity_out": "data/selectivity.parquet", "info": "data/info/iou.json",
                   "metrics": "metrics/iou.json", "results": results("iou")},
          metrics=("metrics",)),
    _spec("ablate",
          (*_profile(*_PREFIX_LM, *_BERT), "seed", "caption.prompt", "caption.max_new_tokens",
           "caption.stop_at_newline", "decode", "filter", "attribute.layers",
           "attribute.preactivation", "attribute.aggregate", "ablate"),
          inputs={**_MODEL_IN, "captions": CAPTIONS, "wordlist": WORDLIST},
          outputs={"out": "data/ablation.parquet", "curve": "data/ablation_curve.csv",
                   "info": "data/info/ablate.json", "metrics": "metrics/ablation.json",
                   "results": results("ablation")},
          metrics=("metrics",), hash_seed=True),
    _spec("compare_methods",
          (*_profile(*_PREFIX_LM), "seed", "caption.prompt", "attribute.ig_steps", "attribute.layers", "ablate.ks",
           "compare"),
          inputs={**_MODEL_IN, "captions": CAPTIONS},
          outputs={"out": "data/compare_methods.parquet", "table": "data/compare_methods.csv",
                   "curve": "data/compare_methods_curve.csv", "info": "data/info/compare_methods.json",
                   "metrics": "metrics/methods.json", "results": results("methods")},
          metrics=("metrics",)),
    _spec("controls",
          (*_profile(*_PREFIX_LM), "seed", "caption.prompt", "attribute.layers", "attribute.aggregate",
           "attribute.preactivation", "decode", "filter", "iou.quantile", "controls"),
          inputs={**_MODEL_IN, "captions": CAPTIONS, "attributions": ATTRIBUTIONS, "wordlist": WORDLIST},
          outputs={"plant_out": "data/controls_plant.csv", "cascade_out": "data/controls_cascade.csv",
                   "info": "data/info/controls.json", "metrics": "metrics/controls.json",
                   "results": results("controls")},
          metrics=("metrics",)),
    _spec("plot",
          (*_profile(*_PREFIX_LM, "projection", "iou_categories", "bert_model"), "seed", "caption.prompt", "plot"),
          inputs={**_MODEL_IN, "captions": CAPTIONS, "attributions": ATTRIBUTIONS, "neurons": INTERPRETABLE,
                  "layers": "data/layer_distribution.csv", "scores": "data/scores.parquet", "iou": "data/iou.parquet",
                  "selectivity": "data/selectivity.parquet", "ablation": "data/ablation.parquet",
                  "methods_table": "data/compare_methods.csv", "methods_curve": "data/compare_methods_curve.csv",
                  "live_plots": f"{PROJECTION_LIVE}/plots",
                  **{f"{stem}_results": results(stem) for stem in RESULT_STEMS}},
          outputs={"plots_out": "plots", "report_out": "report"}),
    # git-tracked copies of the full results (cache: false outs, so DVC's run cache skips this
    # stage, which costs a second; every other stage keeps its run cache)
    _spec("summary", (),
          inputs={stem: results(stem) for stem in RESULT_STEMS},
          outputs={f"{stem}_summary": f"summary/{stem}.json" for stem in RESULT_STEMS}, seeded=False),
])

#: stage -> the params keys it reads (the table :class:`mmn.stage_params.ParamsView` enforces).
STAGE_PARAMS: dict[str, tuple[str, ...]] = {name: s.params for name, s in STAGES.items()}
