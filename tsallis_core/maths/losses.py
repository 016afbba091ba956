"""The Tsallis loss continuum as pure tensor functions (see docs/maths.md).

Layout of every batch: ``N = B * M`` sampled completions for ``B`` prompts, ``M`` per prompt,
the rows of one group contiguous (rows ``g*M .. g*M+M-1`` belong to prompt ``g``);
``L`` is the padded completion length. Every loss takes per-token log-probs ``[N, L]``, a 0/1
completion mask ``[N, L]`` and rewards ``[N]`` in [0, 1], and returns a :class:`LossOutput`:
a scalar to *minimise* and named diagnostics. Nothing here knows about models or files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

Aggregation = Literal["seq_sum", "seq_mean", "token_mean"]
Baseline = Literal["none", "mean", "loo"]
AGGREGATIONS = ("seq_sum", "seq_mean", "token_mean")
BASELINES = ("none", "mean", "loo")


@dataclass
class LossOutput:
    loss: Tensor  # [] scalar to minimise
    diagnostics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# checks: every public function validates its arguments and names the one that is wrong
# ---------------------------------------------------------------------------------------------


def check_q(q: float, name: str = "q") -> float:
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or not 0.0 <= q <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] (0 = RLVR, 1 = log-likelihood), got {q!r}")
    return float(q)


def check_batch(logprobs: Tensor, mask: Tensor, rewards: Tensor, group_size: int, min_group_size: int = 1) -> None:
    """Validate the shared batch layout; raise ValueError naming the argument at fault."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < min_group_size:
        raise ValueError(f"group_size must be an integer >= {min_group_size} for this loss, got {group_size!r}")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must have shape [N, L] (completions x tokens), got {tuple(logprobs.shape)}")
    if mask.shape != logprobs.shape:
        raise ValueError(f"mask must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(mask.shape)}")
    n = logprobs.shape[0]
    if n == 0:
        raise ValueError("logprobs is an empty batch: need at least one group of completions")
    if rewards.dim() != 1 or rewards.shape[0] != n:
        raise ValueError(f"rewards must have shape [N] = [{n}] (one per completion), got {tuple(rewards.shape)}")
    if n % group_size:
        raise ValueError(f"the batch of {n} completions is not divisible by group_size={group_size}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; rewards must be finite numbers in [0, 1]")
    if ((rewards < 0) | (rewards > 1)).any():
        raise ValueError(
            f"rewards must lie in [0, 1] (verifier outputs), got min {rewards.min().item():g}, max {rewards.max().item():g}"
        )


