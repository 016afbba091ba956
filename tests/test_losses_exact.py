"""Exact checks of the estimators against the enumerated tiny policy (tests/tiny_policy.py)."""

import functools
import math

import pytest
import torch
from tiny_policy import (
    SEQUENCES,
    expected_estimate,
    make_params,
    sequence_jacobian,
    success_probability,
    token_logprobs,
)

from tsallis_core.maths.losses import garl_loss, ln_q, paft_loss, paft_resample_counts, sft_loss

# completions 101, 111 and 011 are correct: P = 0.548 at the seed below (M P >> 1 by M = 8,
# so the 1/M regime shows; the zero-success term (1-P)^M is small there)
REWARDS = torch.tensor([1.0 if z in {(1, 0, 1), (1, 1, 1), (0, 1, 1)} else 0.0 for z in SEQUENCES], dtype=torch.float64)
QS = [0.0, 0.25, 0.5, 0.75, 1.0]


def exact_grad_jq(params, q):
    p = success_probability(params, REWARDS)
    (grad,) = torch.autograd.grad(ln_q(p, q), params)
    return grad.reshape(-1)


@pytest.mark.parametrize("q", QS)
def test_autograd_of_ln_q_p_is_amplified_grad_p(q):
    params = make_params()
    p = success_probability(params, REWARDS)
    (grad_p,) = torch.autograd.grad(p, params, retain_graph=True)
    torch.testing.assert_close(
        exact_grad_jq(params, q), (p.detach() ** -q * grad_p).reshape(-1), rtol=1e-12, atol=1e-14
    )


def test_all_q_share_one_direction_per_example():
    params = make_params()
    grads = [exact_grad_jq(params, q) for q in QS]
    for g in grads[1:]:
        assert torch.nn.functional.cosine_similarity(g, grads[0], dim=0).item() == pytest.approx(1.0, abs=1e-12)
    # and the same for one sampled group: q changes only the per-group scalar
    logprobs = token_logprobs(params).detach()[[0, 5, 7, 2]].clone().requires_grad_(True)
    rewards = REWARDS[[0, 5, 7, 2]]
    directions = []
    for q in QS:
        (g,) = torch.autograd.grad(garl_loss(logprobs, torch.ones_like(logprobs), rewards, 4, q, "loo").loss, logprobs)
        directions.append(g.reshape(-1))
    for d in directions[1:]:
        assert torch.nn.functional.cosine_similarity(d, directions[0], dim=0).item() == pytest.approx(1.0, abs=1e-12)


def test_garl_q0_without_baseline_is_reinforce():
    params = make_params()
    picks = [5, 0, 7, 3, 5, 1]  # two groups of three
    logprobs_table = token_logprobs(params)
    logprobs = logprobs_table[picks]
    rewards = REWARDS[picks]
    loss = garl_loss(logprobs, torch.ones_like(logprobs), rewards, 3, q=0.0, baseline="none").loss
    (ours,) = torch.autograd.grad(loss, params, retain_graph=True)
    reinforce = -(rewards * logprobs.sum(dim=1)).mean()  # -(1/N) sum_i R_i log pi(z_i)
    (expected,) = torch.autograd.grad(reinforce, params)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("baseline", ["none", "loo"])
def test_garl_q0_is_unbiased_for_grad_p(baseline):
    params = make_params()
    loss_fn = functools.partial(garl_loss, q=0.0, baseline=baseline)
    torch.testing.assert_close(
        expected_estimate(loss_fn, params, REWARDS, 3), exact_grad_jq(params, 0.0), rtol=1e-9, atol=1e-12
    )


def test_group_mean_baseline_scales_expectation_by_m_minus_1_over_m():
    params = make_params()
    loss_fn = functools.partial(garl_loss, q=0.0, baseline="mean")
    torch.testing.assert_close(
        expected_estimate(loss_fn, params, REWARDS, 4), 0.75 * exact_grad_jq(params, 0.0), rtol=1e-9, atol=1e-12
    )


ESTIMATORS = {
    "garl-none": functools.partial(garl_loss, baseline="none"),
    "garl-loo": functools.partial(garl_loss, baseline="loo"),
    "paft": paft_loss,
}


