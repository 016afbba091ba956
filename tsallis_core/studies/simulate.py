"""A sampled-estimator simulator: the registry's estimators on a contextual bandit, between the gradient-flow
theory (``tsallis theory``) and the language model.

    tsallis simulate --params configs/simulate.yaml --out docs/simulate            # the map (cached per cell)
    tsallis simulate --params configs/simulate_small.yaml --out outputs/simulate   # the small map (minutes)
    tsallis simulate cell --optimizer sgd --p0 0.01 --group-size 8 --prompts 32 --seeds 3 --estimators grpo garl:0.75 --json

The bandit: ``prompts`` prompts, each a softmax over K answers with one right answer. A fixed prior logit on the
right answer sets each prompt's start success; the prompts come in difficulty strata (start success ``p0 * s``
for the stratum factors ``s``, normalised so that the mean start success is ``p0``), so every batch mixes hard
and easy prompts. The policy adds trainable logits to that prior: one vector per prompt (``tabular``, the
theory's setting) or a small MLP over a fixed random prompt encoding (``mlp``, shared parameters as in a model),
zero at the start either way.

Every step samples M answers per prompt, scores them, and calls the registry's own estimator
(``estimators.get_estimator(name).loss``) on a ``PolicyBatch`` with one token per completion. Independent runs
(estimators x lrs x seeds) are stacked along a leading run axis and go through ONE loss call per estimator: the
losses average over completions, so the loss of R stacked runs times R has, for each run's own parameters, that
run's gradient exactly. Success is the exact expected success (the softmax's probability of the right answer)
averaged over the prompts; steps to escape count the updates until it first reaches each threshold.

The lr of each estimator comes from a log grid (half-decade steps) widened while the best lr sits on an edge.
The score of an lr is the median over seeds of the steps to the target (a run that never escapes counts as the
step cap, one that diverges as the cap + 1), then their mean, then the final success. The grid is raced: an lr
whose median can no longer beat the best finished one stops early (exact for the ranking).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from tsallis_core.config import ConfigError, Section, validate_settings
from tsallis_core.maths.estimators import PolicyBatch, baseline_estimator, get_estimator
from tsallis_core.maths.losses import check_q, paft_resample_counts
from tsallis_core.maths.stats import bootstrap_median_ratio

BASELINE = baseline_estimator()  # the estimator every ratio divides by (the registry says which)
SATURATED_STEPS = 2  # GRPO escaping within this many steps: the tuned lr jumps at once, the ratio cannot exceed ~2


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------


class OptimizerSpec(Section):
    """One optimiser regime: the update rule and the centre of each estimator family's starting lr grid."""

    kind: Literal["sgd", "adamw"] = "sgd"
    eps: float = Field(1e-8, gt=0, description="AdamW eps")
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(0.0, ge=0, description="per-run global gradient-norm clip (0: none)")
    lr_center: dict[str, float] = Field(
        default_factory=lambda: {"default": 10.0},
        description="family (grpo, garl, paft) or 'default' -> centre of the lr grid",
    )

    @field_validator("lr_center")
    @classmethod
    def _has_default(cls, centers: dict[str, float]) -> dict[str, float]:
        if "default" not in centers or min(centers.values()) <= 0:
            raise ValueError(f"lr_center needs a positive 'default' (and optional grpo/garl/paft), got {centers}")
        return centers

    def center(self, estimator: str) -> float:
        return self.lr_center.get(estimator.split(":")[0], self.lr_center["default"])


def default_optimizers() -> dict[str, OptimizerSpec]:
    return {
        "sgd": OptimizerSpec(kind="sgd", lr_center={"default": 10.0}),
        "adamw": OptimizerSpec(kind="adamw", lr_center={"default": 0.03}),
        "adamw_large_eps": OptimizerSpec(kind="adamw", eps=1e-2, lr_center={"default": 0.1}),
    }