def _check_choice(value: str, name: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


# ---------------------------------------------------------------------------------------------
# the q-logarithm, the objective and the amplification
# ---------------------------------------------------------------------------------------------


def ln_q(u: Tensor, q: float) -> Tensor:
    """Tsallis q-logarithm ``(u^(1-q) - 1) / (1 - q)``, ``ln u`` at q = 1. Elementwise.

    Written as ``expm1((1-q) ln u) / (1-q)``, which stays accurate as q -> 1 (expm1 is exact to
    relative precision for small arguments) and is finite at u = 0 for q < 1 (-1/(1-q)).
    Its derivative is ``u^-q`` for every q, so autograd gives the amplified gradient.
    """
    q = check_q(q)
    if q == 1.0:
        return torch.log(u)
    return torch.expm1((1.0 - q) * torch.log(u)) / (1.0 - q)


def j_q(success_prob: Tensor, q: float) -> Tensor:
    """The objective ``J_q = mean_x ln_q P(x)`` (to maximise) from per-prompt success probabilities [B]."""
    return ln_q(success_prob, q).mean()


def group_success_rate(rewards: Tensor, group_size: int) -> Tensor:
    """``P_hat`` per group: [N] -> [B]."""
    return rewards.view(-1, group_size).mean(dim=1)


def amplification(success_rate: Tensor, q: float) -> Tensor:
    """Stop-gradient per-group scalar ``P_hat^-q`` [B] -> [B]; groups with no success get 0.

    At most ``M^q`` for a group of M with one success.
    """
    q = check_q(q)
    p = success_rate.detach()
    return torch.where(p > 0, p.clamp_min(torch.finfo(p.dtype).tiny).pow(-q), torch.zeros_like(p))


def group_baseline(rewards: Tensor, group_size: int, kind: Baseline) -> Tensor:
    """Per-completion baseline b_i [N] -> [N]: none (0), group mean, or leave-one-out mean.

    Leave-one-out keeps the gradient estimate unbiased; the group mean includes the sample
    itself and scales the expected gradient by (M-1)/M.
    """
    _check_choice(kind, "baseline", BASELINES)
    grouped = rewards.view(-1, group_size)  # [B, M]
    if kind == "none":
        return torch.zeros_like(rewards)
    if kind == "mean":
        return grouped.mean(dim=1, keepdim=True).expand_as(grouped).reshape(-1)
    if group_size < 2:
        raise ValueError("baseline='loo' needs group_size >= 2 (it averages the other samples of the group)")
    loo = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # [B, M]
    return loo.reshape(-1)


# ---------------------------------------------------------------------------------------------
# shared pieces: aggregation, clipped surrogate, KL
# ---------------------------------------------------------------------------------------------


def aggregate(per_token_loss: Tensor, mask: Tensor, mode: Aggregation, max_length: int | None = None) -> Tensor:
    """Reduce a per-token loss [N, L] to a scalar.

    - ``seq_sum``: sum over each completion's tokens, mean over completions (the estimator of
      docs/maths.md exactly: ``(1/N) sum_i w_i grad log pi(z_i)``);
    - ``seq_mean``: mean over each completion's tokens, mean over completions (TRL loss_type="grpo");
    - ``token_mean``: sum over all tokens / number of completion tokens in the batch
      (TRL loss_type="dapo"/"bnpo" on one process);
    ``max_length`` given: sum / (N * max_length) (TRL loss_type="dr_grpo").
    """
    masked = per_token_loss * mask
    if max_length is not None:
        return masked.sum() / (mask.shape[0] * max_length)
    _check_choice(mode, "aggregation", AGGREGATIONS)
    if mode == "seq_sum":
        return masked.sum(dim=1).mean()
    if mode == "seq_mean":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)).mean()
    return masked.sum() / mask.sum().clamp_min(1.0)


def clipped_surrogate(
    logprobs: Tensor, old_logprobs: Tensor | None, advantages: Tensor, clip_low: float | None, clip_high: float | None
) -> tuple[Tensor, Tensor]:
    """PPO-style per-token loss ``-min(r A, clip(r) A)`` with ``r = exp(logp - old_logp)``.

    logprobs [N, L], advantages [N] -> (per-token loss [N, L], clipped indicator [N, L]).
    On-policy (``old_logprobs`` None) ``r = 1`` and the gradient is ``-A grad logp``.
    ``clip_low``/``clip_high`` None: no clipping.
    """
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    ratio = torch.exp(logprobs - old)  # [N, L]
    adv = advantages.unsqueeze(1)  # [N, 1]
    unclipped = ratio * adv
    if clip_low is None and clip_high is None:
        return -unclipped, torch.zeros_like(ratio, dtype=torch.bool)
    lo = 1.0 - (clip_low if clip_low is not None else math.inf)
    hi = 1.0 + (clip_high if clip_high is not None else math.inf)
    clipped = torch.clamp(ratio, lo, hi) * adv
    is_clipped = ((ratio < lo) & (adv < 0)) | ((ratio > hi) & (adv > 0))
    return -torch.min(unclipped, clipped), is_clipped


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token ``KL(pi || ref)`` estimator ``exp(ref - logp) - (ref - logp) - 1`` (>= 0) [N, L]."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1.0


def _masked_mean(x: Tensor, mask: Tensor) -> float:
    return ((x * mask).sum() / mask.sum().clamp_min(1.0)).item()


def group_diagnostics(rewards: Tensor, group_size: int, q: float | None = None) -> dict[str, float]:
    """Success rate, share of groups with no success and (given q) the mean and max amplification.

    The mean amplification is over groups with a success (the others contribute nothing).
    """
    p_hat = group_success_rate(rewards, group_size)
    diag = {"success_rate": rewards.mean().item(), "frac_zero_success": (p_hat == 0).float().mean().item()}
    if q is not None:
        amp = amplification(p_hat, q)
        active = amp[amp > 0]
        diag.update(amp_mean=active.mean().item() if active.numel() else 0.0, amp_max=amp.max().item())
    return diag


# ---------------------------------------------------------------------------------------------
# the estimators
# ---------------------------------------------------------------------------------------------


