"""Verifier rules, with cases written from the datasets' published evaluation rules."""

import pytest

from tsallis_core.data.registry import get_verifier
from tsallis_core.data.verify import (
    em_reward,
    exact_reward,
    extract_answer,
    f1_reward,
    f1_score,
    finqa_match,
    finqa_reward,
    normalize_answer,
    parse_number,
)


def test_extraction_prefers_the_last_answer_line_then_boxed():
    assert extract_answer("Answer: 1\nwork\nAnswer: 2") == "2"
    assert extract_answer("so \\boxed{14.1\\%} is it") == "14.1\\%"
    assert extract_answer("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_answer("Answer: 7\n\\boxed{8}") == "7"
    assert extract_answer("nothing") is None


# SQuAD v1.1 evaluation (used by HotPotQA and MuSiQue): normalise, then EM and token F1
@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an  apple, a pear ", "apple pear"),
        ("U.S.A.", "usa"),
        ("Theory of the case", "theory of case"),
    ],
)
def test_squad_normalisation(text, normal):
    assert normalize_answer(text) == normal


def test_squad_f1_and_em():
    assert f1_score("the big red barn", "red barn") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert f1_score("barn", "house") == 0.0
    assert f1_score("", "") == 1.0
    assert em_reward("Answer: The Beatles", "beatles") == 1.0
    assert em_reward("Answer: Beatles band", "beatles") == 0.0
    assert f1_reward("Answer: Beatles band", "beatles") == pytest.approx(2 / 3)


def test_best_over_aliases():
    assert em_reward("Answer: NYC", "New York City", aliases=["NYC", "New York"]) == 1.0
    assert f1_reward("Answer: New York", "New York City", aliases=["NY"]) == pytest.approx(0.8)
    assert exact_reward("Answer: 42", "41", aliases=["42"]) == 1.0


# FinQA's evaluation: commas dropped, "x%" is x/100, executed results compared rounded to 5 decimals
@pytest.mark.parametrize(
    ("prediction", "gold", "right"),
    [
        ("1,234.5", "1234.5", True),  # commas
        ("14.1%", "0.141", True),  # percent as a fraction (FinQA's str_to_num)
        ("0.141", "14.1%", True),
        ("14.1", "14.1%", True),  # a percentage stated without its sign
        ("$ 3.2 million", "3.2", True),  # currency and units
        ("(3.2)", "-3.2", True),  # accounting negative
        ("-3.2", "(3.2)", True),
        ("14.1", "14.10773", True),  # rounded to the decimals the prediction shows
        ("14.11", "14.10773", True),
        ("14.2", "14.10773", False),
        ("14", "14.4", False),  # no rounding to an integer
        ("0.123456", "0.123459", True),  # equal after rounding to 5 decimals (FinQA's own rule)
        ("2.5", "3.5", False),
        ("yes", "yes", True),  # FinQA's non-numeric answers
        ("no", "yes", False),
    ],
)
def test_finqa_numeric_rules(prediction, gold, right):
    assert finqa_match(prediction, gold) is right
    assert finqa_reward(f"work\nAnswer: {prediction}", gold) == float(right)


def test_parse_number():
    assert parse_number("€1,000.25") == (1000.25, False, 2)
    assert parse_number("12 percent") == (12.0, True, 0)
    assert parse_number("n/a") is None


def test_unknown_verifier():
    with pytest.raises(ValueError, match="verifier must be one of exact, finqa, em, f1, or package.module:function"):
        get_verifier("bleu")


# HotPotQA's official hotpot_evaluate_v1.py, f1_score: "if normalized_prediction in ['yes', 'no', 'noanswer'] and
# normalized_prediction != normalized_ground_truth: return ZERO_METRIC", and the same for the ground truth
@pytest.mark.parametrize(
    ("prediction", "gold", "f1"),
    [
        ("yes", "no", 0.0),
        ("no", "yes", 0.0),
        ("yes", "yes", 1.0),
        ("Yes.", "yes", 1.0),  # normalised first
        ("yes it is", "yes", 0.0),  # the gold is yes: SQuAD F1 would give 2/3 here, the official rule 0
        ("yes", "yes sir", 0.0),  # the prediction is yes: SQuAD F1 would give 2/3
        ("noanswer", "no answer", 0.0),
        ("no answer", "noanswer", 0.0),
        ("the red barn", "red barn house", 0.8),
    ],  # no yes/no on either side: plain SQuAD F1
)
def test_hotpotqa_official_yes_no_rule(prediction, gold, f1):
    assert f1_score(prediction, gold) == pytest.approx(f1)
    assert f1_reward(f"Answer: {prediction}", gold) == pytest.approx(f1)


# FinQA: after the currency, unit and percent rules, a number is whatever Python's float() reads
@pytest.mark.parametrize(
    ("prediction", "gold", "right"),
    [
        ("1.5e3", "1500", True),
        ("1.5E+3", "1,500", True),
        ("$2.5e6", "2500000", True),
        ("1e-2", "0.01", True),
        ("1.41e1%", "0.141", True),
        ("-4.2e-1", "(0.42)", True),
        (".5", "0.5", True),
        ("1_000", "1000", True),
        ("1.5e3", "1600", False),
        ("about 1.2e3 dollars", "1200", True),
    ],
)
def test_finqa_numbers_parse_as_python_float(prediction, gold, right):
    assert finqa_match(prediction, gold) is right


def test_parse_number_of_scientific_notation_keeps_the_decimals_shown():
    assert parse_number("1.25e1") == (12.5, False, 1)
    assert parse_number("1.5e3") == (1500.0, False, 0)
    assert parse_number("2.5E-2") == (0.025, False, 3)