class SimulateConfig(Section):
    """``tsallis simulate``: the bandit, the runs, and the map's axes (every field overridable as key=value)."""

    out: str = Field("outputs/simulate", description="where results.json, the heatmap and cells/ go")
    policy: Literal["mlp", "tabular"] = Field("mlp", description="mlp: shared parameters; tabular: the theory's toy")
    num_answers: int = Field(64, ge=2, description="K answers per prompt, one right")
    prompts: int = Field(32, ge=1, description="prompts per step (the whole fixed prompt set, also the eval set)")
    strata: list[float] = Field(
        [3.0, 1.0, 1.0 / 3.0],
        min_length=1,
        description="relative start success of the difficulty strata (scaled to mean p0)",
    )
    hidden: int = Field(64, ge=1, description="MLP hidden width")
    encoding_dim: int = Field(16, ge=1, description="MLP prompt encoding size (fixed random Gaussian vectors)")
    target: float = Field(0.5, gt=0, lt=1, description="mean expected success that counts as escaped (the lr score)")
    thresholds: list[float] = Field([0.2, 0.5], min_length=1, description="success levels whose steps are recorded")
    estimators: list[str] = Field(
        ["garl:0.5", "garl:0.75", "garl:1", "paft:0.75", "paft:1"],
        description="compared with grpo, e.g. garl:0.75, paft:1",
    )
    baseline: Literal["loo", "mean", "none"] = Field("loo", description="GARL baseline")
    seeds: int = Field(5, ge=1)
    p0s: list[float] = Field([0.03, 0.01, 0.003, 0.001], min_length=1, description="mean start success of a cell")
    group_sizes: list[int] = Field([4, 8, 32, 128], min_length=1, description="M samples per prompt")
    optimizers: dict[str, OptimizerSpec] = Field(default_factory=default_optimizers)
    cap_scale: float = Field(3.0, gt=0, description="step cap = cap_scale / p0, clipped to [cap_min, cap_max]")
    cap_min: int = Field(300, ge=1)
    cap_max: int = Field(3000, ge=1)
    grid_points: int = Field(5, ge=1, description="points of the starting lr grid (half-decade steps)")
    widen_limit: int = Field(3, ge=0, description="widening rounds (2 more points each) while the best is on an edge")
    bootstrap: int = Field(2000, ge=100, description="resamples of the seeds for the median ratio's interval")
    task_seed: int = Field(0, description="seed of the prompt set (encodings, right answers)")

    @field_validator("estimators")
    @classmethod
    def _estimators(cls, names: list[str]) -> list[str]:
        for name in names:
            parse_estimator(name)
        return names

    @field_validator("p0s")
    @classmethod
    def _p0s(cls, p0s: list[float]) -> list[float]:
        if not all(0 < p < 0.5 for p in p0s):
            raise ValueError(f"every p0 must lie in (0, 0.5), got {p0s}")
        return p0s

    @field_validator("group_sizes")
    @classmethod
    def _group_sizes(cls, sizes: list[int]) -> list[int]:
        if min(sizes) < 2:
            raise ValueError(f"every group size must be >= 2 (GRPO and GARL-loo compare samples), got {sizes}")
        return sizes

    @model_validator(mode="after")
    def _checks(self) -> SimulateConfig:
        if not all(0 < t <= self.target for t in self.thresholds):
            raise ValueError(
                f"thresholds must lie in (0, target={self.target}] (a run stops at the target), got {self.thresholds}"
            )
        if max(self.p0s) >= min(self.thresholds):
            raise ValueError(f"every p0 must lie below the lowest threshold {min(self.thresholds)}, got {self.p0s}")
        if self.cap_min > self.cap_max:
            raise ValueError(f"cap_min ({self.cap_min}) must not exceed cap_max ({self.cap_max})")
        if max(self.strata) * 1.0 / float(np.mean(self.strata)) * max(self.p0s) >= 1:
            raise ValueError("the easiest stratum's start success p0 * s / mean(strata) must stay below 1")
        return self

    def cap(self, p0: float) -> int:
        return int(min(self.cap_max, max(self.cap_min, round(self.cap_scale / p0))))


def parse_estimator(name: str) -> tuple[str, float | None]:
    """``"garl:0.75"`` -> ("garl", 0.75); ``"grpo"`` -> ("grpo", None). A q is required by estimators with q."""
    family, _, q_text = name.partition(":")
    estimator = get_estimator(family)
    if not estimator.uses_q:
        if q_text:
            raise ValueError(f"{family} takes no q, got {name!r}")
        return family, None
    try:
        q = check_q(float(q_text)) if q_text else None
    except ValueError:
        raise ValueError(f"{name!r}: q must be a number in [0, 1], e.g. {family}:0.75") from None
    if q is None:
        raise ValueError(f"{name!r} needs a q, e.g. {family}:0.75")
    return family, q


def load_simulate(path: str | os.PathLike | None, overrides: list[str] | None = None, **fields: Any) -> SimulateConfig:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"simulate params file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"simulate params file {path} must hold a YAML mapping")
    return validate_settings(SimulateConfig, data, overrides, f"invalid simulate params {path or ''}".strip(), **fields)


# ---------------------------------------------------------------------------------------------
# the bandit and the policy (every tensor carries the run axis R first)
# ---------------------------------------------------------------------------------------------


def strata_start_success(p0: float, strata: list[float], prompts: int) -> Tensor:
    """Start success per prompt [P]: prompt i in stratum i mod S, success ``p0 * s / mean(strata)`` (mean p0)."""
    factors = torch.tensor(strata, dtype=torch.float64) / float(np.mean(strata))  # [S]
    return (p0 * factors[torch.arange(prompts) % len(strata)]).float()  # [P]


def prior_logits(start_success: Tensor, right: Tensor, num_answers: int) -> Tensor:
    """[P] start success, [P] right answers -> [P, K] logits: 0 on wrong answers, ``log(p (K-1) / (1-p))`` on the
    right one, so that its softmax probability is exactly p."""
    logits = torch.zeros(start_success.shape[0], num_answers)
    gap = torch.log(start_success * (num_answers - 1) / (1 - start_success))  # [P]
    return logits.scatter(1, right.unsqueeze(1), gap.unsqueeze(1))


@dataclass
class Bandit:
    prior: Tensor  # [P, K] fixed start logits
    right: Tensor  # [P] index of the right answer
    encoding: Tensor  # [P, D] fixed prompt encodings (MLP input)


def make_bandit(cfg: SimulateConfig, p0: float) -> Bandit:
    gen = torch.Generator().manual_seed(cfg.task_seed)
    right = torch.randint(0, cfg.num_answers, (cfg.prompts,), generator=gen)
    encoding = torch.randn(cfg.prompts, cfg.encoding_dim, generator=gen) / math.sqrt(cfg.encoding_dim)
    return Bandit(
        prior_logits(strata_start_success(p0, cfg.strata, cfg.prompts), right, cfg.num_answers), right, encoding
    )


def init_policy(kind: str, seeds: list[int], bandit: Bandit, hidden: int) -> dict[str, Tensor]:
    """Trainable parameters of R runs (run r seeded by ``seeds[r]``), all giving zero logits at the start."""
    runs, (prompts, answers) = len(seeds), bandit.prior.shape
    if kind == "tabular":
        return {"logits": torch.zeros(runs, prompts, answers, requires_grad=True)}  # [R, P, K]
    dim = bandit.encoding.shape[1]
    w1 = torch.stack([torch.randn(dim, hidden, generator=torch.Generator().manual_seed(1000 + s)) for s in seeds])
    return {
        "w1": (w1 / math.sqrt(dim)).requires_grad_(),  # [R, D, H]
        "b1": torch.zeros(runs, 1, hidden, requires_grad=True),  # [R, 1, H]
        "w2": torch.zeros(runs, hidden, answers, requires_grad=True),  # [R, H, K] zero: start logits = prior
        "b2": torch.zeros(runs, 1, answers, requires_grad=True),
    }  # [R, 1, K]


