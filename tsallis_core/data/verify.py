"""Answer extraction and verifiers: rewards in [0, 1] from a completion and the gold answer(s).

- extraction: the text after the last ``Answer:`` line; else the last ``\\boxed{...}``.
- ``exact``: the extracted answer equals the gold string (after trimming): the synthetic task.
- ``finqa``: numeric match as FinQA's evaluation (commas dropped, ``x%`` read as ``x/100``,
  compared after rounding to 5 decimals), plus what model outputs need: currency signs and
  unit words dropped, ``(3.2)`` read as -3.2, a percentage accepted as ``x`` or ``x/100``, and a
  prediction rounded to the gold's shown decimals; numbers in any form Python's ``float`` reads
  (``1.5e3``); non-numeric golds (yes/no) by exact match.
- ``em`` / ``f1``: SQuAD exact match / token F1 after SQuAD normalisation (lower case, no
  punctuation, no articles a/an/the, collapsed white space), the best over the gold's aliases; F1 is 0
  when either side is yes / no / noanswer and they differ (HotPotQA's official hotpot_evaluate_v1.py).

The verifiers are registered by name in ``tasks/registry.py`` (``get_verifier``), with users' own rewards.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

ANSWER_LINE = re.compile(r"^\s*Answer:\s*(.*?)\s*$", re.MULTILINE)
BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")


def extract_answer(completion: str) -> str | None:
    """The text after the last ``Answer:`` line, else the last ``\\boxed{...}``, else None."""
    found = ANSWER_LINE.findall(completion)
    if found:
        return found[-1]
    boxed = BOXED.findall(completion)
    return boxed[-1].strip() if boxed else None


# ------------------------------------------------------------------------------- SQuAD rules


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop punctuation and articles, collapse white space."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


_CLOSED = ("yes", "no", "noanswer")


def f1_score(prediction: str, gold: str) -> float:
    """SQuAD token F1 between normalised prediction and gold, with HotPotQA's rule for yes / no / noanswer."""
    pred, true = normalize_answer(prediction), normalize_answer(gold)
    # HotPotQA's official hotpot_evaluate_v1.py: a yes/no/noanswer on either side scores 0 unless both agree
    if (pred in _CLOSED or true in _CLOSED) and pred != true:
        return 0.0
    pred_tokens, gold_tokens = pred.split(), true.split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------------------- FinQA rules

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")  # 12, -3.5, .5, 1.2e-3
_PERCENT = re.compile(r"\s*(?:%|percent)$", re.IGNORECASE)
_CURRENCY = re.compile(r"[$€£¥]|\b(?:usd|eur|gbp|dollars?)\b", re.IGNORECASE)
_UNITS = re.compile(r"\b(?:million|billion|thousand|millions|billions|thousands|mn|bn)\b", re.IGNORECASE)


def parse_number(text: str) -> tuple[float, bool, int] | None:
    """(value, is_percent, decimals shown) of the first number in ``text``, or None.

    ``(3.2)`` is -3.2 (accounting negatives); commas, currency signs and unit words are dropped; then the rest
    is read as Python's ``float`` reads it (``1.5e3``), else its first number is.
    """
    t = _UNITS.sub("", _CURRENCY.sub("", text)).replace(",", "").strip()
    negative = t.startswith("(") and t.endswith(")")
    t = t.strip("()").strip()
    is_percent = bool(_PERCENT.search(t))
    token = _PERCENT.sub("", t)
    try:  # whatever Python's float reads (1.5e3, 1_000, .5), after the currency and unit rules
        value = float(token)
    except ValueError:
        match = _NUMBER.search(t)
        if not match:
            return None
        token = match.group()
        value = float(token)
    mantissa, _, exponent = token.lower().replace("_", "").partition("e")
    shown = len(mantissa.split(".")[1]) if "." in mantissa else 0
    decimals = max(shown - int(exponent or 0), 0)  # 1.25e1 shows one decimal of 12.5
    return (-value if negative else value), is_percent, decimals


def finqa_match(prediction: str, gold: str, rel_tol: float = 1e-3) -> bool:
    """FinQA numeric match; see the module docstring for the rules.

    Candidates: the prediction ``p`` (and ``p/100`` when it says %), the gold ``g`` (and ``g/100``
    when it says %, or ``100 g`` when it is a bare fraction |g| <= 1 that a model may state in
    percent). A pair matches when equal after rounding to 5 decimals (FinQA's rule), within
    ``rel_tol`` relative, or when the prediction is the gold rounded to the decimals the
    prediction shows (at least one: "14.1" for 14.1077, not "14" for 14.4).
    """
    gold_num, pred_num = parse_number(gold), parse_number(prediction)
    if gold_num is None or pred_num is None:
        return normalize_answer(prediction) == normalize_answer(gold)
    g, g_pct, _ = gold_num
    p, p_pct, p_dec = pred_num
    golds = [g, g / 100] if g_pct else ([g, g * 100] if abs(g) <= 1 else [g])
    preds = [(p, p_dec), (p / 100, p_dec + 2)] if p_pct else [(p, p_dec)]
    for a, a_dec in preds:
        for b in golds:
            if round(a, 5) == round(b, 5) or abs(a - b) <= rel_tol * abs(b):
                return True
            if a_dec >= 1 and round(a, a_dec) == round(b, a_dec):
                return True
    return False


# ------------------------------------------------------------------------------- rewards


def exact_reward(completion: str, gold: str, aliases: Sequence[str] = ()) -> float:
    """1.0 when the extracted answer equals the gold (or an alias) exactly after trimming."""
    answer = extract_answer(completion)
    return float(answer is not None and answer in {g.strip() for g in (gold, *aliases)})


def finqa_reward(completion: str, gold: str, aliases: Sequence[str] = ()) -> float:
    answer = extract_answer(completion)
    return float(answer is not None and any(finqa_match(answer, g) for g in (gold, *aliases)))


def em_reward(completion: str, gold: str, aliases: Sequence[str] = ()) -> float:
    answer = extract_answer(completion)
    return 0.0 if answer is None else max(exact_match_score(answer, g) for g in (gold, *aliases))


def f1_reward(completion: str, gold: str, aliases: Sequence[str] = ()) -> float:
    answer = extract_answer(completion)
    return 0.0 if answer is None else max(f1_score(answer, g) for g in (gold, *aliases))
