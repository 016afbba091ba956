"""Evaluation (pass@k, maj@k, accuracy, EM, F1) and the cold-start diagnosis, from sampled completions."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tsallis_core.config import RolloutConfig
from tsallis_core.data.registry import get_verifier
from tsallis_core.data.verify import exact_match_score, extract_answer, f1_score, normalize_answer
from tsallis_core.progress import progress_bar


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: ``1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """Index of the sample whose normalised answer is most frequent; ties go to the answer seen first."""
    keys = [normalize_answer(a) if a is not None else None for a in answers]
    counts = Counter(k for k in keys if k is not None and k != "")
    if not counts:
        return None
    first = {k: keys.index(k) for k in counts}
    best = max(counts, key=lambda k: (counts[k], -first[k]))
    return first[best]


def maj_at_k(answers: Sequence[str | None], rewards: Sequence[float], k: int) -> float:
    """Reward of the majority answer among the first k samples (0 when none has an answer)."""
    winner = majority_vote(answers[:k])
    return 0.0 if winner is None else float(rewards[winner])


@dataclass
class PromptResult:
    id: str
    answers: list[str | None]
    rewards: list[float]
    em: list[float]
    f1: list[float]
    texts: list[str] = field(default_factory=list)  # the completions as decoded


def sample_and_score(
    model,
    tokenizer,
    rows: list[dict],
    num_samples: int,
    verifier: str,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    prompts_per_batch: int = 8,
    settings: RolloutConfig | None = None,
) -> list[PromptResult]:
    """num_samples completions per row (seeded), each verified; a progress bar over the rows. ``settings``: the
    decoder, as ``rollout.*`` chooses it in training (default: training's defaults)."""
    from tsallis_core.rollout.eager import HFRollout, row_seed

    verify = get_verifier(verifier)
    rollout = HFRollout(model, tokenizer, temperature, max_new_tokens, settings=settings)
    results = []
    with torch.no_grad(), progress_bar(total=len(rows), desc="evaluate", unit="prompt") as bar:
        for start in range(0, len(rows), prompts_per_batch):
            batch = rows[start : start + prompts_per_batch]
            out = rollout.generate(
                [r["prompt"] for r in batch for _ in range(num_samples)],
                [row_seed(seed, "eval", start + i, j) for i in range(len(batch)) for j in range(num_samples)],
            )
            for i, row in enumerate(batch):
                texts = out.texts[i * num_samples : (i + 1) * num_samples]
                golds = [row["answer"], *row.get("aliases", [])]
                answers = [extract_answer(t) for t in texts]
                results.append(
                    PromptResult(
                        id=str(row.get("id", start + i)),
                        answers=answers,
                        rewards=[verify(t, row["answer"], row.get("aliases", [])) for t in texts],
                        em=[0.0 if a is None else max(exact_match_score(a, g) for g in golds) for a in answers],
                        f1=[0.0 if a is None else max(f1_score(a, g) for g in golds) for a in answers],
                        texts=texts,
                    )
                )
            bar.update(len(batch))
    return results


def per_prompt_scores(results: list[PromptResult], ks: Sequence[int]) -> dict[str, list[float]]:
    """pass@k and maj@k of each prompt, for each k: what the report's bootstrap intervals resample."""
    n = len(results[0].rewards)
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ValueError(f"k must be between 1 and the samples per prompt ({n}); got {bad}")
    scores = {}
    for k in ks:
        scores[f"pass@{k}"] = [pass_at_k(n, int(sum(x >= 1.0 for x in r.rewards)), k) for r in results]
        scores[f"maj@{k}"] = [maj_at_k(r.answers, r.rewards, k) for r in results]
    return scores


def summarize(results: list[PromptResult], ks: Sequence[int]) -> dict[str, float]:
    """pass@k and maj@k for each k, mean accuracy, EM and F1 over all samples."""
    n = len(results[0].rewards)
    per_prompt = per_prompt_scores(results, ks)
    metrics = {
        "accuracy": sum(sum(r.rewards) / n for r in results) / len(results),
        "em": sum(sum(r.em) / n for r in results) / len(results),
        "f1": sum(sum(r.f1) / n for r in results) / len(results),
        "prompts": float(len(results)),
        "samples_per_prompt": float(n),
    }
    metrics.update({name: sum(values) / len(values) for name, values in per_prompt.items()})
    return metrics


@dataclass
class Diagnosis:
    p0: float  # mean success rate of one sample
    frac_zero_success: float  # share of prompts with no success among M samples
    group_size: int
    estimator: str
    q: float
    suggested_group_size: int
    reason: str


MAX_GROUP_SIZE = 64


def single_success_share(p0: float, group_size: int) -> float:
    """Among groups of ``group_size`` samples with at least one success, the share with exactly one:
    ``M p (1-p)^(M-1) / (1 - (1-p)^M)`` (1 as p -> 0)."""
    if p0 <= 0:
        return 1.0
    any_success = -math.expm1(group_size * math.log1p(-min(p0, 1 - 1e-12)))
    return group_size * p0 * (1 - p0) ** (group_size - 1) / any_success


def recommend(p0: float, frac_zero_success: float, group_size: int, verifier: str) -> Diagnosis:
    """The paper's practical guide, revised by the escape study (docs/escape.md, docs/maths.md).

    The amplification ``P_hat^-q`` only reweights groups with *different* success counts: where nearly every
    group with a success has exactly one, GRPO and GARL at every q give parallel gradients (the study measured a
    cosine of 1.000 between GRPO's and GARL q=1's) and, under Adam, the same update. So:

    - group size: the smallest M with ``p0 * M >= 1`` (success counts then vary), at least 2, at most 64;
    - q where that M is reachable: the paper's guide, near 0 for warm starts (p0 >= 0.3), 0.5 in the middle
      (0.05 <= p0 < 0.3), 0.75 for cold starts (1/64 <= p0 < 0.05);
    - below p0 = 1/64 q cannot act: q = 0 (GARL's unbiased, lowest-variance member, the same direction as any
      other q); what helps there is more prompts per step and a warm-up, not a higher q;
    - estimator: GARL for structured answers (numeric or exact match), PAFT for open-ended QA (em, f1).
    """
    estimator = "paft" if verifier in ("em", "f1") else "garl"
    needed = MAX_GROUP_SIZE if p0 <= 0 else min(MAX_GROUP_SIZE, max(2, math.ceil(1.0 / p0)))
    if p0 >= 0.3:
        q, regime = 0.0, "warm start: RLVR-like q near 0 is stable and best"
    elif p0 >= 0.05:
        q, regime = 0.5, "intermediate: q around 0.5 trades escape speed against label noise"
    elif p0 * MAX_GROUP_SIZE >= 1:
        q, regime = (
            0.75,
            f"cold start: q = 0.75 amplifies the rare successes, with M >= {needed} so that groups differ in their success counts",
        )
    else:
        share = single_success_share(p0, MAX_GROUP_SIZE)
        q, regime = (
            0.0,
            (
                f"cold start below 1/{MAX_GROUP_SIZE}: even at M = {MAX_GROUP_SIZE}, {share:.0%} of the groups with a "
                f"success have exactly one, where every q gives GRPO's update direction (docs/escape.md), so q "
                f"cannot act; use more prompts per step or an SFT warm-up"
            ),
        )
    reason = f"{regime}; {estimator.upper()} for {'open-ended' if estimator == 'paft' else 'structured'} answers"
    if p0 == 0:
        reason += "; no success at all: RL gets no signal, warm up with SFT first or sample more"
    return Diagnosis(p0, frac_zero_success, group_size, estimator, q, needed, reason)


def diagnose(results: list[PromptResult], verifier: str) -> Diagnosis:
    m = len(results[0].rewards)
    p0 = sum(sum(r.rewards) / m for r in results) / len(results)
    zero = sum(1 for r in results if max(r.rewards) == 0) / len(results)
    return recommend(p0, zero, m, verifier)


def load_for_eval(model: str, data: str | Path, limit: int = 0, seed: int = 0):
    """(model in eval mode, tokenizer, rows): the rows first, so that bad rows are reported before the model loads."""
    from tsallis_core.config import ModelConfig
    from tsallis_core.data.records import load_records
    from tsallis_core.training.engines import pick_device
    from tsallis_core.training.models import load_model, load_tokenizer

    rows = load_records(str(data))[: limit or None]
    model_cfg = ModelConfig(name_or_path=model)
    return load_model(model_cfg, pick_device("auto"), seed).eval(), load_tokenizer(model_cfg), rows


def evaluate_model(
    model: str,
    data: str | Path,
    n: int,
    ks: Sequence[int] | None = None,
    verifier: str = "exact",
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    seed: int = 0,
    limit: int = 0,
    settings: RolloutConfig | None = None,
) -> dict:
    """``tsallis evaluate`` as a function: n samples per row of ``data`` from ``model``, scored (pass@k and maj@k
    for each k, by default 1 and n), decoded as ``settings`` (``rollout.*``) say. Returns the JSON record that the
    command writes (``{model, data, verifier, temperature, metrics}``)."""
    net, tokenizer, rows = load_for_eval(model, data, limit, seed)
    results = sample_and_score(net, tokenizer, rows, n, verifier, temperature, max_new_tokens, seed, settings=settings)
    ks = sorted(set(ks or [1, n]))
    return {
        "model": str(model),
        "data": str(data),
        "verifier": verifier,
        "temperature": temperature,
        "metrics": summarize(results, ks),
        "per_prompt": per_prompt_scores(results, ks),
    }


def write_json(payload: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path