def policy_logits(params: dict[str, Tensor], bandit: Bandit) -> Tensor:
    """[R, P, K] logits of every run on every prompt."""
    if "logits" in params:
        return bandit.prior + params["logits"]
    hidden = torch.tanh(bandit.encoding @ params["w1"] + params["b1"])  # [R, P, H]
    return bandit.prior + hidden @ params["w2"] + params["b2"]


def expected_success(logits: Tensor, right: Tensor) -> Tensor:
    """[R, P, K] logits -> [R] exact success probability averaged over the prompts."""
    probs = torch.softmax(logits, dim=-1)
    return probs.gather(2, right.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(2).mean(dim=1)


def sample_answers(probs: Tensor, group_size: int, gen: torch.Generator) -> Tensor:
    """[R, P, K] probabilities -> [R, P, M] sampled answers (inverse CDF)."""
    cdf = probs.cumsum(dim=-1)  # [R, P, K]
    uniform = torch.rand(*probs.shape[:2], group_size, generator=gen) * cdf[..., -1:]  # [R, P, M]
    return torch.searchsorted(cdf, uniform).clamp_max(probs.shape[-1] - 1)


# ---------------------------------------------------------------------------------------------
# optimisers over stacked runs: one lr per run
# ---------------------------------------------------------------------------------------------


def per_run(values: Tensor, like: Tensor) -> Tensor:
    """[R] -> [R, 1, ..., 1], to broadcast against a stacked parameter shaped like ``like``."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def clip_per_run(grads: dict[str, Tensor], max_norm: float) -> dict[str, Tensor]:
    """Each run's gradient scaled to global norm <= max_norm (its own parameters only)."""
    norms = torch.sqrt(sum(g.pow(2).flatten(1).sum(dim=1) for g in grads.values()))  # [R]
    scale = (max_norm / norms.clamp_min(1e-12)).clamp_max(1.0)
    return {k: g * per_run(scale, g) for k, g in grads.items()}


@dataclass
class StackedOptimizer:
    """SGD or AdamW (no weight decay) over stacked runs; ``lr`` [R]. Elementwise, so each run is its own optimiser."""

    spec: OptimizerSpec
    lr: Tensor  # [R]
    step_count: int = 0
    moments: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @torch.no_grad()
    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor]) -> None:
        if self.spec.grad_clip:
            grads = clip_per_run(grads, self.spec.grad_clip)
        self.step_count += 1
        beta1, beta2 = self.spec.betas
        for name, p in params.items():
            g = grads[name]
            if self.spec.kind == "sgd":
                p -= per_run(self.lr, p) * g
                continue
            m, v = self.moments.get(name, (torch.zeros_like(p), torch.zeros_like(p)))
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            self.moments[name] = (m, v)
            m_hat = m / (1 - beta1**self.step_count)
            v_hat = v / (1 - beta2**self.step_count)
            p -= per_run(self.lr, p) * m_hat / (v_hat.sqrt() + self.spec.eps)

    def keep(self, index: Tensor) -> None:
        self.lr = self.lr[index]
        self.moments = {k: (m[index].clone(), v[index].clone()) for k, (m, v) in self.moments.items()}


# ---------------------------------------------------------------------------------------------
# a stack of runs: sample -> score -> update -> measure, raced lr by lr
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    estimator: str  # as written, e.g. "garl:0.75"
    lr: float
    seed: int


def estimator_loss(
    name: str, logprobs: Tensor, rewards: Tensor, group_size: int, baseline: str, gen: torch.Generator
) -> Tensor:
    """The registry's loss for R' stacked runs of one estimator, times R' (each run's own gradient).

    logprobs [R', P, M] (with grad), rewards [R', P, M]; one token per completion."""
    family, q = parse_estimator(name)
    estimator = get_estimator(family)
    rows = logprobs.shape[0]
    flat_rewards = rewards.reshape(-1)  # [N], groups of M contiguous
    settings = {"baseline": baseline, "updates_per_batch": 1}  # one update per sampled batch; the rest: defaults
    args = estimator.args.model_validate({k: v for k, v in settings.items() if k in estimator.args.model_fields})
    counts = (
        paft_resample_counts(flat_rewards, group_size, group_size, gen)
        if estimator.draws_resample_counts(args)
        else None
    )
    batch = PolicyBatch(
        logprobs=logprobs.reshape(-1, 1),
        mask=torch.ones(flat_rewards.shape[0], 1),
        rewards=flat_rewards,
        group_size=group_size,
        q=q if q is not None else 0.0,
        max_new_tokens=1,
        resample_counts=counts,
    )
    return estimator.loss(batch, args).loss * rows


def lr_score(values: np.ndarray) -> float:
    """Median over seeds of the steps to the target (cap for a stall, cap + 1 for a divergence)."""
    return float(np.median(values))


