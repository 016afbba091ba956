"""tsallis_core: training reasoning models on the Tsallis loss continuum J_q (arXiv 2604.25907)."""

from tsallis_core.maths.estimators import ESTIMATORS, PolicyBatch, get_estimator, get_loss, register_estimator
from tsallis_core.maths.losses import (
    LossOutput,
    amplification,
    garl_loss,
    grpo_loss,
    j_q,
    ln_q,
    paft_loss,
    paft_resample_counts,
    sft_loss,
)
from tsallis_core.maths.schedules import AdaptiveQ, ConstantQ, CosineQ, LinearQ, StepQ

__all__ = [
    "ESTIMATORS",
    "AdaptiveQ",
    "ConstantQ",
    "CosineQ",
    "LinearQ",
    "LossOutput",
    "PolicyBatch",
    "StepQ",
    "amplification",
    "garl_loss",
    "get_estimator",
    "get_loss",
    "grpo_loss",
    "j_q",
    "ln_q",
    "paft_loss",
    "paft_resample_counts",
    "register_estimator",
    "sft_loss",
]
__version__ = "0.1.0"
