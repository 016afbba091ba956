"""The cold-start study: its lr search, task knobs, per-stratum metrics, statistics, and a tiny study for real."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_tsallis

from tsallis_core.config import load_config
from tsallis_core.data.synthetic import SyntheticTaskConfig, generate, worked_solution
from tsallis_core.maths.curves import steps_to_escape
from tsallis_core.maths.stats import bootstrap_interval, paired_bootstrap_difference, t_interval
from tsallis_core.studies.escape import widen_grid
from tsallis_core.training.engines import TorchEngine
from tsallis_core.training.rl import label_noise_rates, success_by_stratum


def test_widen_grid_grows_toward_the_best_edge_until_the_best_is_inside():
    grid = [1e-3, 1e-2, 1e-1]
    assert widen_grid(grid, {1e-3: 0.1, 1e-2: 0.2, 1e-1: 0.15}, True) == (grid, 1e-2)  # inside: done
    assert widen_grid(grid, {1e-3: 0.1, 1e-2: 0.2, 1e-1: 0.3}, True) == ([1e-3, 1e-2, 1e-1, 1.0], None)
    assert widen_grid(grid, {1e-3: 0.3, 1e-2: 0.2, 1e-1: 0.1}, True) == ([1e-4, 1e-3, 1e-2, 1e-1], None)
    # a flat stall: ties go to the larger lr, which widens upward until something moves or diverges (-1)
    assert widen_grid(grid, {1e-3: 0.0, 1e-2: 0.0, 1e-1: 0.0}, True) == ([1e-3, 1e-2, 1e-1, 1.0], None)
    assert widen_grid(grid, {1e-3: 0.0, 1e-2: 0.0, 1e-1: -1.0}, True) == (grid, 1e-2)
    assert widen_grid(grid, {1e-3: 0.1, 1e-2: 0.2, 1e-1: 0.3}, False) == (grid, 1e-1)  # out of widenings
    assert widen_grid([1e-3], {1e-3: 0.5}, True) == ([1e-3], 1e-3)  # a single lr is not searched


def test_stop_hazard_makes_rare_successes_from_moderate_decisions():
    cfg = SyntheticTaskConfig(min_terms=3, max_terms=6, stop_hazard=0.5, term_weights=[1, 1, 2, 4], num_pretrain=20000)
    assert cfg.correct_rates() == {3: 0.25, 4: 0.125, 5: 0.0625, 6: 0.03125}
    assert cfg.term_shares() == {3: 0.125, 4: 0.125, 5: 0.25, 6: 0.5}
    assert cfg.mean_correct_rate() == pytest.approx(0.125 * 0.25 + 0.125 * 0.125 + 0.25 * 0.0625 + 0.5 * 0.03125)
    rows = generate(cfg, "pretrain")
    for n, share in cfg.term_shares().items():
        members = [r for r in rows if r["difficulty"] == n]
        assert abs(len(members) / len(rows) - share) < 0.02
        complete = sum(r["completion"].endswith("Answer: " + r["answer"]) for r in members) / len(members)
        assert abs(complete - cfg.correct_rates()[n]) < 4 * math.sqrt(cfg.correct_rates()[n] / len(members)) + 1e-3
    with pytest.raises(ValueError, match="term_weights must give 4"):
        SyntheticTaskConfig(min_terms=3, max_terms=6, term_weights=[1, 2])


def test_label_noise_replaces_a_share_of_answers_with_reachable_partial_totals():
    clean = generate(SyntheticTaskConfig(num_train=4000), "train")
    noisy = generate(SyntheticTaskConfig(num_train=4000, label_noise=0.25), "train")
    assert [r["prompt"] for r in noisy] == [r["prompt"] for r in clean]  # the same prompts
    flipped = [r for r in noisy if r.get("noisy")]
    assert abs(len(flipped) / len(noisy) - 0.25) < 0.03
    for row in flipped:
        digits = [int(d) for d in row["prompt"][3:].strip().split("+")]
        partials = {worked_solution(digits, k)[1] for k in range(len(digits) - 1)}
        assert row["answer"] in partials and row["answer"] != row["true_answer"] == worked_solution(digits)[1]
    assert not any(r.get("noisy") for r in generate(SyntheticTaskConfig(label_noise=0.25), "test"))


def test_success_by_stratum_and_label_noise_rates():
    rows = [{"difficulty": 3}, {"difficulty": 4}, {"difficulty": 3, "noisy": True}, {"difficulty": 5, "noisy": True}]
    per_prompt = torch.tensor([0.5, 0.0, 0.25, 1.0])
    assert success_by_stratum(rows, per_prompt) == {
        "success_rate/difficulty_3": 0.375,
        "success_rate/difficulty_4": 0.0,
        "success_rate/difficulty_5": 1.0,
    }
    assert success_by_stratum([{}, {}], torch.tensor([1.0, 0.0])) == {}
    assert label_noise_rates(rows, per_prompt, torch.tensor([0.0, 0.0, 0.5, 0.0])) == {
        "noise/clean_success_rate": 0.25,
        "noise/wrong_label_rate": 0.625,
        "noise/true_answer_rate": 0.25,
    }


def test_optim_eps_reaches_adamw():
    model = torch.nn.Linear(2, 1)
    engine = TorchEngine(model, load_config(None, ["optim.eps=1e-3"]).optim, total_steps=1)
    assert engine.optimizer.param_groups[0]["eps"] == 1e-3


def test_intervals():
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3))
    assert t_interval([0.5]) == (0.5, 0.5, 0.5)
    mean, low, high = bootstrap_interval([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]], resamples=500)
    assert mean == 0.5 and 0.0 <= low < 0.5 < high <= 1.0
    assert bootstrap_interval([[1.0, 1.0]], resamples=100) == (1.0, 1.0, 1.0)
    diff, low, high = paired_bootstrap_difference([[1.0, 1.0, 0.0, 1.0]], [[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
    assert diff == pytest.approx(0.5 - 0.125) and low <= diff <= high
    assert steps_to_escape([0, 0, 0.5, 0.5, 0.5, 0.5, 0.5], 0.3) == 5 and steps_to_escape([0.1] * 9, 0.3) is None


TINY = """
out: {out}
workers: 2
seeds: 2
widen_limit: 1
base: {{name: cold, task: {{min_terms: 2, max_terms: 3, p0: 0.6, num_train: 64, num_test: 16}}, sft_steps: 40,
        measure_prompts: 8, measure_samples: 2}}