def garl_loss(
    logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_size: int,  # [N, L], [N, L], [N]; N = groups * group_size
    q: float,
    baseline: Baseline = "loo",
    aggregation: Aggregation = "seq_sum",
    old_logprobs: Tensor | None = None,
    clip_eps: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
) -> LossOutput:
    """Gradient-Amplified RL: ``g = P_hat^-q (1/M) sum_i (R_i - b_i) grad log pi(z_i)`` per group.

    logprobs, mask, old_logprobs, ref_logprobs [N, L]; rewards [N]. The amplification is a
    stop-gradient per-group scalar; groups with no success contribute nothing. ``clip_eps``
    enables the PPO ratio clip for several updates per rollout batch (``old_logprobs`` from
    the sampling policy); ``kl_coef`` > 0 adds ``kl_coef * KL(pi || ref)`` per token.
    """
    q = check_q(q)
    check_batch(logprobs, mask, rewards, group_size, min_group_size=2 if baseline == "loo" else 1)
    _check_choice(aggregation, "aggregation", AGGREGATIONS)
    p_hat = group_success_rate(rewards, group_size)  # [B]
    amp = amplification(p_hat, q)  # [B]
    advantages = amp.repeat_interleave(group_size) * (rewards - group_baseline(rewards, group_size, baseline))  # [N]
    return _policy_gradient_loss(
        logprobs,
        mask,
        advantages.detach(),
        aggregation,
        None,
        old_logprobs,
        clip_eps,
        clip_eps,
        ref_logprobs,
        kl_coef,
        {**group_diagnostics(rewards, group_size, q), "q": q},
    )


def _policy_gradient_loss(
    logprobs, mask, advantages, aggregation, max_length, old_logprobs, clip_low, clip_high, ref_logprobs, kl_coef, diag
) -> LossOutput:
    per_token, is_clipped = clipped_surrogate(logprobs, old_logprobs, advantages, clip_low, clip_high)
    diag = {**diag, "clip_frac": _masked_mean(is_clipped.float(), mask)}
    if kl_coef:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs (per-token log-probs of the reference policy)")
        if ref_logprobs.shape != logprobs.shape:
            raise ValueError(f"ref_logprobs must have shape {tuple(logprobs.shape)}, got {tuple(ref_logprobs.shape)}")
        kl = kl_k3(logprobs, ref_logprobs)
        per_token = per_token + kl_coef * kl
        diag["kl"] = _masked_mean(kl.detach(), mask)
    loss = aggregate(per_token, mask, aggregation, max_length)
    diag["loss"] = loss.item()
    return LossOutput(loss, diag)


def paft_resample_counts(
    rewards: Tensor, group_size: int, num_samples: int, generator: torch.Generator | None
) -> Tensor:
    """Importance-resample each group from the posterior: counts [N] of ``num_samples`` draws per group.

    Draws with replacement with self-normalised weights ``R_i / sum_j R_j`` (uniform over the
    successes for 0/1 rewards); groups with no success draw nothing.
    """
    grouped = rewards.view(-1, group_size)  # [B, M]
    counts = torch.zeros_like(grouped)
    has_success = grouped.sum(dim=1) > 0
    if has_success.any():
        draws = torch.multinomial(grouped[has_success], num_samples, replacement=True, generator=generator)  # [B', S]
        counts[has_success] = torch.zeros_like(grouped[has_success]).scatter_add_(
            1, draws, torch.ones_like(draws, dtype=grouped.dtype)
        )
    return counts.reshape(-1)