def simulate_runs(
    cfg: SimulateConfig,
    spec: OptimizerSpec,
    p0: float,
    group_size: int,
    runs: list[Run],
    best_known: dict[str, float] | None = None,
    gen_seed: int = 0,
    progress=None,
) -> list[dict]:
    """Train the stacked ``runs`` until each escapes to ``cfg.target``, diverges, reaches the cap, or its lr can no
    longer beat the best (``best_known``: estimator -> best finished median so far). One dict per run."""
    cap = cfg.cap(p0)
    bandit = make_bandit(cfg, p0)
    gen = torch.Generator().manual_seed(gen_seed)
    params = init_policy(cfg.policy, [r.seed for r in runs], bandit, cfg.hidden)
    optimizer = StackedOptimizer(spec, torch.tensor([r.lr for r in runs]))
    thresholds = sorted(set(cfg.thresholds) | {cfg.target})
    total = len(runs)
    alive = np.arange(total)  # stack row -> run index
    steps_to = np.full((total, len(thresholds)), -1, dtype=np.int64)
    final = np.zeros(total)
    status = np.array(["running"] * total, dtype=object)
    group_of = [(r.estimator, r.lr) for r in runs]
    best_known = dict(best_known or {})

    for step in range(cap + 1):
        logits = policy_logits(params, bandit)  # [R, P, K]
        success = expected_success(logits.detach(), bandit.right).numpy()  # [R] after `step` updates
        final[alive] = success
        diverged = ~np.isfinite(success)
        for j, level in enumerate(thresholds):
            newly = (success >= level) & (steps_to[alive, j] < 0)
            steps_to[alive[newly], j] = step
        status[alive[diverged]] = "diverged"
        status[alive[success >= cfg.target]] = "escaped"
        if step == cap:
            status[alive[status[alive] == "running"]] = "capped"
        race_lrs(group_of, status, steps_to[:, thresholds.index(cfg.target)], step, cap, best_known)
        keep = np.flatnonzero(status[alive] == "running")
        if keep.size == 0:
            break
        if keep.size < alive.size:
            index = torch.from_numpy(keep)
            params = {k: p.detach()[index].clone().requires_grad_() for k, p in params.items()}
            optimizer.keep(index)
            alive = alive[keep]
            logits = policy_logits(params, bandit)
        # sample -> score -> update
        logprobs_all = torch.log_softmax(logits, dim=-1)  # [R, P, K]
        answers = sample_answers(logprobs_all.detach().exp(), group_size, gen)  # [R, P, M]
        logprobs = logprobs_all.gather(2, answers)  # [R, P, M]
        rewards = (answers == bandit.right.view(1, -1, 1)).float()  # [R, P, M]
        names = [runs[i].estimator for i in alive]
        loss = logprobs.new_zeros(())
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name])
            loss = loss + estimator_loss(name, logprobs[rows], rewards[rows], group_size, cfg.baseline, gen)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        optimizer.step(params, grads)
        if progress is not None:
            progress.set_postfix_str(f"step {step + 1}/{cap}, runs {alive.size}", refresh=False)
    return [
        {
            "estimator": r.estimator,
            "lr": r.lr,
            "seed": r.seed,
            "status": str(status[i]),
            "final_success": float(final[i]),
            "steps_to": {
                f"{t:g}": (int(steps_to[i, j]) if steps_to[i, j] >= 0 else None) for j, t in enumerate(thresholds)
            },
        }
        for i, r in enumerate(runs)
    ]


def race_lrs(
    group_of: list[tuple[str, float]],
    status: np.ndarray,
    target_steps: np.ndarray,
    step: int,
    cap: int,
    best_known: dict[str, float],
) -> None:
    """Race the lrs of each estimator: stop an lr whose median steps cannot beat an lr whose median is known.

    Each run's value: its escape step; the cap for a stall, cap + 1 for a divergence; unresolved runs lie in
    [step + 1, cap + 1] (lower bound for this lr's median) and count as cap + 1 in the upper bound."""
    groups: dict[tuple[str, float], list[int]] = {}
    for i, key in enumerate(group_of):
        groups.setdefault(key, []).append(i)
    lower, upper = {}, {}
    for key, members in groups.items():
        values_low, values_high = [], []
        for i in members:
            if status[i] == "escaped":
                v_low = v_high = target_steps[i]
            elif status[i] == "capped":
                v_low = v_high = cap
            elif status[i] in ("diverged", "pruned"):
                v_low = v_high = cap + 1
            else:
                v_low, v_high = step + 1, cap + 1
            values_low.append(v_low)
            values_high.append(v_high)
        lower[key], upper[key] = float(np.median(values_low)), float(np.median(values_high))
    for (name, lr), members in groups.items():
        best = min([best_known.get(name, math.inf)] + [upper[k] for k in groups if k[0] == name])
        if lower[(name, lr)] > best:
            for i in members:
                if status[i] == "running":
                    status[i] = "pruned"


# ---------------------------------------------------------------------------------------------
# one cell: tune each estimator's lr on a widening grid, keep its seeds
# ---------------------------------------------------------------------------------------------


def lr_grid(center: float, points: int) -> list[float]:
    """``points`` lrs in half-decade steps around ``center``."""
    return [float(f"{center * 10 ** ((i - (points - 1) / 2) / 2):.3g}") for i in range(points)]


def rank_key(results: list[dict], target: str, cap: int) -> tuple[float, float, float]:
    """(median steps, mean steps, -mean final success) of one lr's seeds: smaller is better."""
    values = np.array([_value(r, target, cap) for r in results])
    return lr_score(values), float(values.mean()), -float(np.mean([r["final_success"] for r in results]))


def _value(result: dict, target: str, cap: int) -> int:
    steps = result["steps_to"][target]
    if steps is not None:
        return steps
    return cap + 1 if result["status"] in ("diverged", "pruned") else cap


