"""ln_q, the amplification, aggregation and argument checks of tsallis_core.maths.losses."""

import math

import pytest
import torch

from tsallis_core.maths.estimators import get_loss
from tsallis_core.maths.losses import (
    aggregate,
    amplification,
    garl_loss,
    grpo_loss,
    j_q,
    ln_q,
    paft_loss,
    sft_loss,
)


@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.9])
def test_ln_q_matches_definition(q):
    u = torch.tensor([0.01, 0.2, 1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(ln_q(u, q), (u ** (1 - q) - 1) / (1 - q))


def test_ln_q_endpoints():
    u = torch.tensor([0.01, 0.5, 2.0], dtype=torch.float64)
    torch.testing.assert_close(ln_q(u, 0.0), u - 1)
    torch.testing.assert_close(ln_q(u, 1.0), torch.log(u))


def test_ln_q_is_continuous_and_accurate_as_q_goes_to_one():
    u = torch.tensor([1e-8, 1e-3, 0.5, 5.0], dtype=torch.float64)
    for eps in (1e-4, 1e-8, 1e-12):
        # ln_q(u) = ln u + (1-q) (ln u)^2 / 2 + O((1-q)^2)
        expected = torch.log(u) + eps * torch.log(u) ** 2 / 2
        torch.testing.assert_close(ln_q(u, 1 - eps), expected, rtol=1e-6 if eps == 1e-4 else 1e-10, atol=0)


def test_ln_q_at_zero_probability():
    zero = torch.tensor([0.0], dtype=torch.float64)
    assert ln_q(zero, 0.5).item() == pytest.approx(-2.0)  # -1 / (1 - q), finite
    assert ln_q(zero, 0.999999).item() == pytest.approx(-1e6, rel=1e-6)
    assert ln_q(zero, 1.0).item() == -math.inf


@pytest.mark.parametrize("q", [0.0, 0.4, 1.0])
def test_derivative_of_ln_q_is_u_to_minus_q(q):
    u = torch.tensor([0.05, 0.3, 0.9], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(ln_q(u, q).sum(), u)
    torch.testing.assert_close(grad, u.detach() ** -q)


def test_j_q_is_mean_of_ln_q():
    p = torch.tensor([0.1, 0.4], dtype=torch.float64)
    assert j_q(p, 0.5).item() == pytest.approx(((0.1**0.5 - 1) / 0.5 + (0.4**0.5 - 1) / 0.5) / 2)


def test_amplification_values_and_zero_groups():
    p = torch.tensor([0.0, 0.125, 1.0], requires_grad=True)
    amp = amplification(p, 0.5)
    torch.testing.assert_close(amp, torch.tensor([0.0, 0.125**-0.5, 1.0]))
    assert not amp.requires_grad  # stop-gradient


def test_zero_success_groups_contribute_nothing():
    logprobs = (-torch.rand(8, 3)).requires_grad_(True)
    rewards = torch.tensor([0.0, 0, 0, 0, 1, 0, 0, 0])
    for loss in (
        garl_loss(logprobs, torch.ones(8, 3), rewards, 4, 0.75, "loo").loss,
        paft_loss(logprobs, torch.ones(8, 3), rewards, 4, 0.75).loss,
    ):
        (grad,) = torch.autograd.grad(loss, logprobs)
        assert torch.all(grad[:4] == 0) and grad[4:].abs().sum() > 0


def test_garl_exact_value_one_group():
    # group of 4, rewards 1,0,0,0: P_hat = 1/4, amp = 4^q; loo baselines 0, 1/3, 1/3, 1/3
    logprobs = torch.tensor([[-1.0, -1.0], [-2.0, 0.0], [-0.5, -0.5], [-3.0, -1.0]], requires_grad=True)
    out = garl_loss(logprobs, torch.ones(4, 2), torch.tensor([1.0, 0, 0, 0]), 4, q=0.5, baseline="loo")
    (grad,) = torch.autograd.grad(out.loss, logprobs)
    advantages = torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]) * 4**0.5
    torch.testing.assert_close(grad, -(advantages / 4).unsqueeze(1).expand(4, 2))
    assert out.diagnostics["success_rate"] == 0.25 and out.diagnostics["amp_max"] == pytest.approx(2.0)


def test_aggregations():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert aggregate(x, mask, "seq_sum").item() == pytest.approx((3 + 15) / 2)
    assert aggregate(x, mask, "seq_mean").item() == pytest.approx((1.5 + 5) / 2)
    assert aggregate(x, mask, "token_mean").item() == pytest.approx(18 / 5)
    assert aggregate(x, mask, "seq_sum", max_length=4).item() == pytest.approx(18 / 8)


def test_ratio_clipping_stops_gradient_beyond_the_trust_region():
    logprobs = torch.zeros(2, 1, requires_grad=True)
    old = torch.tensor([[-1.0], [0.0]])  # ratio e for row 0 (beyond 1.2), 1 for row 1
    rewards = torch.tensor([1.0, 0.0])
    out = garl_loss(logprobs, torch.ones(2, 1), rewards, 2, 0.0, "loo", old_logprobs=old, clip_eps=0.2)
    (grad,) = torch.autograd.grad(out.loss, logprobs)
    assert grad[0].item() == 0.0 and grad[1].item() != 0.0
    assert out.diagnostics["clip_frac"] == 0.5


def test_kl_term_adds_penalty_and_diagnostic():
    logprobs = -torch.rand(4, 3)
    ref = logprobs - 0.5
    base = garl_loss(logprobs, torch.ones(4, 3), torch.tensor([1.0, 0, 1, 0]), 2, 0.5).loss
    out = garl_loss(logprobs, torch.ones(4, 3), torch.tensor([1.0, 0, 1, 0]), 2, 0.5, ref_logprobs=ref, kl_coef=0.1)
    assert out.loss.item() > base.item() and out.diagnostics["kl"] == pytest.approx(math.exp(-0.5) + 0.5 - 1, rel=1e-5)


def test_sft_loss_is_token_nll():
    logprobs = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert sft_loss(logprobs, mask).loss.item() == pytest.approx(2.0)


# ------------------------------------------------------------------ bad input


def _batch(n=4, length=3):
    return -torch.rand(n, length), torch.ones(n, length), torch.tensor([1.0, 0.0] * (n // 2))


@pytest.mark.parametrize("q", [-0.1, 1.5, float("nan"), "0.5", True])
def test_q_out_of_range(q):
    lp, mask, r = _batch()
    with pytest.raises(ValueError, match=r"q must be a number in \[0, 1\]"):
        garl_loss(lp, mask, r, 2, q)
    with pytest.raises(ValueError, match="q must be"):
        ln_q(torch.tensor([0.5]), q)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_rewards(bad):
    lp, mask, r = _batch()
    r[1] = bad
    with pytest.raises(ValueError, match="rewards contain NaN or inf"):
        paft_loss(lp, mask, r, 2, 0.5)


def test_rewards_outside_unit_interval():
    lp, mask, r = _batch()
    r[0] = 2.0
    with pytest.raises(ValueError, match=r"rewards must lie in \[0, 1\]"):
        garl_loss(lp, mask, r, 2, 0.5)


def test_group_size_too_small_for_estimator():
    lp, mask, r = _batch()
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        garl_loss(lp, mask, r, 1, 0.5, baseline="loo")
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        grpo_loss(lp, mask, r, 1)


def test_batch_not_divisible_by_group_size():
    lp, mask, r = _batch(n=6)
    with pytest.raises(ValueError, match="not divisible by group_size=4"):
        garl_loss(lp, mask, r, 4, 0.5)


def test_shapes_that_do_not_match():
    lp, mask, r = _batch()
    with pytest.raises(ValueError, match="mask must have the shape"):
        garl_loss(lp, mask[:, :2], r, 2, 0.5)
    with pytest.raises(ValueError, match=r"rewards must have shape \[N\] = \[4\]"):
        garl_loss(lp, mask, r[:3], 2, 0.5)
    with pytest.raises(ValueError, match=r"logprobs must have shape \[N, L\]"):
        garl_loss(lp[0], mask, r, 2, 0.5)


def test_empty_batch():
    with pytest.raises(ValueError, match="empty batch"):
        garl_loss(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0), 2, 0.5)
    with pytest.raises(ValueError, match="N >= 1"):
        sft_loss(torch.zeros(0, 3), torch.zeros(0, 3))


def test_unknown_names():
    lp, mask, r = _batch()
    with pytest.raises(ValueError, match="baseline must be one of none, mean, loo"):
        garl_loss(lp, mask, r, 2, 0.5, baseline="median")
    with pytest.raises(ValueError, match="aggregation must be one of"):
        paft_loss(lp, mask, r, 2, 0.5, aggregation="max")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        grpo_loss(lp, mask, r, 2, loss_type="ppo")
    with pytest.raises(ValueError, match="estimator must be one of garl, paft, grpo, sft"):
        get_loss("ppo")


def test_kl_without_reference():
    lp, mask, r = _batch()
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logprobs"):
        garl_loss(lp, mask, r, 2, 0.5, kl_coef=0.1)
