"""Our GRPO loss against TRL GRPOTrainer's own ``_compute_loss`` on identical tensors (to 1e-6)."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL is a test dependency: pip install -e '.[test]'")
from trl.trainer.utils import nanstd

from tsallis_core.maths.losses import grpo_advantages, grpo_loss

N_GROUPS, GROUP, LENGTH = 3, 4, 6


def trl_advantages(rewards: torch.Tensor, scale_rewards: str) -> torch.Tensor:
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, the advantage lines for one reward function."""
    mean = torch.nanmean(rewards.view(-1, GROUP), dim=1).repeat_interleave(GROUP, dim=0)
    std = nanstd(rewards.view(-1, GROUP), dim=1).repeat_interleave(GROUP, dim=0)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return advantages


def trl_loss(logprobs, mask, advantages, loss_type, beta, old_logprobs, ref_logprobs, epsilon=0.2):
    """Call TRL's real GRPOTrainer._compute_loss with a stand-in `self` that returns our log-probs."""
    accelerator = SimpleNamespace(
        num_processes=1, gather=lambda t: t, gather_for_metrics=lambda t: t, reduce=lambda t, reduction="sum": t
    )
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, torch.zeros_like(logprobs), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=accelerator,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)},
        max_completion_length=LENGTH,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
    )
    inputs = {
        "prompt_ids": torch.zeros(N_GROUPS * GROUP, 2, dtype=torch.long),
        "prompt_mask": torch.ones(N_GROUPS * GROUP, 2, dtype=torch.long),
        "completion_ids": torch.zeros(N_GROUPS * GROUP, LENGTH, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "num_items_in_batch": mask.sum(),
    }
    if old_logprobs is not None:
        inputs["old_per_token_logps"] = old_logprobs
    if beta:
        inputs["ref_per_token_logps"] = ref_logprobs
    return trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)


def make_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    n = N_GROUPS * GROUP
    logprobs = (-torch.rand(n, LENGTH, generator=g) * 3).requires_grad_(True)
    lengths = torch.randint(1, LENGTH + 1, (n,), generator=g)
    mask = (torch.arange(LENGTH) < lengths.unsqueeze(1)).float()
    rewards = torch.randint(0, 2, (n,), generator=g).float()
    rewards[:GROUP] = 0.0  # one group with no success: zero std
    old = logprobs.detach() + 0.3 * torch.randn(n, LENGTH, generator=g)  # off-policy: clipping is active
    ref = logprobs.detach() + 0.2 * torch.randn(n, LENGTH, generator=g)
    return logprobs, mask, rewards, old, ref


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_match_trl(scale_rewards):
    _, _, rewards, _, _ = make_batch(0)
    torch.testing.assert_close(
        grpo_advantages(rewards, GROUP, scale_rewards), trl_advantages(rewards, scale_rewards), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("off_policy", [False, True])
def test_loss_and_gradient_match_trl(loss_type, beta, off_policy):
    logprobs, mask, rewards, old, ref = make_batch(1)
    old = old if off_policy else None
    theirs = trl_loss(logprobs, mask, trl_advantages(rewards, "group"), loss_type, beta, old, ref)
    ours = grpo_loss(
        logprobs,
        mask,
        rewards,
        GROUP,
        loss_type=loss_type,
        old_logprobs=old,
        ref_logprobs=ref,
        kl_coef=beta,
        max_completion_length=LENGTH,
    ).loss
    assert abs(ours.item() - theirs.item()) < 1e-6
    (g_ours,) = torch.autograd.grad(ours, logprobs)
    (g_theirs,) = torch.autograd.grad(theirs, logprobs)
    torch.testing.assert_close(g_ours, g_theirs, rtol=0, atol=1e-6)