def run_cell(
    cfg: SimulateConfig, optimizer: str, p0: float, group_size: int, estimators: list[str] | None = None, progress=None
) -> dict:
    """Every estimator (GRPO first) at its tuned lr, ``cfg.seeds`` seeds each: the cell's record."""
    spec = cfg.optimizers[optimizer]
    names = list(dict.fromkeys([BASELINE, *(estimators if estimators is not None else cfg.estimators)]))
    for name in names:
        parse_estimator(name)
    target, cap = f"{cfg.target:g}", cfg.cap(p0)
    started = time.time()
    grids = {name: lr_grid(spec.center(name), cfg.grid_points) for name in names}
    results: dict[str, dict[float, list[dict]]] = {name: {} for name in names}
    todo = {name: list(grid) for name, grid in grids.items()}
    for round_index in range(cfg.widen_limit + 1):
        runs = [Run(name, lr, seed) for name, lrs in todo.items() for lr in lrs for seed in range(cfg.seeds)]
        if not runs:
            break
        best_known = {
            name: min(rank_key(r, target, cap)[0] for r in results[name].values()) for name in names if results[name]
        }
        for record in simulate_runs(
            cfg, spec, p0, group_size, runs, best_known, gen_seed=round_index, progress=progress
        ):
            results[record["estimator"]].setdefault(record["lr"], []).append(record)
        todo = {}
        for name in names:
            grid = sorted(results[name])
            keys = {lr: rank_key(results[name][lr], target, cap) for lr in grid}
            best = min(grid, key=lambda lr: (keys[lr], -lr))
            ratio = 10**0.5
            if len(grid) > 1 and best == grid[-1] and keys[best][0] <= cap:
                todo[name] = [float(f"{best * ratio:.3g}"), float(f"{best * ratio**2:.3g}")]
            elif len(grid) > 1 and best == grid[0] and keys[best] < keys[grid[1]]:
                todo[name] = [float(f"{best / ratio:.3g}"), float(f"{best / ratio**2:.3g}")]
    record: dict[str, Any] = {
        "optimizer": optimizer,
        "p0": p0,
        "group_size": group_size,
        "cap": cap,
        "target": cfg.target,
        "estimators": {},
    }
    for name in names:
        grid = sorted(results[name])
        keys = {lr: rank_key(results[name][lr], target, cap) for lr in grid}
        best = min(grid, key=lambda lr: (keys[lr], -lr))
        seeds = sorted(results[name][best], key=lambda r: r["seed"])
        edge = "low" if best == grid[0] else "high" if best == grid[-1] else None
        record["estimators"][name] = {
            "lr": best,
            "lr_at_grid_edge": edge,
            "grid": {f"{lr:g}": keys[lr][0] for lr in grid},
            "steps_to_escape": [r["steps_to"][target] for r in seeds],
            "steps_to": {t: [r["steps_to"][t] for r in seeds] for t in seeds[0]["steps_to"]},
            "final_success": [round(r["final_success"], 5) for r in seeds],
            "status": [r["status"] for r in seeds],
        }
    record["ratios"] = cell_ratios(record, cfg.bootstrap)
    record["seconds"] = round(time.time() - started, 2)
    return record


def steps_or_cap(steps: list[int | None], cap: int) -> list[float]:
    return [float(cap if s is None else s) for s in steps]


def cell_ratios(record: dict, resamples: int = 2000) -> dict[str, dict]:
    """Median steps of GRPO / of each estimator, with a seed-bootstrap 95% interval (a run that never escaped
    counts as the cap, so a ratio with censored GRPO seeds is a lower bound, with censored estimator seeds an
    upper bound), per threshold."""
    cap = record["cap"]
    base = record["estimators"][BASELINE]
    ratios = {}
    for name, entry in record["estimators"].items():
        if name == BASELINE:
            continue
        ratios[name] = {}
        for level, steps in entry["steps_to"].items():
            grpo = steps_or_cap(base["steps_to"][level], cap)
            mine = steps_or_cap(steps, cap)
            median, low, high = bootstrap_median_ratio(grpo, mine, resamples, seed=0)
            ratios[name][level] = {
                "median_ratio": round(median, 4),
                "low": round(low, 4),
                "high": round(high, 4),
                "grpo_never": sum(s is None for s in base["steps_to"][level]),
                "estimator_never": sum(s is None for s in steps),
                "both_capped": bool(np.median(grpo) >= cap and np.median(mine) >= cap),
                "grpo_median_steps": float(np.median(grpo)),
            }
    return ratios


# ---------------------------------------------------------------------------------------------
# the map: every (optimiser, p0, M) cell, cached one JSON per cell
# ---------------------------------------------------------------------------------------------


def cell_name(optimizer: str, p0: float, group_size: int) -> str:
    return f"{optimizer}_p{p0:g}_m{group_size}"


def run_map(cfg: SimulateConfig, out: str | os.PathLike | None = None) -> Path:
    """Run (or read from cells/) every cell of the map; write results.json and the heatmap(s). Returns results.json."""
    from tsallis_core.progress import progress_bar

    out = Path(out or cfg.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    keys = [(o, p, m) for o in cfg.optimizers for p in cfg.p0s for m in cfg.group_sizes]
    settings = cfg.model_dump(exclude={"out", "p0s", "group_sizes", "optimizers"})
    cells, computed_seconds = [], 0.0
    with progress_bar(keys, desc="simulate", unit="cell") as progress:
        for optimizer, p0, group_size in progress:
            path = out / "cells" / f"{cell_name(optimizer, p0, group_size)}.json"
            wanted = {"settings": settings, "optimizer": cfg.optimizers[optimizer].model_dump()}
            if path.is_file():
                cached = json.loads(path.read_text())
                if cached.get("config") == json.loads(json.dumps(wanted)):
                    cached["ratios"] = cell_ratios(cached, cfg.bootstrap)  # cheap: the summary's current fields
                    cells.append(cached)
                    continue
            progress.set_description(cell_name(optimizer, p0, group_size))
            record = run_cell(cfg, optimizer, p0, group_size, progress=progress)
            record["config"] = wanted
            computed_seconds += record["seconds"]
            path.write_text(json.dumps(record, indent=1))
            cells.append(record)
    results = {
        "settings": settings,
        "optimizers": {k: v.model_dump() for k, v in cfg.optimizers.items()},
        "p0s": cfg.p0s,
        "group_sizes": cfg.group_sizes,
        "estimators": cfg.estimators,
        "seconds_total": round(sum(c["seconds"] for c in cells), 1),
        "seconds_this_invocation": round(computed_seconds, 1),
        "cells": [{k: v for k, v in c.items() if k != "config"} for c in cells],
    }
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1))
    (out / "summary.md").write_text(summary_markdown(results))
    for level in cfg.thresholds:
        plot_ratio_map(results, f"{level:g}", out / f"ratio_map_{level:g}.png")
    return path


