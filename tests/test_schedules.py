import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from tsallis_core.maths.schedules import AdaptiveQ, ConstantQ, CosineQ, LinearQ, QSchedule, StepQ, update_success_ema


def test_constant():
    assert ConstantQ(q=0.3).q_at(0) == ConstantQ(q=0.3).q_at(10_000) == 0.3


def test_step_is_sft_then_rlvr():
    s = StepQ(q_before=1.0, q_after=0.0, switch_step=5)
    assert [s.q_at(t) for t in (0, 4, 5, 9)] == [1.0, 1.0, 0.0, 0.0]


def test_linear_and_cosine_endpoints_and_midpoint():
    lin, cos = LinearQ(q_start=1.0, q_end=0.0, total_steps=10), CosineQ(q_start=1.0, q_end=0.0, total_steps=10)
    assert [lin.q_at(t) for t in (0, 5, 10, 20)] == [1.0, 0.5, 0.0, 0.0]
    assert (
        cos.q_at(0) == pytest.approx(1.0) and cos.q_at(5) == pytest.approx(0.5) and cos.q_at(10) == pytest.approx(0.0)
    )
    assert cos.q_at(2) > lin.q_at(2)  # cosine stays high longer at the start


def test_adaptive_rule():
    s = AdaptiveQ(q_min=0.0, q_max=1.0, success_low=0.01, success_high=0.5)
    assert s.q_at(0, None) == 1.0  # nothing observed yet: cold start assumed
    assert s.q_at(0, 0.001) == 1.0 and s.q_at(0, 0.9) == 0.0
    mid = (0.01 * 0.5) ** 0.5  # geometric midpoint: linear in log s
    assert s.q_at(0, mid) == pytest.approx(0.5)
    qs = [s.q_at(0, x) for x in (0.02, 0.05, 0.1, 0.3)]
    assert qs == sorted(qs, reverse=True)


def test_success_ema():
    assert update_success_ema(None, 0.2, 0.9) == 0.2
    assert update_success_ema(0.2, 1.0, 0.9) == pytest.approx(0.28)


def test_schedule_from_config_dict():
    adapter = TypeAdapter(QSchedule)
    assert adapter.validate_python({"kind": "step", "switch_step": 3}).q_at(3) == 0.0
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        adapter.validate_python({"kind": "constant", "q": 1.5})
    with pytest.raises(ValidationError, match="success_low"):
        adapter.validate_python({"kind": "adaptive", "success_low": 0.6, "success_high": 0.5})
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        adapter.validate_python({"kind": "exponential"})


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize(("warmup", "total"), [(0, 1), (0, 40), (3, 10), (30, 600), (50, 40)])
def test_lr_schedules_are_transformers_schedules_number_for_number(schedule, warmup, total):
    from transformers import get_scheduler

    from tsallis_core.config import OptimConfig
    from tsallis_core.training.engines import _scheduler

    def lrs(scheduler) -> list[float]:
        out = []
        for _ in range(total + 3):
            out.append(scheduler.get_last_lr()[0])
            scheduler.optimizer.step()
            scheduler.step()
        return out

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)

    name = {"constant": "constant_with_warmup"}.get(schedule, schedule)
    theirs = get_scheduler(name, optimizer(), num_warmup_steps=warmup, num_training_steps=total)
    ours = _scheduler(optimizer(), OptimConfig(lr=3e-3, lr_schedule=schedule, warmup_steps=warmup), total)
    assert lrs(ours) == lrs(theirs)  # exact: a resumed or refactored run keeps its numbers
    assert ours.state_dict() == theirs.state_dict()  # so a checkpoint of either resumes with the other
