"""The estimator registry: a tiny estimator registered here is validated by the config, swept by the Kubeflow
settings and trained by the trainer, with no other file edited (tsallis_core/maths/estimators.py)."""

import json

import pytest
import torch
from pydantic import Field

from tsallis_core.config import ConfigError, load_config
from tsallis_core.maths.estimators import (
    ESTIMATORS,
    AggregationArgs,
    EstimatorArgs,
    PolicyBatch,
    estimator_settings,
    get_estimator,
    register_estimator,
)
from tsallis_core.maths.losses import LossOutput, aggregate
from tsallis_core.training.trainer import train
from tsallis_kubeflow.settings import load_settings

CALLS: list[PolicyBatch] = []


class MeanBaselineArgs(AggregationArgs):
    """rl.aggregation, the setting GARL and PAFT share (declared once, in the mixin)."""


def mean_baseline(batch: PolicyBatch, args: MeanBaselineArgs) -> LossOutput:
    """REINFORCE with the group-mean baseline, no amplification and no q: the smallest estimator there is."""
    CALLS.append(batch)
    grouped = batch.rewards.view(-1, batch.group_size)  # [B, M]
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)  # [N]
    loss = aggregate(-advantages.unsqueeze(1) * batch.logprobs, batch.mask, args.aggregation)
    return LossOutput(loss, {"loss": loss.item()})


@pytest.fixture
def registered():
    register_estimator(
        "mean_baseline", MeanBaselineArgs, uses_q=False, description="REINFORCE with a group-mean baseline (a test)"
    )(mean_baseline)
    CALLS.clear()
    yield "mean_baseline"
    del ESTIMATORS["mean_baseline"]


def test_the_registry_lists_the_project_estimators_with_their_args():
    assert list(ESTIMATORS) == ["garl", "paft", "grpo"]
    assert [e.uses_q for e in ESTIMATORS.values()] == [True, True, False]
    assert {name for name, e in ESTIMATORS.items() if e.has_kl} == {"garl", "grpo"}
    rl = load_config(None, ["rl.estimator=garl", "rl.baseline=none", "rl.updates_per_batch=2"]).rl
    args = get_estimator("garl").args_from(rl)
    assert (args.baseline, args.updates_per_batch, args.clip_eps) == ("none", 2, 0.2)
    with pytest.raises(ValueError, match="estimator must be one of garl, paft, grpo; got 'ppo'"):
        get_estimator("ppo")
    with pytest.raises(ValueError, match="already registered"):
        register_estimator("garl", EstimatorArgs, uses_q=True, description="")(mean_baseline)


def test_a_registered_estimator_is_validated_swept_and_trained(registered, task_dir, tmp_path):
    with pytest.raises(ConfigError, match="Input should be 'garl', 'paft', 'grpo' or 'mean_baseline'"):
        load_config(None, ["rl.estimator=ppo"])
    with pytest.raises(ConfigError, match="kl_coef applies to garl and grpo; MEAN_BASELINE has no KL term"):
        load_config(None, [f"rl.estimator={registered}", "rl.kl_coef=0.1"])

    grid = load_settings(None, [f"sweep.estimators=[garl,{registered}]", "sweep.q=[0.5]", "sweep.seeds=[0]"]).sweep
    assert [r["run_name"] for r in grid.items()] == ["garl-q0.5-s0", f"{registered}-s0", "grpo-s0"]

    out = tmp_path / "run"
    result = train(
        load_config(
            None,
            [
                "stage=rl",
                f"rl.estimator={registered}",
                f"output_dir={out}",
                "model.name_or_path=embedded:tiny",
                f"data.train_path={task_dir / 'train.jsonl'}",
                "rl.group_size=4",
                "rl.batch_size=8",
                "rl.max_new_tokens=8",
                "steps=2",
                "checkpoint_every=0",
                "seed=3",
                "engine.threads=1",
                "tracking.enabled=false",
            ],
        )
    )
    assert len(CALLS) == 2 and all(b.logprobs.shape[0] == 8 and b.group_size == 4 for b in CALLS)
    assert all(b.logprobs.requires_grad and b.old_logprobs is None and b.resample_counts is None for b in CALLS)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2 and "q" not in history[0]  # uses_q=False: no q logged, as for GRPO
    assert history[-1]["loss"] == pytest.approx(result.final_metrics["loss"])
    assert torch.isfinite(torch.tensor([h["loss"] for h in history])).all()


def test_the_rl_section_takes_each_estimators_own_settings_from_its_args_class():
    """An estimator's new setting is declared in its args class only; the rl section is built from the registry, and
    a setting declared by two args classes (rather than one shared mixin) is refused."""
    from tsallis_core.config import RLConfig

    assert set(estimator_settings()) <= set(RLConfig.model_fields)
    assert RLConfig.model_fields["paft_resample"].description == estimator_settings()["paft_resample"][1].description

    class SharpArgs(EstimatorArgs):
        sharpness: float = Field(2.0, gt=0, description="a setting of this estimator alone")

    class ClashArgs(EstimatorArgs):
        baseline: str = "loo"  # GARL's, declared again

    register_estimator("sharp", SharpArgs, uses_q=False, description="a test")(mean_baseline)
    try:
        assert estimator_settings()["sharpness"][1].default == 2.0
        register_estimator("clash", ClashArgs, uses_q=False, description="a test")(mean_baseline)
        with pytest.raises(TypeError, match="rl.baseline is declared in both GarlArgs and ClashArgs"):
            estimator_settings()
    finally:
        ESTIMATORS.pop("sharp", None)
        ESTIMATORS.pop("clash", None)
