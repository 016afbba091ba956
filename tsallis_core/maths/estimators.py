"""The estimator registry: every RL estimator is one function registered under its name, with one signature.

    @register_estimator("garl", GarlArgs, uses_q=True, maths=garl_loss, description="...")
    def garl(batch: PolicyBatch, args: GarlArgs) -> LossOutput: ...

- ``PolicyBatch``: what the trainer hands every estimator for one micro-batch (log-probs, mask, rewards, the group
  layout, q, and the optional old and reference log-probs and PAFT's resample counts).
- ``args``: the estimator's own settings, a typed class. Each field with a default is an ``rl`` setting that the
  estimator owns: the config's ``rl`` section gets it from here (``estimator_settings``), with its type, default and
  description, so ``rl.baseline=none`` on the command line reaches GARL as ``args.baseline``. A field without a
  default is a trainer setting the estimator reads (``updates_per_batch``). Settings that several estimators share
  are declared once, in a mixin (``ClipArgs``, ``AggregationArgs``).
- Config validation (``rl.estimator``, and ``kl_coef`` only for estimators with a KL term), the CLI help, the
  Kubeflow sweep settings and the trainer all read this registry; nothing else lists the names.

Adding an estimator, with settings of its own: one function and one args class in this file, and its tests
(tests/test_estimators.py registers one for real). The maths stays in small pure functions (``losses.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo
from torch import Tensor

from tsallis_core.maths.losses import (
    Aggregation,
    Baseline,
    GrpoLossType,
    LossOutput,
    ScaleRewards,
    garl_loss,
    grpo_loss,
    paft_loss,
    sft_loss,
)


@dataclass(frozen=True)
class PolicyBatch:
    """One micro-batch of scored completions, grouped by prompt (N = B prompts x M completions, L tokens)."""

    logprobs: Tensor  # [N, L] log-probs of the sampled tokens under the policy being trained (with grad)
    mask: Tensor  # [N, L] 1.0 on completion tokens, 0.0 on padding
    rewards: Tensor  # [N] verifier rewards, group by group
    group_size: int  # M
    q: float  # the step's q (from the q schedule); estimators without q ignore it
    max_new_tokens: int  # the longest completion that could be sampled (GRPO's dr_grpo normaliser)
    old_logprobs: Tensor | None = None  # [N, L] of the sampling policy, when a batch is reused (clipped ratio)
    ref_logprobs: Tensor | None = None  # [N, L] of the reference policy, when kl_coef > 0
    resample_counts: Tensor | None = None  # [N] posterior draws per completion (PAFT, paft_resample=multinomial)


class EstimatorArgs(BaseModel):
    """Base of an estimator's settings: each field is an ``rl`` setting (its own when it has a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Estimator:
    name: str
    loss: Callable[[PolicyBatch, EstimatorArgs], LossOutput]
    args: type[EstimatorArgs]
    uses_q: bool  # False: q is neither swept nor logged (the GRPO baseline)
    description: str
    maths: Callable[..., LossOutput] | None = None  # the pure tensor function (``get_loss``), where there is one
    wants_resample_counts: Callable[[EstimatorArgs], bool] | None = None  # PAFT: draw the resampling counts
    is_baseline: bool = False  # the estimator the others are compared with (sweeps, plots, the escape study)

    def args_from(self, rl) -> EstimatorArgs:
        """This estimator's args from an ``RLConfig`` (or any object with those attributes)."""
        return self.args.model_validate({name: getattr(rl, name) for name in self.args.model_fields})

    def draws_resample_counts(self, args: EstimatorArgs) -> bool:
        """Whether the trainer draws resampling counts for this estimator (PAFT's multinomial resampling)."""
        return self.wants_resample_counts is not None and self.wants_resample_counts(args)

    @property
    def has_kl(self) -> bool:
        return "kl_coef" in self.args.model_fields


ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(
    name: str,
    args: type[EstimatorArgs],
    *,
    uses_q: bool,
    description: str,
    maths: Callable[..., LossOutput] | None = None,
    wants_resample_counts: Callable[[EstimatorArgs], bool] | None = None,
    is_baseline: bool = False,
):
    """Decorator: register ``fn(batch: PolicyBatch, args) -> LossOutput`` as the estimator ``name``."""

    def register(fn: Callable[[PolicyBatch, EstimatorArgs], LossOutput]):
        if name in ESTIMATORS:
            raise ValueError(f"estimator {name!r} is already registered")
        if is_baseline and any(e.is_baseline for e in ESTIMATORS.values()):
            raise ValueError(f"estimator {name!r} cannot be the baseline: {baseline_estimator()!r} already is")
        ESTIMATORS[name] = Estimator(name, fn, args, uses_q, description, maths, wants_resample_counts, is_baseline)
        return fn

    return register


def get_estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}; got {name!r}")
    return ESTIMATORS[name]


