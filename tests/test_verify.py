"""Verifier rules, with cases written from the datasets' published evaluation rules."""

import pytest

from tsallis_core.tasks.verify import (
    em_reward,
    exact_reward,
    extract_answer,
    f1_reward,
    f1_score,
    finqa_match,
    finqa_reward,
    get_verifier,
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
    [("The Eiffel Tower!", "eiffel tower"), ("  an  apple, a pear ", "apple pear"), ("U.S.A.", "usa"),
     ("Theory of the case", "theory of case")],
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
    with pytest.raises(ValueError, match="verifier must be one of exact, finqa, em, f1"):
        get_verifier("bleu")
