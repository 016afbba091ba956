"""The synthetic cold-start task that ships with the project.

A prompt lists 2-5 digits from 1-9; a worked completion adds them up step by step and ends in an
``Answer: NN`` line (two digits, so 100 possible answers); only that line is verified.

    Q: 7+8+9+6                      <- prompt
    7+8=15;15+9=24;24+6=30          <- reasoning
    Answer: 30                      <- the only verified part

The cold start is made by training, not by code: the base model is the embedded tiny model
after SFT on a *pre-training corpus* whose reasoning steps and answers are always consistent
(the answer is the last running total written) but whose reasoning is complete only at a rate
``c_n`` (n terms); otherwise it stops after a uniformly chosen number of steps ``k < n - 1``
and answers that partial total, which is wrong. The model learns when to stop, so it
completes (and succeeds) with probability about ``c_n``; the knob ``p0`` sets the mean of
``c_n`` over prompts. RL has to learn to finish the sum: "think to the end".

Measured on a first design (complete reasoning, answer right at rate c, else uniform over
00-99): a small model never found the rare right answers in the noise and guessed uniformly
whatever c was (1.2% success at a 5% target, after 600 and after 1500 SFT steps), so the knob
did not work; stopping early is a decision the model learns at every step, and it does.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SyntheticTaskConfig(BaseModel):
    """Knobs of the synthetic cold-start task (all generation is deterministic from ``seed``)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, description="seed of the generator; the same seed gives the same files")
    p0: float = Field(
        0.05,
        gt=0.0,
        le=1.0,
        description="target mean starting success rate of the base model (share of complete reasoning)",
    )
    min_terms: int = Field(2, ge=2, le=5, description="fewest digits in a prompt")
    max_terms: int = Field(5, ge=2, le=8, description="most digits in a prompt")
    difficulty_spread: float = Field(
        2.0, ge=1.0, description="ratio of complete-reasoning rates between n and n+1 terms"
    )
    num_pretrain: int = Field(38400, ge=1, description="rows of the pre-training corpus that makes the base model")
    num_train: int = Field(2000, ge=1, description="RL training prompts")
    num_test: int = Field(200, ge=1, description="held-out evaluation prompts")
    stop_hazard: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="if set, the corpus stops early at each step "
        "with this probability, so complete reasoning has rate (1 - h)^(n-1): hard prompts "
        "are rare through many moderate decisions, which a small model learns (replaces p0)",
    )
    term_weights: list[float] | None = Field(
        None, description="relative frequency of each term count min_terms..max_terms (default: uniform)"
    )
    label_noise: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="share of RL training prompts whose gold answer is wrong "
        "(a partial total, as an early stop gives: reachable, so it can be memorised)",
    )

    @model_validator(mode="after")
    def _terms_ordered(self) -> SyntheticTaskConfig:
        if self.min_terms > self.max_terms:
            raise ValueError(f"min_terms ({self.min_terms}) must not exceed max_terms ({self.max_terms})")
        count = self.max_terms - self.min_terms + 1
        if self.term_weights is not None and (
            len(self.term_weights) != count or min(self.term_weights) < 0 or sum(self.term_weights) <= 0
        ):
            raise ValueError(
                f"term_weights must give {count} non-negative weights (terms {self.min_terms}..{self.max_terms}), "
                f"not all zero; got {self.term_weights}"
            )
        return self

    def term_shares(self) -> dict[int, float]:
        """Share of prompts with n terms."""
        terms = list(range(self.min_terms, self.max_terms + 1))
        weights = self.term_weights or [1.0] * len(terms)
        return {n: w / sum(weights) for n, w in zip(terms, weights)}

    def mean_correct_rate(self) -> float:
        """The corpus's rate of complete reasoning averaged over the prompt mix (the target start success)."""
        shares, rates = self.term_shares(), self.correct_rates()
        return sum(shares[n] * rates[n] for n in shares)

    def correct_rates(self) -> dict[int, float]:
        """Per term count n, the rate ``c_n`` of complete reasoning (right answers) in the pre-training corpus."""
        terms = range(self.min_terms, self.max_terms + 1)
        if self.stop_hazard is not None:
            return {n: (1.0 - self.stop_hazard) ** (n - 1) for n in terms}
        mean_c = self.p0
        weights = {n: self.difficulty_spread ** -(n - self.min_terms) for n in terms}
        scale = mean_c * len(weights) / sum(weights.values())
        return {n: min(1.0, w * scale) for n, w in weights.items()}


