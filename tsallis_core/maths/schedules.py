"""q schedules: how q moves during training. Each is a small typed config with ``q_at``.

All are pure: ``q_at(step, success_ema)`` returns q for an optimiser step, given (for the
adaptive rule only) the running mean of the training success rate. The trainer keeps that
running mean in its checkpoint, so a resumed run sees the same q.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Q = Annotated[float, Field(ge=0.0, le=1.0)]


class _Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def q_at(self, step: int, success_ema: float | None = None) -> float:  # pragma: no cover - interface
        raise NotImplementedError


class ConstantQ(_Schedule):
    """q fixed for the whole run."""

    kind: Literal["constant"] = "constant"
    q: Q = Field(0.75, description="the constant q")

    def q_at(self, step: int, success_ema: float | None = None) -> float:
        return self.q


class StepQ(_Schedule):
    """q_before until ``switch_step``, then q_after. 1 -> 0 is the usual SFT-then-RLVR pipeline."""

    kind: Literal["step"] = "step"
    q_before: Q = Field(1.0, description="q for steps < switch_step")
    q_after: Q = Field(0.0, description="q from switch_step on")
    switch_step: int = Field(100, ge=0, description="first optimiser step that uses q_after")

    def q_at(self, step: int, success_ema: float | None = None) -> float:
        return self.q_before if step < self.switch_step else self.q_after


class _Ramp(_Schedule):
    q_start: Q = Field(1.0, description="q at step 0")
    q_end: Q = Field(0.0, description="q at total_steps and after")
    total_steps: int = Field(1000, ge=1, description="steps over which q moves from q_start to q_end")

    def _fraction(self, step: int) -> float:
        return min(max(step, 0), self.total_steps) / self.total_steps


class LinearQ(_Ramp):
    """q moves linearly from q_start to q_end over total_steps."""

    kind: Literal["linear"] = "linear"

    def q_at(self, step: int, success_ema: float | None = None) -> float:
        return self.q_start + (self.q_end - self.q_start) * self._fraction(step)


class CosineQ(_Ramp):
    """q follows half a cosine from q_start to q_end over total_steps."""

    kind: Literal["cosine"] = "cosine"

    def q_at(self, step: int, success_ema: float | None = None) -> float:
        return self.q_end + (self.q_start - self.q_end) * 0.5 * (1.0 + math.cos(math.pi * self._fraction(step)))


class AdaptiveQ(_Schedule):
    """q from the running training success rate s (an exponential moving average).

    Rule: ``q = q_max`` while ``s <= success_low``, ``q = q_min`` once ``s >= success_high``,
    and in between q falls linearly in ``log s``. Why: the amplification ``P^-q`` is what
    escapes a cold start (escape time ``Theta(log 1/p0)`` at q = 1 against ``Omega(1/p0)``
    at q = 0), while at high success it only adds estimator bias (``O(q / (M P^(q+1)))``) and
    memorises wrong or unreachable labels; the paper's guide (q near 1 for hard cold starts,
    near 0 for warm starts) is this rule read along one run. ``log s`` because escape progress is
    measured in e-folds of P. Before any observation q = q_max.
    """

    kind: Literal["adaptive"] = "adaptive"
    q_min: Q = Field(0.0, description="q once the running success rate reaches success_high")
    q_max: Q = Field(1.0, description="q while the running success rate is at or below success_low")
    success_low: float = Field(0.05, gt=0.0, lt=1.0, description="success rate at or below which q = q_max")
    success_high: float = Field(0.5, gt=0.0, le=1.0, description="success rate at or above which q = q_min")
    ema_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="weight of the old value in the running success rate")

    @model_validator(mode="after")
    def _ordered(self) -> AdaptiveQ:
        if self.success_low >= self.success_high:
            raise ValueError(f"success_low ({self.success_low}) must be below success_high ({self.success_high})")
        if self.q_min > self.q_max:
            raise ValueError(f"q_min ({self.q_min}) must not exceed q_max ({self.q_max})")
        return self

    def q_at(self, step: int, success_ema: float | None = None) -> float:
        if success_ema is None or success_ema <= self.success_low:
            return self.q_max
        if success_ema >= self.success_high:
            return self.q_min
        t = math.log(success_ema / self.success_low) / math.log(self.success_high / self.success_low)
        return self.q_max + (self.q_min - self.q_max) * t


QSchedule = Annotated[ConstantQ | StepQ | LinearQ | CosineQ | AdaptiveQ, Field(discriminator="kind")]


def update_success_ema(previous: float | None, observed: float, momentum: float) -> float:
    """Running mean of the success rate; the first observation starts it."""
    return observed if previous is None else momentum * previous + (1.0 - momentum) * observed
