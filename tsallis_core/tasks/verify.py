"""Answer extraction and verifiers (rewards in [0, 1])."""

from __future__ import annotations

import re

ANSWER_LINE = re.compile(r"^\s*Answer:\s*(.*?)\s*$", re.MULTILINE)


def extract_answer(completion: str) -> str | None:
    """The text after the last ``Answer:`` line, or None when there is none."""
    found = ANSWER_LINE.findall(completion)
    return found[-1] if found else None


def exact_match_reward(completion: str, gold: str) -> float:
    """1.0 when the extracted answer equals the gold answer exactly (after trimming), else 0.0."""
    answer = extract_answer(completion)
    return float(answer is not None and answer == gold.strip())


VERIFIERS = {"exact": exact_match_reward}


def get_verifier(name: str):
    if name not in VERIFIERS:
        raise ValueError(f"verifier must be one of {', '.join(VERIFIERS)}; got {name!r}")
    return VERIFIERS[name]
