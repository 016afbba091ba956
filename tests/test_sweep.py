"""The sweep report's pure parts: escape steps, champion choice, grid selection, file errors, report files."""

import json
from pathlib import Path

import pytest

from tsallis_core.studies.sweep import (
    SweepError,
    final_success,
    find_run_dirs,
    load_run,
    pick_champion,
    select_runs,
    steps_to_escape,
    write_report,
)


def fake_run(
    root: Path, name: str, estimator: str, q: float | None, seed: int, rates: list[float], metrics: dict
) -> Path:
    run = root / "runs" / name
    run.mkdir(parents=True)
    rl = {"estimator": estimator, "q": q, "q_schedule": {"kind": "constant", "q": 0.75}}
    (run / "config.yaml").write_text(json.dumps({"stage": "rl", "seed": seed, "rl": rl}))
    (run / "history.jsonl").write_text(
        "".join(json.dumps({"step": i + 1, "success_rate": r}) + "\n" for i, r in enumerate(rates))
    )
    (root / "evals").mkdir(exist_ok=True)
    (root / "evals" / f"{name}.json").write_text(json.dumps({"metrics": metrics}))
    return run


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    slow, fast = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.1, 0.5, 0.6, 0.7, 0.8, 0.9, 0.9]
    fake_run(tmp_path, "garl-q0.0-s0", "garl", 0.0, 0, slow, {"maj@4": 0.2, "pass@4": 0.5})
    fake_run(tmp_path, "garl-q1.0-s0", "garl", 1.0, 0, fast, {"maj@4": 0.6, "pass@4": 0.9})
    fake_run(tmp_path, "paft-q0.0-s0", "paft", 0.0, 0, slow, {"maj@4": 0.1, "pass@4": 0.3})
    fake_run(tmp_path, "paft-q1.0-s0", "paft", 1.0, 0, slow, {"maj@4": 0.6, "pass@4": 0.8})
    fake_run(tmp_path, "grpo-s0", "grpo", None, 0, [0.0] * 7, {"maj@4": 0.0, "pass@4": 0.1})
    fake_run(tmp_path, "garl-q0.5-s0", "garl", 0.5, 0, slow, {"maj@4": 0.9, "pass@4": 0.9})  # left from an older grid
    return tmp_path


def test_steps_to_escape_is_the_first_step_whose_moving_average_reaches_the_threshold():
    history = [{"step": i + 1, "success_rate": r} for i, r in enumerate([0.0, 0.2, 0.4, 0.6, 0.8])]
    assert steps_to_escape(history, 0.5, window=2) == 4  # (0.4 + 0.6) / 2
    assert steps_to_escape(history, 0.5, window=5) is None  # the mean of all five is 0.4
    assert steps_to_escape(history, 0.4, window=5) == 5
    assert final_success(history, window=2) == pytest.approx(0.7)


def test_grid_selection_keeps_grid_runs_grpo_and_named_runs_and_skips_stale_ones(sweep_dir):
    dirs = find_run_dirs([sweep_dir / "runs"])
    runs = select_runs(dirs, sweep_dir / "evals", ["garl", "paft"], [0.0, 1.0], [0])
    assert sorted(r.name for r in runs) == ["garl-q0.0-s0", "garl-q1.0-s0", "grpo-s0", "paft-q0.0-s0", "paft-q1.0-s0"]
    named = select_runs(
        find_run_dirs([sweep_dir / "runs", sweep_dir / "runs/garl-q0.5-s0"]), sweep_dir / "evals", ["garl"], [0.0], [0]
    )
    assert sorted(r.name for r in named) == ["garl-q0.0-s0", "garl-q0.5-s0", "grpo-s0"]
    with pytest.raises(SweepError, match="no trained run for estimator=paft q=0.5 seed=0"):
        select_runs(dirs, sweep_dir / "evals", ["paft"], [0.5], [0])


def test_champion_is_the_best_metric_then_the_best_final_training_success(sweep_dir):
    runs = select_runs(find_run_dirs([sweep_dir / "runs"]), sweep_dir / "evals", ["garl", "paft"], [0.0, 1.0], [0])
    assert pick_champion(runs, "maj@4").name == "garl-q1.0-s0"  # ties paft-q1.0 on maj@4, trains to a higher success
    assert pick_champion(runs, "pass@4").name == "garl-q1.0-s0"
    with pytest.raises(SweepError, match="metric 'maj@16' is not in the evaluation of .*it has: maj@4, pass@4"):
        pick_champion(runs, "maj@16")


def test_missing_or_corrupt_files_are_named_with_the_stage_that_writes_them(sweep_dir):
    run = sweep_dir / "runs/garl-q1.0-s0"
    with pytest.raises(SweepError, match=r"nowhere\.json is missing: tsallis evaluate writes it"):
        load_run(run, sweep_dir / "nowhere.json")
    (run / "history.jsonl").write_text('{"step": 1, "success_rate": 0.1}\n{"step": 2,\n')
    with pytest.raises(SweepError, match="history.jsonl line 2 is not valid JSON"):
        load_run(run, sweep_dir / "evals/garl-q1.0-s0.json")
    with pytest.raises(SweepError, match="not a training output directory"):
        find_run_dirs([sweep_dir / "absent"])


