"""Figures of a training-success curve (one value per step, step k at index k - 1): when it escaped, where it ended.

One definition each, used by the trainer (``rl.stop_after_escape``), the sweep report and the escape study.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

ESCAPE_THRESHOLD = 0.2  # the moving-average success that counts as escaped (params.yaml, the pipeline and the CLI)
ESCAPE_WINDOW = 5  # steps in that moving average
FINAL_WINDOW = 10  # last steps averaged for the final success


def steps_to_escape(
    rates: Sequence[float], threshold: float = ESCAPE_THRESHOLD, window: int = ESCAPE_WINDOW
) -> int | None:
    """First step k (1-based) whose mean success over steps k - window + 1 .. k reaches ``threshold``; None if none."""
    for end in range(window, len(rates) + 1):
        if sum(rates[end - window : end]) / window >= threshold:
            return end
    return None


def final_success(rates: Sequence[float], window: int = FINAL_WINDOW) -> float:
    """Mean success over the last ``window`` steps, skipping steps without a value (NaN); NaN when none has one."""
    tail = [x for x in rates[-window:] if not math.isnan(x)]
    return sum(tail) / len(tail) if tail else float("nan")