def baseline_estimator() -> str:
    """The name of the registered baseline estimator (GRPO): what sweeps, plots and studies compare against."""
    return next(e.name for e in ESTIMATORS.values() if e.is_baseline)


def estimator_settings() -> dict[str, tuple[object, FieldInfo]]:
    """The ``rl`` settings the registered estimators own: name -> (type, field), each declared once (a setting
    that two args classes share comes from one mixin). The config builds its ``rl`` section from these."""
    settings: dict[str, tuple[object, FieldInfo]] = {}
    declared_in: dict[str, type] = {}
    for estimator in ESTIMATORS.values():
        for name, field in estimator.args.model_fields.items():
            if field.is_required():
                continue  # a trainer setting the estimator reads
            owner = next(c for c in estimator.args.__mro__ if name in inspect.get_annotations(c))
            if declared_in.setdefault(name, owner) is not owner:
                raise TypeError(
                    f"rl.{name} is declared in both {declared_in[name].__name__} and {owner.__name__}: declare it "
                    f"once, in a mixin both args classes inherit"
                )
            settings[name] = (field.annotation, field)
    return settings


def get_loss(name: str) -> Callable[..., LossOutput]:
    """The pure tensor loss of an estimator (garl, paft, grpo), or ``sft``, by name."""
    losses = {**{n: e.maths for n, e in ESTIMATORS.items() if e.maths is not None}, "sft": sft_loss}
    if name not in losses:
        raise ValueError(f"estimator must be one of {', '.join(losses)}; got {name!r}")
    return losses[name]


# ---------------------------------------------------------------------------------------------
# the three estimators of the project
# ---------------------------------------------------------------------------------------------


class AggregationArgs(EstimatorArgs):
    aggregation: Aggregation = Field("seq_sum", description="token aggregation for GARL and PAFT")


class ClipArgs(EstimatorArgs):
    clip_eps: float = Field(0.2, gt=0, description="PPO ratio clip when updates_per_batch > 1 (GARL) and for GRPO")
    kl_coef: float = Field(0.0, ge=0, description="weight of KL(pi || reference) per token; 0 loads no reference")


class GarlArgs(AggregationArgs, ClipArgs):
    baseline: Baseline = Field("loo", description="GARL baseline")
    updates_per_batch: int  # the trainer's: > 1 turns on the ratio clip


@register_estimator(
    "garl",
    GarlArgs,
    uses_q=True,
    maths=garl_loss,
    description="Gradient-Amplified RL: the policy gradient with each group's advantage times P_hat^-q",
)
def garl(batch: PolicyBatch, args: GarlArgs) -> LossOutput:
    clip = args.clip_eps if args.updates_per_batch > 1 else None  # the ratio clip only when a batch is reused
    return garl_loss(
        batch.logprobs,
        batch.mask,
        batch.rewards,
        batch.group_size,
        batch.q,
        baseline=args.baseline,
        aggregation=args.aggregation,
        old_logprobs=batch.old_logprobs,
        clip_eps=clip,
        ref_logprobs=batch.ref_logprobs,
        kl_coef=args.kl_coef,
    )


class PaftArgs(AggregationArgs):
    paft_resample: Literal["multinomial", "expected"] = Field(
        "multinomial", description="PAFT: draw the posterior resample, or use its expectation"
    )


@register_estimator(
    "paft",
    PaftArgs,
    uses_q=True,
    maths=paft_loss,
    wants_resample_counts=lambda args: args.paft_resample == "multinomial",
    description="Posterior-Attenuated Fine-Tuning: SFT on posterior-resampled successes, weighted P_hat^(1-q)",
)
def paft(batch: PolicyBatch, args: PaftArgs) -> LossOutput:
    return paft_loss(
        batch.logprobs,
        batch.mask,
        batch.rewards,
        batch.group_size,
        batch.q,
        resample_counts=batch.resample_counts,
        aggregation=args.aggregation,
    )


class GrpoArgs(ClipArgs):
    grpo_loss_type: GrpoLossType = Field("dapo", description="GRPO aggregation as in TRL")
    grpo_scale_rewards: ScaleRewards = Field("group", description="GRPO reward scaling as in TRL")


@register_estimator(
    "grpo",
    GrpoArgs,
    uses_q=False,
    maths=grpo_loss,
    is_baseline=True,
    description="the GRPO baseline, as TRL's GRPOTrainer computes it (no q)",
)
def grpo(batch: PolicyBatch, args: GrpoArgs) -> LossOutput:
    return grpo_loss(
        batch.logprobs,
        batch.mask,
        batch.rewards,
        batch.group_size,
        loss_type=args.grpo_loss_type,
        scale_rewards=args.grpo_scale_rewards,
        old_logprobs=batch.old_logprobs,
        clip_eps=args.clip_eps,
        ref_logprobs=batch.ref_logprobs,
        kl_coef=args.kl_coef,
        max_completion_length=batch.max_new_tokens,
    )