@pytest.mark.parametrize(("name", "q"), [("garl-none", 0.5), ("paft", 0.5), ("garl-loo", 0.5), ("garl-loo", 1.0)])
def test_bias_vanishes_like_one_over_m(name, q):
    """E[estimate] -> grad J_q as M grows, the relative bias falling as 1/M (ratio 1.5 from M=8 to 12)."""
    params = make_params()
    truth = exact_grad_jq(params, q)
    bias = {}
    for m in (2, 4, 8, 12):
        estimate = expected_estimate(functools.partial(ESTIMATORS[name], q=q), params, REWARDS, m)
        bias[m] = ((estimate - truth).norm() / truth.norm()).item()
    assert bias[4] > bias[8] > bias[12]
    assert bias[12] < 0.1
    assert 1.3 < bias[8] / bias[12] < 1.8, bias


@pytest.mark.parametrize("name", ["garl-none", "paft"])
@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("m", [2, 4, 8])
def test_no_baseline_expectation_closed_form(name, q, m):
    """For 0/1 rewards and no baseline, E[estimate] = E_k[(k/M)^(1-q); k >= 1] * grad log P, k ~ Bin(M, P).

    Given k successes they are i.i.d. posterior samples, so their mean score is unbiased for
    grad log P; all the bias is Jensen's gap in P_hat^(1-q) (order q(1-q)/(M P)) plus the
    zero-success groups ((1-P)^M): at q = 1 only the latter is left.
    """
    params = make_params()
    p = success_probability(params, REWARDS).item()
    factor = sum(math.comb(m, k) * p**k * (1 - p) ** (m - k) * (k / m) ** (1 - q) for k in range(1, m + 1))
    estimate = expected_estimate(functools.partial(ESTIMATORS[name], q=q), params, REWARDS, m)
    torch.testing.assert_close(estimate, factor * exact_grad_jq(params, 1.0), rtol=1e-9, atol=1e-12)


def test_paft_expected_counts_equal_mean_of_resampled_counts():
    torch.manual_seed(0)
    rewards = torch.tensor([1.0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0], dtype=torch.float64)
    logprobs = -torch.rand(12, 5, dtype=torch.float64)
    mask = torch.ones_like(logprobs)
    exact = paft_loss(logprobs, mask, rewards, 4, q=0.5).loss
    generator = torch.Generator().manual_seed(1)
    draws = torch.stack(
        [
            paft_loss(logprobs, mask, rewards, 4, 0.5, paft_resample_counts(rewards, 4, 4, generator)).loss
            for _ in range(4000)
        ]
    )
    # the loss is linear in the counts, so the resampled losses average to the exact one
    assert abs(draws.mean() - exact) < 4 * draws.std() / 4000**0.5


def test_paft_q1_is_sft_on_own_successes():
    params = make_params()
    picks = [5, 0, 7, 2]  # one group, successes 5 (101) and 7 (111)
    logprobs = token_logprobs(params)[picks]
    mask = torch.ones_like(logprobs)
    paft = paft_loss(logprobs, mask, REWARDS[picks], 4, q=1.0).loss
    successes = logprobs[[0, 2]]
    sft = sft_loss(successes, torch.ones_like(successes), aggregation="seq_sum").loss
    torch.testing.assert_close(paft, sft)
    (g_paft,) = torch.autograd.grad(paft, params, retain_graph=True)
    (g_sft,) = torch.autograd.grad(sft, params)
    torch.testing.assert_close(g_paft, g_sft)


def test_garl_amplification_is_capped_by_m_to_the_q():
    rewards = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])
    logprobs = -torch.rand(8, 3)
    out = garl_loss(logprobs, torch.ones_like(logprobs), rewards, 8, q=0.75, baseline="none")
    assert out.diagnostics["amp_max"] == pytest.approx(8**0.75)


def test_jacobian_helper_matches_finite_differences():
    params = make_params()
    jac = sequence_jacobian(params)
    eps = 1e-6
    with torch.no_grad():
        bumped = params.clone()
        bumped.view(-1)[3] += eps
        fd = (token_logprobs(bumped).sum(1) - token_logprobs(params).sum(1)) / eps
    torch.testing.assert_close(jac[:, 3], fd, rtol=1e-4, atol=1e-6)