regimes:
  adamw: {{optimizer: adamw, grad_clip: 1.0, lr_grid: {{default: [1.0e-4, 1.0e-3]}}}}
settings: [grpo, "garl:0.75"]
run: {{steps: 3, group_size: 4, prompts_per_step: 2, max_new_tokens: 16}}
factors: {{regimes: [adamw], settings: ["garl:0.75"], values: {{baseline: [none]}}, lr_offsets: [0]}}
eval: {{prompts: 8, n: 2}}
horizon: {{regimes: [adamw], settings: [grpo], lrs: {{adamw: {{grpo: 1.0e-3}}}}, steps: 8, stop_after: 0,
          forms_prompts: 8, forms_samples: 2}}
mechanism: {{regime: adamw, prompts_per_step: [4], batches: 1, state_steps: 2}}
noise: {{base: {{name: noisy, task: {{min_terms: 2, max_terms: 3, p0: 0.6, label_noise: 0.5, num_train: 64, num_test: 16}},
         sft_steps: 40, measure_prompts: 8, measure_samples: 2}}, lrs: [1.0e-3], settings: ["garl:0", "garl:1"], steps: 2,
         noisy_prompts: 4}}
"""


def test_a_tiny_study_runs_every_part_caches_its_runs_and_reports(tmp_path):
    params = tmp_path / "study.yaml"
    params.write_text(TINY.format(out=tmp_path / "study"))
    first = run_tsallis("study", "escape", "--params", str(params), "--report", str(tmp_path / "report"), timeout=900)
    assert "lr search:" in first.stdout and "evaluations:" in first.stdout
    cells = json.loads((tmp_path / "study" / "cells.json").read_text())
    assert {c["group"] for c in cells.values()} == {"core", "noise", "factor", "horizon"}
    horizon = next(c for c in cells.values() if c["group"] == "horizon")
    assert horizon["best_lr"] == 1e-3 and horizon["run"]["stop_after_escape"] == 0
    for run in map(Path, horizon["run_dirs"]):  # a horizon run stops once it escapes (at its cap otherwise)
        curve = json.loads((run / "result.json").read_text())["curves"]["success_rate"]
        escaped = steps_to_escape(curve, 0.2)
        assert len(curve) == (escaped if escaped is not None else 8)
    base_dir = tmp_path / "study" / "base-cold"
    for where in [base_dir, *map(Path, horizon["run_dirs"])]:  # what the base and each final model's samples are
        forms = json.loads((where / "forms.json").read_text())
        assert forms["samples"] > 0 and sum(forms["forms"].values()) == pytest.approx(1.0)
    cells = {n: c for n, c in cells.items() if c["group"] != "horizon"}
    for name, cell in cells.items():
        assert cell["best_lr"] in cell["grid"], name
        assert len(cell["run_dirs"]) == 2
        for run in map(Path, cell["run_dirs"]):  # every cell has every seed at its best lr, evaluated
            result = json.loads((run / "result.json").read_text())
            assert len(result["curves"]["success_rate"]) == cell["run"]["steps"] and result["error"] is None
            assert set(json.loads((run / "eval.json").read_text())) >= {"pass@1", "pass@2", "maj@2"}
    assert all(len(c["grid"]) == 1 for c in cells.values() if c["group"] == "factor")  # lr_offsets [0]: no search
    noise_eval = Path(next(c for c in cells.values() if c["group"] == "noise")["run_dirs"][0]) / "eval.json"
    assert "noisy_wrong_label" in json.loads(noise_eval.read_text())
    assert len(list((tmp_path / "study" / "mechanism").glob("*.json"))) == 2  # fresh and after 2 steps
    ledger = json.loads((tmp_path / "study" / "study.json").read_text())
    assert ledger["wall_seconds"] > 0 and len(ledger["sessions"]) == 1
    report = (tmp_path / "report" / "report.md").read_text()
    for heading in (
        "## Core grid",
        "## Mechanism",
        "## Label noise",
        "## One factor at a time",
        "## Learning-rate search",
    ):
        assert heading in report
    assert (tmp_path / "report" / "core_curves.png").stat().st_size > 0
    assert "The base's completions on the runs' training prompts: complete" in report
    assert "unsound at the end, seeds |" in report
    # everything is cached: a second invocation trains nothing
    second = run_tsallis("study", "escape", "--params", str(params))
    assert "to do" not in second.stdout and "mechanism:" not in second.stdout
    assert len(json.loads((tmp_path / "study" / "study.json").read_text())["sessions"]) == 2
    # a study copied elsewhere (docs/escape/horizon-*) reports from where its runs are now
    shutil.copytree(tmp_path / "study", tmp_path / "copy", ignore=shutil.ignore_patterns("model", "*.safetensors"))
    shutil.rmtree(tmp_path / "study")
    run_tsallis(
        "study", "report", "--params", str(params), "--out", str(tmp_path / "copy-report"), f"out={tmp_path / 'copy'}"
    )
    horizon = (tmp_path / "copy-report" / "report.md").read_text().split("## Horizon")[1].split("\n## ")[0]
    row = next(line for line in horizon.splitlines() if line.startswith("| adamw | grpo |"))
    assert re.search(r"\| [01]\.\d\d, [01]\.\d\d \|$", row), row  # each seed's unsound share, read in the copy


def test_bad_study_params_are_one_line_errors(tmp_path):
    params = tmp_path / "study.yaml"
    params.write_text("regimes: {adamw: {optimizer: adam}}\n")
    result = run_tsallis("study", "escape", "--params", str(params), check=False)
    assert result.returncode == 2 and "regimes.adamw.optimizer" in result.stderr and "Traceback" not in result.stderr
    result = run_tsallis("study", "escape", "--params", str(tmp_path / "missing.yaml"), check=False)
    assert result.returncode == 2 and "does not exist" in result.stderr
    params.write_text("seeds: 3\n")  # key=value after --parts is an override, not a part
    result = run_tsallis("study", "escape", "--params", str(params), "--parts", "core", "workers=0", check=False)
    assert result.returncode == 2 and "workers: Input should be greater than or equal to 1" in result.stderr


def test_study_report_refuses_to_overwrite_a_report_with_an_empty_one(tmp_path):
    report = tmp_path / "escape"
    report.mkdir()
    (report / "report.md").write_text("the committed report\n")
    result = run_tsallis(
        "study",
        "report",
        "--params",
        str(REPO / "configs/study/escape.yaml"),
        "--out",
        str(report),
        f"out={tmp_path / 'no-runs'}",
        check=False,
    )
    assert result.returncode == 2 and (report / "report.md").read_text() == "the committed report\n"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tsallis: error: no runs of the study under")
    assert f"cp -r docs/escape/study {tmp_path / 'no-runs'}" in lines[0]


def test_the_horizon_table_gives_a_lower_bound_where_grpo_is_capped_and_no_ratio_where_both_are():
    from tsallis_core.studies.escape_report import horizon_table

    def summary(setting: str, escape: list[int | None]) -> dict:
        return {"regime": "sgd", "setting": setting, "best_lr": 0.1, "steps": 800, "escape": escape}

    capped = horizon_table([summary("grpo", [None, None, None]), summary("garl:0.75", [None, None, None])])
    assert "| sgd | garl:0.75 | 0.1 | >800, >800, >800 | 800 / 800 / 800 | both capped: no ratio |" in capped
    table = horizon_table([summary("grpo", [None, 400, None]), summary("garl:0.75", [100, 200, 100])])
    assert "| sgd | garl:0.75 | 0.1 | 100, 200, 100 | 100 / 100 / 200 | >=8.00 [" in table


def test_the_horizon_report_sets_the_language_model_against_the_simulators_prediction(tmp_path):
    from tsallis_core.studies.escape_report import horizon_table, plot_predicted_vs_measured

    def summary(setting: str, escape: list[int | None]) -> dict:
        return {"regime": "sgd", "setting": setting, "best_lr": 0.1, "steps": 800, "escape": escape}

    predictions = {"regimes": {"sgd": {"ratios": {"garl:1": {"median_ratio": 3.1, "low": 2.2, "high": 4.0}}}}}
    measured = [summary("grpo", [None, 400, None]), summary("garl:1", [100, 200, 100])]
    assert "| >=8.00 [" in horizon_table(measured, predictions)
    assert horizon_table(measured, predictions).endswith("| 3.10 [2.20, 4.00] |  |")
    assert plot_predicted_vs_measured(measured, predictions, tmp_path / "predicted.png").stat().st_size > 0
    capped = [summary("grpo", [None] * 3), summary("garl:1", [None] * 3)]
    assert plot_predicted_vs_measured(capped, predictions, tmp_path / "none.png") is None  # no measured ratio


def test_tqdm_disable_set_after_import_switches_the_bars_off(monkeypatch):
    """The escape study sets TQDM_DISABLE in a running process (tqdm already imported) before forking its workers."""
    import io

    from tsallis_core.progress import progress_bar

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert not progress_bar(total=2, file=io.StringIO()).disable
    assert progress_bar(total=2, file=io.StringIO(), show=False).disable
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress_bar(total=2, file=io.StringIO()).disable


def test_the_horizon_part_predicts_each_regime_from_the_simulator_before_its_runs_and_caches_it(tmp_path):
    from tsallis_core.studies.escape import StudyConfig, predict_horizon

    study = StudyConfig.model_validate(
        {
            "regimes": {"sgd": {"optimizer": "sgd"}},
            "run": {"group_size": 8, "prompts_per_step": 8},
            "horizon": {
                "regimes": ["sgd"],
                "settings": ["grpo", "garl:1"],
                "lrs": {"sgd": {"grpo": 0.1, "garl:1": 3.16e-3}},
                "simulate": str(REPO / "configs" / "simulate.yaml"),
                "predict_seeds": 3,
            },
        }
    )
    predictions = predict_horizon(study, 0.01, tmp_path)
    ratio = predictions["regimes"]["sgd"]["ratios"]["garl:1"]
    assert ratio["low"] <= ratio["median_ratio"] <= ratio["high"]
    assert len(predictions["regimes"]["sgd"]["steps_to_escape"]["grpo"]) == 3
    written = (tmp_path / "horizon_predictions.json").stat().st_mtime_ns
    assert predict_horizon(study, 0.01, tmp_path) == predictions  # cached: nothing reruns
    assert (tmp_path / "horizon_predictions.json").stat().st_mtime_ns == written
    assert predict_horizon(study, 0.0, tmp_path) == {}  # a base that never succeeds: nothing to predict from