def escapes_where_grpo_does_not(cell: dict, name: str, level: str) -> bool:
    """Every seed of ``name`` reached ``level`` within the cap, and most of GRPO's seeds did not."""
    mine, grpo = cell["estimators"][name]["steps_to"][level], cell["estimators"][BASELINE]["steps_to"][level]
    return all(s is not None for s in mine) and sum(s is None for s in grpo) > len(grpo) / 2


def summary_markdown(results: dict) -> str:
    """Per threshold: a table of median ratio GRPO / estimator [95% interval] per cell (``*``: the interval holds 1,
    ``>=``: GRPO seeds that never escaped count as the cap; "both capped": neither median escaped), GRPO's median
    steps, and the cells where an estimator escaped in every seed while most GRPO seeds did not."""
    names = results["estimators"]
    title = (
        f"# Simulator map: median steps GRPO / estimator ({results['settings']['policy']} policy, "
        f"{results['settings']['seeds']} seeds, {results['seconds_total']:.0f} s of cell time)"
    )
    lines = [title, ""]
    for level in [f"{t:g}" for t in results["settings"]["thresholds"]]:
        lines += [
            f"## Steps to mean success {level}",
            "",
            "| optimiser | p0 | M | cap | GRPO median steps (never) | " + " | ".join(names) + " |",
            "|" + "---|" * (5 + len(names)),
        ]
        escaped_alone = []
        for cell in results["cells"]:
            grpo = cell["estimators"][BASELINE]["steps_to"][level]
            row = [
                cell["optimizer"],
                f"{cell['p0']:g}",
                str(cell["group_size"]),
                str(cell["cap"]),
                f"{np.median(steps_or_cap(grpo, cell['cap'])):.0f} ({sum(s is None for s in grpo)})",
            ]
            for name in names:
                r = cell["ratios"][name][level]
                mark = "*" if r["low"] <= 1 <= r["high"] else ""
                row.append(
                    "both capped"
                    if r["both_capped"]
                    else f"{'>=' if r['grpo_never'] else ''}{r['median_ratio']:.2f} [{r['low']:.2f}, "
                    f"{r['high']:.2f}]{mark}"
                )
                if escapes_where_grpo_does_not(cell, name, level):
                    escaped_alone.append(
                        f"{name} at {cell['optimizer']}, p0={cell['p0']:g}, M={cell['group_size']} (cap {cell['cap']})"
                    )
            lines.append("| " + " | ".join(row) + " |")
        lines += [
            "",
            f"Escaped in every seed while most GRPO seeds did not reach {level} within the cap: "
            + ("; ".join(escaped_alone) if escaped_alone else "nowhere")
            + ".",
            "",
        ]
    return "\n".join(lines)


def map_verdict(results: dict, level: str = "0.5") -> dict[str, dict[str, int]]:
    """Per optimiser: how many (estimator, cell) pairs escaped faster than GRPO (interval above 1), slower (below 1),
    inside the noise (the interval holds 1), or not at all (both capped)."""
    counts: dict[str, dict[str, int]] = {}
    for cell in results["cells"]:
        tally = counts.setdefault(cell["optimizer"], {"faster": 0, "slower": 0, "noise": 0, "capped": 0})
        for ratio in (r[level] for r in cell["ratios"].values()):
            kind = (
                "capped"
                if ratio["both_capped"]
                else "faster"
                if ratio["low"] > 1
                else "slower"
                if ratio["high"] < 1
                else "noise"
            )
            tally[kind] += 1
    return counts


def map_claim_sentence(results: dict, level: str = "0.5") -> str:
    """One sentence on the claim from a map: per optimiser, in how many of its cells the estimators beat GRPO."""
    parts = [
        f"{optimizer}: faster than GRPO in {c['faster']}, slower in {c['slower']}, within the noise in "
        f"{c['noise']}" + (f", neither escaped in {c['capped']}" if c["capped"] else "")
        for optimizer, c in map_verdict(results, level).items()
    ]
    names = ", ".join(results["estimators"])
    return (
        f"In the simulator ({results['settings']['seeds']} seeds a cell, start success "
        f"{', '.join(f'{p:.1%}' for p in results['p0s'])}, M {', '.join(map(str, results['group_sizes']))}), "
        f"{names} reached success {level} (median steps, 95% interval against 1) — {'; '.join(parts)}."
    )