def test_report_has_the_table_the_plot_data_and_the_dvc_metrics(sweep_dir, tmp_path):
    runs = select_runs(find_run_dirs([sweep_dir / "runs"]), sweep_dir / "evals", ["garl", "paft"], [0.0, 1.0], [0])
    champion = pick_champion(runs, "maj@4")
    paths = write_report(runs, champion, tmp_path / "report", "maj@4", escape_threshold=0.5)
    text = paths["report"].read_text()
    assert "Champion by `maj@4`: **garl-q1.0-s0**" in text
    row = next(line for line in text.splitlines() if line.startswith("| paft-q1.0-s0 |"))
    assert "| 0 |" in row  # maj@4 equal to the champion's: a gap of 0
    grpo = next(line for line in text.splitlines() if line.startswith("| grpo-s0 |"))
    assert "| -0.6 |" in grpo
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["champion"] == "garl-q1.0-s0" and metrics["runs"]["grpo-s0"]["maj@4"] == 0.0
    assert metrics["runs"]["garl-q1.0-s0"]["final_success"] == pytest.approx(4.5 / 7)  # fewer than 10 steps: all
    curves = paths["curves"].read_text().splitlines()
    assert curves[0] == "series,step,success_rate" and len(curves) == 1 + 5 * 7
    assert paths["final_by_q"].read_text().splitlines()[0].startswith("series,q,run,champion_metric")
    for key in ("success_png", "escape_png", "final_png"):
        assert paths[key].stat().st_size > 10_000


def seeded_run(root: Path, estimator: str, q: float, seed: int, per_prompt: list[float]) -> None:
    name = f"{estimator}-q{q}-s{seed}"
    fake_run(root, name, estimator, q, seed, [0.1] * 5, {"maj@4": sum(per_prompt) / len(per_prompt)})
    record = json.loads((root / "evals" / f"{name}.json").read_text())
    (root / "evals" / f"{name}.json").write_text(json.dumps({**record, "per_prompt": {"maj@4": per_prompt}}))


def test_champion_is_chosen_on_the_seed_mean_and_a_margin_inside_the_noise_is_said_plainly(tmp_path):
    from tsallis_core.studies.sweep import leader_verdict, summarize_settings

    # GARL q=1: one lucky seed (0.9) but a lower mean; PAFT q=1: steady, the higher mean, overlapping seeds
    for seed, prompts in enumerate([[1.0] * 9 + [0.0], [0.0] * 8 + [1.0] * 2]):
        seeded_run(tmp_path, "garl", 1.0, seed, prompts)
    for seed, prompts in enumerate([[1.0] * 6 + [0.0] * 4, [1.0] * 6 + [0.0] * 4]):
        seeded_run(tmp_path, "paft", 1.0, seed, prompts)
    runs = select_runs(find_run_dirs([tmp_path / "runs"]), tmp_path / "evals")
    settings = summarize_settings(runs, "maj@4")
    assert [s.label for s in settings] == ["PAFT q=1", "GARL q=1"] and settings[0].mean == pytest.approx(0.6)
    assert settings[0].interval == "bootstrap over prompts" and settings[0].low <= 0.6 <= settings[0].high
    assert pick_champion(runs, "maj@4").name.startswith("paft-q1.0")  # not the lucky GARL seed
    significant, sentence = leader_verdict(settings)
    assert not significant and "no significant winner" in sentence and "seed ranges overlap" in sentence
    text = write_report(runs, pick_champion(runs, "maj@4"), tmp_path / "report", "maj@4")["report"].read_text()
    assert "no significant winner" in text and "| PAFT q=1 | 2 |" in text


def test_a_winner_is_called_only_with_seeds_apart_and_an_interval_above_zero(tmp_path):
    from tsallis_core.studies.sweep import leader_verdict, summarize_settings

    for seed in range(3):
        seeded_run(tmp_path, "garl", 0.75, seed, [1.0] * (180 + seed) + [0.0] * (20 - seed))
        seeded_run(tmp_path, "garl", 0.0, seed, [1.0] * (40 + seed) + [0.0] * (160 - seed))
    settings = summarize_settings(select_runs(find_run_dirs([tmp_path / "runs"]), tmp_path / "evals"), "maj@4")
    significant, sentence = leader_verdict(settings)
    assert significant and sentence.endswith("a significant winner.") and "seed ranges apart" in sentence
    one_seed = [s for s in summarize_settings([settings[0].runs[0], settings[1].runs[0]], "maj@4")]
    assert not leader_verdict(one_seed)[0]  # one seed each: never a winner
