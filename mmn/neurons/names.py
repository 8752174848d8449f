"""The attribution methods' names, in one import-free module: the quality suites
(:mod:`mmn.quality`) read them without loading the models, so stages that only validate
data (``download_coco``, ``download_train``…) do not depend on the attribution code."""

from __future__ import annotations

from typing import Literal

Method = Literal["grad_x_act", "direct_logit", "integrated_gradients"]
METHODS: tuple[str, ...] = ("grad_x_act", "direct_logit", "integrated_gradients")