def plot_ratio_map(results: dict, level: str, path: Path) -> Path:
    """One panel per optimiser x estimator: median ratio GRPO / estimator over p0 (x) and M (y), log colour
    centred on 1; 'x' marks a cell whose 95% interval holds 1, '>=' a ratio with GRPO seeds that never escaped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    optimizers, estimators = list(results["optimizers"]), results["estimators"]
    p0s, sizes = sorted(results["p0s"], reverse=True), sorted(results["group_sizes"])
    fig, axes = plt.subplots(
        len(optimizers),
        len(estimators),
        squeeze=False,
        figsize=(2.3 * len(estimators) + 1, 2.1 * len(optimizers) + 0.8),
    )
    norm = LogNorm(vmin=1 / 8, vmax=8)
    image = None
    for row, optimizer in enumerate(optimizers):
        for col, name in enumerate(estimators):
            ax = axes[row][col]
            grid = np.full((len(sizes), len(p0s)), np.nan)
            for cell in results["cells"]:
                if cell["optimizer"] != optimizer or name not in cell["ratios"]:
                    continue
                i, j = sizes.index(cell["group_size"]), p0s.index(cell["p0"])
                entry = cell["ratios"][name][level]
                grid[i, j] = entry["median_ratio"]
                holds_one = entry["low"] <= 1 <= entry["high"]
                text = (
                    ("≥" if entry["grpo_never"] else "") + f"{entry['median_ratio']:.2g}" + ("\n×" if holds_one else "")
                )
                if entry["both_capped"]:  # neither escaped in most seeds: no ratio
                    grid[i, j], text = np.nan, "cap"
                elif entry["grpo_median_steps"] <= SATURATED_STEPS:  # GRPO jumps there at once: nothing to win
                    text = f"{text}\n(1-2 st)"
                dark = not entry["both_capped"] and abs(math.log(max(entry["median_ratio"], 1e-9))) > math.log(4)
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=6.5,
                    color="white" if dark else "0.35" if holds_one else "black",
                )
            image = ax.imshow(np.clip(grid, 1 / 8, 8), cmap="RdBu", norm=norm, origin="lower", aspect="auto")
            ax.set_xticks(range(len(p0s)), [f"{p:g}" for p in p0s], fontsize=6)
            ax.set_yticks(range(len(sizes)), [str(m) for m in sizes], fontsize=6)
            if row == len(optimizers) - 1:
                ax.set_xlabel("start success p0", fontsize=7)
            if col == 0:
                ax.set_ylabel(f"{optimizer}\nM", fontsize=7)
            if row == 0:
                ax.set_title(name, fontsize=8)
    fig.suptitle(
        f"median steps to success {level}: GRPO / estimator (>1: estimator faster; ×: 95% interval holds 1; "
        f"≥: some GRPO seeds never escaped; cap: neither escaped within the cap; 1-2 st: GRPO escapes in 1-2 steps)",
        fontsize=8,
    )
    fig.colorbar(image, ax=axes, shrink=0.6, label="ratio (log scale)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# advice from the measured map (tsallis diagnose)
# ---------------------------------------------------------------------------------------------


@dataclass
class MapAdvice:
    optimizer: str
    p0: float  # the nearest map cell's
    group_size: int  # the nearest map cell's
    ratios: dict[str, dict]  # estimator -> {median_ratio, low, high, ...} at the target
    best_estimator: str | None  # the largest ratio whose interval lies above 1 (None: no measured gain)
    best_group_size: int | None  # the map's M at this p0 with the largest such lower bound
    rule_group_size: int  # min(64, ceil(1/p0)): the p0 * M >= 1 rule (contradicted: the best M is smaller, or none)
    rule_contradicted: bool
    winners: dict[int, str | None]  # map M at this p0 -> the estimator with the largest lower bound above 1 (or None)
    in_range: bool  # p0 within half a decade of the map's p0 range (else the nearest cell is an extrapolation)
    text: str


def _nearest(values: list[float], x: float) -> float:
    return min(values, key=lambda v: (round(abs(math.log(v) - math.log(x)), 9), -v))  # a tie goes to the larger


def map_advice(results: dict, p0: float, group_size: int, optimizer: str) -> MapAdvice:
    """The GRPO / estimator ratios of the map cell nearest (log p0, log M) for ``optimizer``, and whether the map
    contradicts raising M until p0 * M >= 1."""
    cells = [c for c in results["cells"] if c["optimizer"] == optimizer]
    if not cells:
        raise ValueError(
            f"the map has no cells for optimizer {optimizer!r}; it has "
            f"{', '.join(sorted({c['optimizer'] for c in results['cells']}))}"
        )
    level = f"{results['settings']['target']:g}"
    p0s = sorted({c["p0"] for c in cells})
    near_p0 = _nearest(p0s, max(p0, 1e-9))
    in_range = p0s[0] / 10**0.5 <= p0 <= p0s[-1] * 10**0.5
    row = {c["group_size"]: c for c in cells if c["p0"] == near_p0}
    near_m = int(_nearest(sorted(row), group_size))
    ratios = {name: r[level] for name, r in row[near_m]["ratios"].items()}

    def best_of(cell: dict) -> tuple[str | None, float]:
        gains = {name: r[level]["low"] for name, r in cell["ratios"].items() if r[level]["low"] > 1}
        return (max(gains, key=gains.get), gains[max(gains, key=gains.get)]) if gains else (None, 0.0)

    best_estimator, _ = best_of(row[near_m])
    by_m = {m: best_of(c)[1] for m, c in row.items()}
    best_m = max(by_m, key=lambda m: (by_m[m], -m)) if max(by_m.values()) > 0 else None
    rule_m = 64 if p0 <= 0 else min(64, max(2, math.ceil(1.0 / p0)))
    # the rule says: raise M to rule_m. The map contradicts it where its largest measured gain sits at a smaller M,
    # or where no M measured a gain at this p0 (raising M for q's sake is then unsupported)
    contradicted = best_m < rule_m if best_m is not None else rule_m > near_m
    where = f"map cell {optimizer}, p0={near_p0:g}, M={near_m}"
    if best_estimator:
        r = ratios[best_estimator]
        text = (
            f"{where}: {best_estimator} escapes {r['median_ratio']:.2f}x faster than GRPO "
            f"[95% {r['low']:.2f}, {r['high']:.2f}]"
        )
    else:
        text = f"{where}: no estimator measurably faster than GRPO (every interval holds 1 or lies below it)"
    if contradicted:
        text += f"; the map contradicts raising M to {rule_m} (p0*M >= 1): " + (
            f"the gain over GRPO is largest at M={best_m}" if best_m else "no M measured a gain at this p0"
        )
    elif best_m is not None:
        text += f"; the largest measured gain at this p0 is at M={best_m}"
    if not in_range:
        text += f" (p0={p0:g} lies outside the map's {p0s[0]:g}..{p0s[-1]:g}: not applied)"
    winners = {m: best_of(c)[0] for m, c in sorted(row.items())}
    return MapAdvice(
        optimizer, near_p0, near_m, ratios, best_estimator, best_m, rule_m, contradicted, winners, in_range, text
    )


def apply_map_advice(diagnosis, advice: MapAdvice):
    """The rule-based ``evaluate.Diagnosis`` revised by the map: its M where the map contradicts the p0 * M >= 1 rule
    (the current M where no M measured a gain), then the estimator and q that the map measured fastest at that M
    (interval above 1), if any. Outside the map's p0 range, or with no success at all, only the reason changes."""
    from dataclasses import replace

    changes: dict[str, Any] = {"reason": f"{diagnosis.reason}; map: {advice.text}"}
    if not advice.in_range:
        return replace(diagnosis, **changes)
    if advice.rule_contradicted:
        changes["suggested_group_size"] = advice.best_group_size or diagnosis.group_size
    group_size = changes.get("suggested_group_size", diagnosis.suggested_group_size)
    winner = advice.winners[int(_nearest(sorted(advice.winners), group_size))]
    if winner is not None:
        family, q = parse_estimator(winner)
        changes.update(estimator=family, q=q if q is not None else 0.0)
    return replace(diagnosis, **changes)


