import json
import math

import pytest
from conftest import run_diagnose, run_tsallis

from tsallis_core.evaluation.evaluate import (
    PromptResult,
    maj_at_k,
    majority_vote,
    pass_at_k,
    recommend,
    single_success_share,
    summarize,
)


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - math.comb(7, 2) / math.comb(10, 2))
    assert pass_at_k(4, 3, 2) == 1.0  # n - c < k: every k-subset holds a success
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_majority_vote_normalises_and_breaks_ties_by_first_seen():
    assert majority_vote(["The Beatles", "beatles", "Stones"]) == 0
    assert majority_vote(["b", "a", "a", "b"]) == 0  # 2-2 tie: "b" was seen first
    assert majority_vote([None, "x"]) == 1 and majority_vote([None, None]) is None
    assert maj_at_k(["12", "13", "13"], [1.0, 0.0, 0.0], 3) == 0.0
    assert maj_at_k(["12", "13", "13"], [1.0, 0.0, 0.0], 1) == 1.0


def test_summarize():
    results = [
        PromptResult("a", ["1", "1", "2", None], [1.0, 1.0, 0.0, 0.0], [1, 1, 0, 0], [1, 1, 0, 0]),
        PromptResult("b", ["3", "4", "4", "4"], [1.0, 0.0, 0.0, 0.0], [1, 0, 0, 0], [1, 0, 0, 0]),
    ]
    m = summarize(results, [1, 4])
    assert m["accuracy"] == pytest.approx((0.5 + 0.25) / 2)
    assert m["pass@4"] == 1.0 and m["maj@4"] == pytest.approx(0.5)  # "1" wins for a, "4" (wrong) for b
    with pytest.raises(ValueError, match="between 1 and the samples per prompt"):
        summarize(results, [8])


@pytest.mark.parametrize(
    ("p0", "verifier", "estimator", "q", "group_size"),
    [
        (0.6, "exact", "garl", 0.0, 2),
        (0.1, "finqa", "garl", 0.5, 10),
        (0.02, "em", "paft", 0.75, 50),
        (0.01, "exact", "garl", 0.0, 64),
        (0.001, "f1", "paft", 0.0, 64),
    ],
)
def test_recommendation_rule(p0, verifier, estimator, q, group_size):
    d = recommend(p0, 0.5, 8, verifier)
    assert (d.estimator, d.q, d.suggested_group_size) == (estimator, q, group_size)
    assert p0 * d.suggested_group_size >= 1 or d.suggested_group_size == 64  # success counts can vary


def test_below_one_success_per_64_samples_q_cannot_act():
    d = recommend(0.003, 0.98, 8, "exact")
    assert d.q == 0.0 and "q cannot act" in d.reason and "more prompts per step" in d.reason
    # the share of successful groups with exactly one success, M p (1-p)^(M-1) / (1 - (1-p)^M)
    assert single_success_share(0.003, 64) == pytest.approx(64 * 0.003 * 0.997**63 / (1 - 0.997**64))
    assert single_success_share(0.003, 8) > 0.98 and single_success_share(0.5, 8) < 0.1


def test_no_success_at_all_is_called_out():
    d = recommend(0.0, 1.0, 8, "exact")
    assert d.q == 0.0 and d.suggested_group_size == 64 and "no success at all" in d.reason


def test_evaluate_and_diagnose_on_the_embedded_default(task_dir, base_model, tmp_path):
    out = tmp_path / "metrics.json"
    run_tsallis(
        "evaluate",
        "--model",
        str(base_model),
        "--data",
        str(task_dir / "test.jsonl"),
        "--n",
        "4",
        "--k",
        "1",
        "4",
        "--limit",
        "8",
        "--max-new-tokens",
        "24",
        "--out",
        str(out),
    )
    metrics = json.loads(out.read_text())["metrics"]
    assert {"accuracy", "em", "f1", "pass@1", "pass@4", "maj@1", "maj@4"} <= metrics.keys()
    assert metrics["pass@4"] >= metrics["pass@1"] - 1e-12
    # the function that the command and the Kubeflow component call gives the same record (k defaults to 1 and n)
    from tsallis_core.evaluation.evaluate import evaluate_model

    record = evaluate_model(str(base_model), task_dir / "test.jsonl", 4, limit=8, max_new_tokens=24)
    assert record["metrics"] == metrics and record["model"] == str(base_model) and record["verifier"] == "exact"
    diag = tmp_path / "diag.json"
    result = run_diagnose(task_dir / "test.jsonl", diag)
    assert json.loads(diag.read_text())["p0"] == 0.0  # random weights never answer
    assert "recommendation: estimator=garl q=0" in result.stdout  # no success: q cannot act


def test_evaluate_logs_to_mlflow(task_dir, base_model, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_tsallis(
        "evaluate",
        "--model",
        str(base_model),
        "--data",
        str(task_dir / "test.jsonl"),
        "--n",
        "2",
        "--k",
        "1",
        "--limit",
        "4",
        "--max-new-tokens",
        "24",
        "--out",
        str(tmp_path / "m.json"),
        "--track",
        env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "eval-test"},
    )
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["eval-test"], output_format="list")
    assert len(runs) == 1 and runs[0].data.tags["stage"] == "evaluate"
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert runs[0].data.metrics["eval/pass_at_1"] == pytest.approx(metrics["pass@1"])


def test_evaluate_without_out_keeps_out_of_the_reports_input_folder(task_dir, tmp_path):
    """outputs/eval holds one evaluation per sweep run for `tsallis report`; a manual evaluation must not add one."""
    result = run_tsallis(
        "evaluate",
        "--model",
        "embedded:tiny",
        "--data",
        str(task_dir / "test.jsonl"),
        "--n",
        "1",
        "--k",
        "1",
        "--limit",
        "1",
        "--max-new-tokens",
        "4",
        cwd=tmp_path,
    )
    assert (tmp_path / "outputs/evaluate/metrics.json").is_file() and not (tmp_path / "outputs/eval").exists()
    assert "metrics: outputs/evaluate/metrics.json" in result.stdout