def paft_loss(
    logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_size: int,  # [N, L], [N, L], [N]; N = groups * group_size
    q: float,
    resample_counts: Tensor | None = None,
    aggregation: Aggregation = "seq_sum",
) -> LossOutput:
    """Posterior-Attenuated Fine-Tuning: SFT on posterior-resampled completions, weighted ``P_hat^(1-q)``.

    Per group: ``loss_g = P_hat^(1-q) * (1/S) sum_k NLL(z_{k})`` over ``S`` resampled completions.
    ``resample_counts`` [N] (from :func:`paft_resample_counts`) says how often each completion was
    drawn; None uses the expected counts ``S R_i / sum_j R_j``, the exact average over the
    resampling (its Rao-Blackwellisation). q = 1 is SFT on the model's own successes.
    """
    q = check_q(q)
    check_batch(logprobs, mask, rewards, group_size)
    _check_choice(aggregation, "aggregation", AGGREGATIONS)
    grouped = rewards.view(-1, group_size)  # [B, M]
    p_hat = grouped.mean(dim=1)  # [B]
    if resample_counts is None:
        share = grouped / grouped.sum(dim=1, keepdim=True).clamp_min(torch.finfo(rewards.dtype).tiny)  # [B, M]
    else:
        if resample_counts.shape != rewards.shape:
            raise ValueError(
                f"resample_counts must have shape {tuple(rewards.shape)}, got {tuple(resample_counts.shape)}"
            )
        counts = resample_counts.view(-1, group_size).to(rewards.dtype)
        share = counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)
    attenuation = torch.where(p_hat > 0, p_hat.pow(1.0 - q), torch.zeros_like(p_hat))  # [B]
    # (1/B) sum_g a_g sum_i share_i NLL_i  ==  (1/N) sum_i (M a_g share_i) NLL_i, the seq_sum form
    seq_weight = (group_size * attenuation.unsqueeze(1) * share).reshape(-1).detach()  # [N]
    per_token = -seq_weight.unsqueeze(1) * logprobs
    loss = aggregate(per_token, mask, aggregation)
    diag = {
        **group_diagnostics(rewards, group_size, q),
        "q": q,
        "attenuation_mean": attenuation[p_hat > 0].mean().item() if (p_hat > 0).any() else 0.0,
        "loss": loss.item(),
    }
    return LossOutput(loss, diag)


GrpoLossType = Literal["grpo", "bnpo", "dapo", "dr_grpo"]
ScaleRewards = Literal["group", "batch", "none"]
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")


def grpo_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-4) -> Tensor:
    """GRPO advantages ``(R - mean_group) / (std + eps)`` [N] -> [N], as TRL computes them.

    std is the unbiased (Bessel-corrected) standard deviation of the group ("group"), of the
    whole batch ("batch"), or no scaling ("none"). For 0/1 rewards the group std is
    ``sqrt(M/(M-1) P_hat (1-P_hat))``: an implicit amplification of roughly ``P_hat^-1/2``.
    """
    _check_choice(scale_rewards, "scale_rewards", SCALE_REWARDS)
    grouped = rewards.view(-1, group_size)  # [B, M]
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "none":
        return centred
    std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1) if scale_rewards == "group" else rewards.std()
    return centred / (std + eps)


def grpo_loss(
    logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_size: int,  # [N, L], [N, L], [N]; N = groups * group_size
    loss_type: str = "dapo",
    scale_rewards: str = "group",
    old_logprobs: Tensor | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    max_completion_length: int | None = None,
) -> LossOutput:
    """The GRPO baseline, equal to TRL GRPOTrainer's loss (its defaults: loss_type="dapo", scale_rewards="group").

    loss_type: "grpo" (per-sequence token mean), "bnpo"/"dapo" (token mean over the batch on
    one process), "dr_grpo" (sum / (N * max_completion_length)).
    """
    check_batch(logprobs, mask, rewards, group_size, min_group_size=2)
    _check_choice(loss_type, "loss_type", GRPO_LOSS_TYPES)
    advantages = grpo_advantages(rewards, group_size, scale_rewards)
    aggregation = "seq_mean" if loss_type == "grpo" else "token_mean"
    max_length = (max_completion_length or logprobs.shape[1]) if loss_type == "dr_grpo" else None
    high = clip_eps if clip_eps_high is None else clip_eps_high
    return _policy_gradient_loss(
        logprobs,
        mask,
        advantages,
        aggregation,
        max_length,
        old_logprobs,
        clip_eps,
        high,
        ref_logprobs,
        kl_coef,
        group_diagnostics(rewards, group_size),
    )


def sft_loss(logprobs: Tensor, mask: Tensor, aggregation: Aggregation = "token_mean") -> LossOutput:
    """Negative log-likelihood of target tokens (SFT warm-up). logprobs, mask [N, L] -> scalar."""
    if logprobs.dim() != 2 or logprobs.shape[0] == 0:
        raise ValueError(f"logprobs must have shape [N, L] with N >= 1, got {tuple(logprobs.shape)}")
    if mask.shape != logprobs.shape:
        raise ValueError(f"mask must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(mask.shape)}")
    loss = aggregate(-logprobs, mask, aggregation)
    return LossOutput(loss, {"loss": loss.item(), "nll_per_token": _masked_mean(-logprobs.detach(), mask)})