def load_map(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"simulator map {path} does not exist (run: tsallis simulate --params "
            f"configs/simulate.yaml --out {path.parent})"
        )
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# command line (wired in cli.py)
# ---------------------------------------------------------------------------------------------


def add_simulate_command(commands) -> None:
    sim = commands.add_parser(
        "simulate",
        help="the sampled-estimator simulator on a contextual bandit: a map of GRPO / estimator escape "
        "times, or one cell",
        description="tsallis simulate --params configs/simulate.yaml [key=value ...] --out DIR: the map (cached per "
        "cell under DIR/cells). tsallis simulate cell --optimizer sgd --p0 0.01 --group-size 8 "
        "--prompts 32 --seeds 3 --estimators grpo garl:0.75 --json: one cell. Settings: the fields of "
        "tsallis_core.studies.simulate.SimulateConfig, as key=value.",
    )
    sim.add_argument("--params", help="YAML params (map; for `cell` optional: the settings it starts from)")
    sim.add_argument("--out", help="map: where results.json, the heatmaps and cells/ go (default: the params' out)")
    sim.add_argument(
        "--optimizer", default="adamw", help="cell: an optimiser of the settings (sgd, adamw, adamw_large_eps)"
    )
    sim.add_argument("--p0", type=float, default=0.01, help="cell: mean start success")
    sim.add_argument("--group-size", type=int, default=8, help="cell: M samples per prompt")
    sim.add_argument("--prompts", type=int, help="cell: prompts per step")
    sim.add_argument("--seeds", type=int, help="cell: seeds per lr")
    sim.add_argument("--estimators", nargs="+", help="cell: estimators as written, e.g. grpo garl:0.75 paft:1")
    sim.add_argument("--json", action="store_true", help="cell: print one JSON object keyed by estimator")
    sim.add_argument("overrides", nargs="*", help="`cell`, and/or key=value settings, e.g. policy=tabular seeds=5")
    sim.set_defaults(func=simulate_command)


def simulate_command(args) -> int:
    torch.set_num_threads(int(os.environ.get("TSALLIS_SIM_THREADS", "1")))
    words = [w for w in args.overrides if "=" not in w]
    overrides = [w for w in args.overrides if "=" in w]
    if words not in ([], ["cell"]):
        raise ConfigError(f"tsallis simulate takes `cell` or key=value settings, got {' '.join(words)!r}")
    if words == ["cell"]:
        fields = {k: v for k, v in (("prompts", args.prompts), ("seeds", args.seeds)) if v is not None}
        cfg = load_simulate(args.params, overrides, **fields)
        if args.optimizer not in cfg.optimizers:
            raise ConfigError(f"--optimizer must be one of {', '.join(cfg.optimizers)}; got {args.optimizer!r}")
        if not 0 < args.p0 < min(cfg.thresholds) or args.group_size < 2:
            raise ConfigError(
                f"--p0 must lie in (0, {min(cfg.thresholds):g}) (below the lowest threshold) and "
                f"--group-size be >= 2; got {args.p0}, {args.group_size}"
            )
        estimators = args.estimators or [BASELINE, *cfg.estimators]
        for name in estimators:
            parse_estimator(name)
        record = run_cell(cfg, args.optimizer, args.p0, args.group_size, [e for e in estimators if e != BASELINE])
        picked = {
            name: {
                "lr": record["estimators"][name]["lr"],
                "steps_to_escape": record["estimators"][name]["steps_to_escape"],
            }
            for name in estimators
        }
        if args.json:
            print(json.dumps(picked))
            return 0
        print(
            f"cell {cell_name(args.optimizer, args.p0, args.group_size)} ({cfg.policy}, cap {record['cap']} "
            f"steps, {record['seconds']:.1f} s): steps to mean success {cfg.target:g} per seed"
        )
        for name in estimators:
            entry = record["estimators"][name]
            ratio = record["ratios"].get(name, {}).get(f"{cfg.target:g}")
            extra = (
                f"  GRPO/this {ratio['median_ratio']:.2f} [{ratio['low']:.2f}, {ratio['high']:.2f}]" if ratio else ""
            )
            print(f"  {name:>10} lr {entry['lr']:<8.3g} {entry['steps_to_escape']}{extra}")
        return 0
    if any(v is not None for v in (args.prompts, args.seeds, args.estimators)) or args.json:
        raise ConfigError(
            "--prompts, --seeds, --estimators and --json apply to `tsallis simulate cell`; for the map "
            "set prompts=, seeds=, estimators= as key=value"
        )
    if args.params is None:
        raise ConfigError("tsallis simulate needs --params (e.g. configs/simulate.yaml) or the word `cell`")
    cfg = load_simulate(args.params, overrides)
    started = time.time()
    path = run_map(cfg, args.out)
    print(f"map: {path} ({time.time() - started:.0f} s this invocation)")
    return 0