def make_prompt(digits: list[int]) -> str:
    return "Q: " + "+".join(map(str, digits)) + "\n"


def worked_solution(digits: list[int], num_steps: int | None = None) -> tuple[str, str]:
    """(reasoning, answer) after ``num_steps`` of the n-1 additions (all by default)."""
    steps, total = [], digits[0]
    for d in digits[1:] if num_steps is None else digits[1 : num_steps + 1]:
        steps.append(f"{total}+{d}={total + d}")
        total += d
    return ";".join(steps), f"{total:02d}"


REASONING_FORMS = ("complete", "early_stop", "unsound")


def reasoning_form(prompt: str, completion: str) -> str:
    """What a completion is, in the corpus's terms: ``complete`` (the whole worked sum and its answer, the only
    right one), ``early_stop`` (the corpus's own way to fail: a correct partial sum, answering its running total),
    or ``unsound`` (anything else: a wrong step, a skipped term, an answer with no sum behind it). Leading and
    trailing whitespace is ignored; the prompt must be one that ``make_prompt`` writes."""
    digits = [int(d) for d in prompt.strip().removeprefix("Q:").strip().split("+")]
    text = completion.strip()
    if text == "{}\nAnswer: {}".format(*worked_solution(digits)):
        return "complete"
    partial = ("{}\nAnswer: {}".format(*worked_solution(digits, k)).strip() for k in range(len(digits) - 1))
    return "early_stop" if text in partial else "unsound"


def generate(config: SyntheticTaskConfig, split: str) -> list[dict]:
    """Rows of one split: ``pretrain`` (with completions, answers corrupted at rate 1 - c_n), ``train``, ``test``."""
    sizes = {"pretrain": config.num_pretrain, "train": config.num_train, "test": config.num_test}
    if split not in sizes:
        raise ValueError(f"split must be one of {', '.join(sizes)}; got {split!r}")
    rng = random.Random(f"{config.seed}-{split}")
    rates = config.correct_rates()
    noise_rng = random.Random(f"{config.seed}-{split}-noise")  # its own stream: the prompts stay those of label_noise=0
    rows = []
    for i in range(sizes[split]):
        if config.term_weights is None:
            n = rng.randint(config.min_terms, config.max_terms)
        else:
            shares = config.term_shares()
            n = rng.choices(list(shares), weights=list(shares.values()))[0]
        digits = [rng.randint(1, 9) for _ in range(n)]  # no zeros: a partial total is never the final one
        reasoning, answer = worked_solution(digits)
        row = {"id": f"synthetic-{split}-{i:06d}", "prompt": make_prompt(digits), "answer": answer, "difficulty": n}
        if split == "train" and config.label_noise and noise_rng.random() < config.label_noise:
            _, wrong = worked_solution(digits, noise_rng.randrange(n - 1))
            row.update(answer=wrong, true_answer=answer, noisy=True)
        if split == "pretrain":
            if config.stop_hazard is not None:  # stop before each step with probability h
                steps = next((k for k in range(n - 1) if rng.random() < config.stop_hazard), n - 1)
                if steps < n - 1:
                    reasoning, answer = worked_solution(digits, steps)
            elif rng.random() >= rates[n]:  # stop early: a consistent but wrong partial total
                reasoning, answer = worked_solution(digits, rng.randrange(n - 1))
            row["completion"] = f"{reasoning}\nAnswer: {answer}"
        rows.append(row)
    return rows


def write_splits(config: SyntheticTaskConfig, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in ("pretrain", "train", "test"):
        paths[split] = out / f"{split}.jsonl"
        with paths[split].open("w") as f:
            for row in generate(config, split):
                f.write(json.dumps(row) + "\n")
    (out / "task.json").write_text(config.model_dump_json(indent=2))
    return paths
