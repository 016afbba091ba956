import pytest

from tsallis_core.data.synthetic import (
    SyntheticTaskConfig,
    generate,
    reasoning_form,
    worked_solution,
    write_splits,
)
from tsallis_core.data.verify import exact_reward, extract_answer


def test_generation_is_deterministic_and_splits_differ(tmp_path):
    cfg = SyntheticTaskConfig(num_pretrain=50, num_train=20, num_test=10)
    assert generate(cfg, "train") == generate(cfg, "train")
    assert generate(cfg, "train") != generate(cfg, "test")
    assert generate(cfg, "train") != generate(cfg.model_copy(update={"seed": 1}), "train")
    paths = write_splits(cfg, tmp_path)
    assert sum(1 for _ in paths["pretrain"].open()) == 50 and (tmp_path / "task.json").is_file()


def test_worked_solution_and_partial_totals():
    assert worked_solution([7, 8, 9, 6]) == ("7+8=15;15+9=24;24+6=30", "30")
    assert worked_solution([7, 8, 9, 6], 1) == ("7+8=15", "15")
    assert worked_solution([2, 6], 0) == ("", "02")


def test_reasoning_form_names_the_corpus_forms_and_everything_else_unsound():
    prompt = "Q: 7+8+9+6\n"
    assert reasoning_form(prompt, "7+8=15;15+9=24;24+6=30\nAnswer: 30") == "complete"
    assert reasoning_form(prompt, " 7+8=15;15+9=24;24+6=30\nAnswer: 30\n") == "complete"
    assert reasoning_form(prompt, "7+8=15;15+9=24\nAnswer: 24") == "early_stop"
    assert reasoning_form(prompt, "\nAnswer: 07") == "early_stop"
    assert reasoning_form(prompt, "Answer: 30") == "unsound"  # the right answer with no sum behind it
    assert reasoning_form(prompt, "7+8=15;15+9=25;25+6=31\nAnswer: 31") == "unsound"  # a wrong step
    assert reasoning_form(prompt, "7+8=15;15+6=21\nAnswer: 21") == "unsound"  # a skipped term
    assert reasoning_form(prompt, "7+8=15;15+9=24\nAnswer: 30") == "unsound"  # an answer its sum does not give
    cfg = SyntheticTaskConfig(stop_hazard=0.5, num_pretrain=300)
    for row in generate(cfg, "pretrain"):  # the corpus holds the two sound forms only, right iff complete
        form = reasoning_form(row["prompt"], row["completion"])
        assert form == ("complete" if row["completion"].endswith(f"Answer: {row['answer']}") else "early_stop")


@pytest.mark.parametrize("p0", [0.01, 0.05, 0.2])
def test_p0_sets_the_share_of_complete_reasoning_in_the_corpus(p0):
    cfg = SyntheticTaskConfig(p0=p0, num_pretrain=40000)
    rates = cfg.correct_rates()
    assert sum(rates.values()) / len(rates) == pytest.approx(p0)
    assert rates[2] > rates[3] > rates[4] > rates[5]  # more terms, rarer success
    rows = generate(cfg, "pretrain")
    right = [exact_reward(r["completion"], r["answer"]) for r in rows]
    by_n = {n: [x for x, r in zip(right, rows) if r["difficulty"] == n] for n in rates}
    for n, xs in by_n.items():  # binomial tolerance: 4 standard deviations; an early stop is never right
        assert abs(sum(xs) / len(xs) - rates[n]) < 4 * (rates[n] * (1 - rates[n]) / len(xs)) ** 0.5 + 1e-3
    # every completion is self-consistent: its answer is its last running total
    for r in rows[:200]:
        reasoning, answer = r["completion"].split("\nAnswer: ")
        assert answer == (reasoning.rsplit("=", 1)[1].zfill(2) if reasoning else r["prompt"][3:4].zfill(2))


def test_extract_and_verify():
    assert extract_answer("7+8=15\nAnswer: 15") == "15"
    assert extract_answer("Answer: 3\nmore\nAnswer: 15 ") == "15"  # the last Answer: line wins
    assert extract_answer("no answer here") is None
    assert exact_reward("x\nAnswer: 15", "15") == 1.0
    assert exact_reward("x\nAnswer: 16", "15") == 0.0
    assert exact_reward("x", "15") == 0.0


def test_bad_task_knobs():
    with pytest.raises(ValueError, match="min_terms"):
        SyntheticTaskConfig(min_terms=5, max_terms=3)
    with pytest.raises(ValueError, match="split must be one of"):
        generate(SyntheticTaskConfig(), "dev")
