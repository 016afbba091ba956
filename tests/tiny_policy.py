"""A tiny autoregressive policy whose every completion can be listed, so P is exact.

Vocabulary {0, 1}, completions of length 3 (8 of them), one logit row per prefix (7 prefixes).
"""

from __future__ import annotations

import itertools
import math

import torch

VOCAB = 2
LENGTH = 3
SEQUENCES = list(itertools.product(range(VOCAB), repeat=LENGTH))  # 8 completions
PREFIXES = [p for n in range(LENGTH) for p in itertools.product(range(VOCAB), repeat=n)]
PREFIX_INDEX = {p: i for i, p in enumerate(PREFIXES)}


def make_params(seed: int = 0, scale: float = 0.8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(len(PREFIXES), VOCAB, generator=g, dtype=torch.float64)).requires_grad_(True)


def token_logprobs(params: torch.Tensor) -> torch.Tensor:
    """[8, 3]: log pi(z_t | z_<t) for every completion z and position t."""
    logp = torch.log_softmax(params, dim=-1)  # [7, 2]
    rows = [torch.stack([logp[PREFIX_INDEX[z[:t]], z[t]] for t in range(LENGTH)]) for z in SEQUENCES]
    return torch.stack(rows)


def success_probability(params: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Exact P = sum_z pi(z) R(z)."""
    return (token_logprobs(params).sum(dim=1).exp() * rewards).sum()


def sequence_jacobian(params: torch.Tensor) -> torch.Tensor:
    """[8, P]: grad_theta log pi(z) for every completion z."""
    seq_logp = token_logprobs(params).sum(dim=1)
    return torch.stack(
        [torch.autograd.grad(seq_logp[i], params, retain_graph=True)[0].reshape(-1) for i in range(len(SEQUENCES))]
    )


def all_groups(group_size: int, probs: torch.Tensor):
    """Every multiset of ``group_size`` completions with its probability under i.i.d. sampling.

    Returns (indices [G, M] of completions, probability [G]).
    """
    groups, weights = [], []
    for combo in itertools.combinations_with_replacement(range(len(SEQUENCES)), group_size):
        counts = [combo.count(i) for i in set(combo)]
        coef = math.factorial(group_size) / math.prod(math.factorial(c) for c in counts)
        groups.append(combo)
        weights.append(coef * math.prod(probs[i].item() for i in combo))
    return torch.tensor(groups), torch.tensor(weights, dtype=torch.float64)


def expected_estimate(loss_fn, params: torch.Tensor, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Exact expectation over all groups of size M of the gradient *ascent* direction ``-grad loss``.

    ``loss_fn(logprobs [N, L], mask, rewards [N], group_size)`` is one of our losses; the batch
    holds every possible group once, and each group's share of the gradient is weighted by its
    probability. Uses dloss/dlogprobs (one backward) and the chain rule through ``sequence_jacobian``.
    """
    table = token_logprobs(params).detach()  # [8, 3]
    probs = table.sum(dim=1).exp()
    groups, weights = all_groups(group_size, probs)  # [G, M], [G]
    flat = groups.reshape(-1)  # [G*M]
    logprobs = table[flat].clone().requires_grad_(True)
    loss = loss_fn(logprobs, torch.ones_like(logprobs), rewards[flat], group_size).loss
    (coef,) = torch.autograd.grad(loss, logprobs)  # [G*M, 3]; the batch loss is the mean of per-group losses
    # under seq_sum dloss/dlogp is constant along a completion, so row i contributes c_i grad log pi(z_i)
    assert torch.allclose(coef, coef[:, :1].expand_as(coef))
    per_row = coef[:, 0] * len(groups) * weights.repeat_interleave(group_size)
    per_sequence = torch.zeros(len(SEQUENCES), dtype=torch.float64).index_add_(0, flat, per_row)
    return -(per_sequence @ sequence_jacobian(params))
