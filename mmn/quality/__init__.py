"""Data-quality gates (Great Expectations 1.x, offline, ephemeral context).

Every stage output is checked by its expectation suite before the stage exits 0::

    from mmn.quality import check_captions, run_suite, expect, SUITES
    check_captions(df)                       # raises QualityError on any failure
    run_suite(df, "mine", [expect("expect_column_values_to_be_unique", column="id")])

Importing this package is cheap; great_expectations (~2 s) is imported on the first
validation, with ``GX_ANALYTICS_ENABLED=false`` set beforehand.
"""

from .core import Failure, QualityError, expect, run_suite, to_pandas, validate, when
from .experiment_suites import check_ablation, check_iou, check_methods, check_scores
from .neuron_suites import check_attributions, check_interpretable, check_neurons
from .suites import (
    CAPTIONS_COLUMNS,
    SUITES,
    captions_suite,
    check_captions,
    check_coco_layout,
    check_train_eval_disjoint,
    coco_captions_suite,
    coco_categories_suite,
    coco_frames,
    coco_images_suite,
    coco_instances_suite,
    register_suite,
    train_eval_disjoint_suite,
)

__all__ = [
    "check_ablation",
    "check_methods",
    "check_iou",
    "check_scores",
    "check_attributions",
    "check_neurons",
    "check_interpretable",
    "QualityError",
    "Failure",
    "expect",
    "when",
    "run_suite",
    "validate",
    "to_pandas",
    "SUITES",
    "register_suite",
    "CAPTIONS_COLUMNS",
    "captions_suite",
    "check_captions",
    "check_coco_layout",
    "check_train_eval_disjoint",
    "train_eval_disjoint_suite",
    "coco_frames",
    "coco_images_suite",
    "coco_instances_suite",
    "coco_captions_suite",
    "coco_categories_suite",
]
