"""The sampled-estimator simulator (tsallis_core/studies/simulate.py): it follows the gradient-flow theory where P_hat
resolves P, it notices a broken amplification, and its command line and advice work end to end."""

import json

import numpy as np
import pytest
import torch
from conftest import run_diagnose, run_tsallis

from tsallis_core.config import ConfigError
from tsallis_core.evaluation.evaluate import recommend
from tsallis_core.maths import losses, theory
from tsallis_core.maths.stats import bootstrap_median_ratio
from tsallis_core.studies.simulate import (
    OptimizerSpec,
    Run,
    apply_map_advice,
    load_simulate,
    map_advice,
    parse_estimator,
    run_map,
    simulate_runs,
    strata_start_success,
)

torch.set_num_threads(1)

SLOPE_P0S = [0.1, 0.03, 0.01]
SLOPE_QS = (0.0, 0.5, 0.75)
NUM_ANSWERS = 64
LR_PER_PROMPT = 0.2  # flow time per step; the loss averages over prompts, so the lr is prompts x this


def measured_escape_steps() -> dict[float, list[float]]:
    """Tabular policy, SGD, M = 1000 samples per prompt (M p0 >= 10): mean steps to P = 0.5 of 2 seeds, per q."""
    prompts = 4
    cfg = load_simulate(
        None,
        policy="tabular",
        prompts=prompts,
        strata=[1.0],
        thresholds=[0.5],
        num_answers=NUM_ANSWERS,
        cap_min=4000,
        cap_max=4000,
        p0s=[0.1],
    )
    steps: dict[float, list[float]] = {q: [] for q in SLOPE_QS}
    for p0 in SLOPE_P0S:
        runs = [Run(f"garl:{q}", prompts * LR_PER_PROMPT, seed) for q in SLOPE_QS for seed in range(2)]
        records = simulate_runs(cfg, OptimizerSpec(kind="sgd"), p0, 1000, runs)
        for q in SLOPE_QS:
            steps[q].append(float(np.mean([r["steps_to"]["0.5"] for r in records if r["estimator"] == f"garl:{q}"])))
    return steps


def flow_steps(q: float) -> list[float]:
    return [theory.escape_time(q, p0, NUM_ANSWERS) / LR_PER_PROMPT for p0 in SLOPE_P0S]


def test_escape_slope_follows_the_flow():
    steps = measured_escape_steps()
    for q in SLOPE_QS:
        slope, flow_slope = (
            theory.fit_loglog_slope(SLOPE_P0S, steps[q]),
            theory.fit_loglog_slope(SLOPE_P0S, flow_steps(q)),
        )
        assert abs(slope - flow_slope) < 0.1, (q, slope, flow_slope)
        assert abs(flow_slope - (1 - q)) < 0.15  # the finite-p0 slope is near 1 - q already
        np.testing.assert_allclose(steps[q], flow_steps(q), rtol=0.15)  # and the times themselves match


def test_a_broken_amplification_fails_the_slope_check(monkeypatch):
    monkeypatch.setattr(losses, "amplification", lambda p_hat, q: (p_hat > 0).to(p_hat.dtype))  # P_hat^-q -> 1
    steps = measured_escape_steps()
    slope = theory.fit_loglog_slope(SLOPE_P0S, steps[0.75])
    assert abs(slope - theory.fit_loglog_slope(SLOPE_P0S, flow_steps(0.75))) > 0.1  # the check above would fail
    assert abs(slope - theory.fit_loglog_slope(SLOPE_P0S, flow_steps(0.0))) < 0.1  # q = 0.75 now acts as q = 0


def test_strata_mix_hard_and_easy_prompts_around_p0():
    start = strata_start_success(0.01, [3.0, 1.0, 1 / 3], 30)
    assert start.mean().item() == pytest.approx(0.01, rel=1e-5)
    assert start.max().item() / start.min().item() == pytest.approx(9.0, rel=1e-5)


def test_bootstrap_median_ratio():
    ratio, low, high = bootstrap_median_ratio([100, 110, 120, 130, 140], [10, 11, 12, 13, 14], 500, seed=1)
    assert ratio == pytest.approx(10.0) and low < ratio < high and low > 7
    assert bootstrap_median_ratio([1, 2, 3], [1, 2, 3], 200, seed=3) == bootstrap_median_ratio(
        [1, 2, 3], [1, 2, 3], 200, seed=3
    )


FAST = ["cap_min=60", "cap_max=60", "grid_points=3", "widen_limit=0", "hidden=16", "bootstrap=200"]


def test_cell_json_is_keyed_by_estimator_as_written():
    result = run_tsallis(
        "simulate",
        "cell",
        "--optimizer",
        "sgd",
        "--p0",
        "0.03",
        "--group-size",
        "4",
        "--prompts",
        "8",
        "--seeds",
        "2",
        "--estimators",
        "grpo",
        "garl:0.75",
        "--json",
        *FAST,
    )
    record = json.loads(result.stdout)
    assert list(record) == ["grpo", "garl:0.75"]
    for entry in record.values():
        assert set(entry) == {"lr", "steps_to_escape"} and entry["lr"] > 0
        assert len(entry["steps_to_escape"]) == 2
        assert all(s is None or (isinstance(s, int) and 0 < s <= 60) for s in entry["steps_to_escape"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["cell", "--estimators", "garl"], "'garl' needs a q"),
        (["cell", "--estimators", "grpo:0.5"], "grpo takes no q"),
        (["cell", "seeds=0"], "seeds: Input should be greater than or equal to 1"),
        (["cell", "--optimizer", "lion"], "--optimizer must be one of sgd, adamw, adamw_large_eps"),
        (["--params", "configs/simulate_small.yaml", "group_sizes=[1]"], "group_sizes: every group size must be >= 2"),
        (["--params", "nowhere.yaml"], "simulate params file nowhere.yaml does not exist"),
    ],
)
def test_bad_settings_are_one_line_errors(args, message):
    result = run_tsallis("simulate", *args, check=False)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="thresholds must lie in"):
        load_simulate(None, ["thresholds=[0.7]"])
    with pytest.raises(ConfigError, match="unknown_key"):
        load_simulate(None, ["unknown_key=1"])
    with pytest.raises(ValueError, match="q must be a number"):
        parse_estimator("paft:2")


def test_map_is_written_and_cached(tmp_path):
    cfg = load_simulate(
        None,
        [
            *FAST,
            "p0s=[0.03]",
            "group_sizes=[4,8]",
            "prompts=8",
            "seeds=2",
            "estimators=[garl:1]",
            "optimizers={sgd: {kind: sgd}}",
        ],
    )
    path = run_map(cfg, tmp_path)
    results = json.loads(path.read_text())
    assert len(results["cells"]) == 2 and (tmp_path / "ratio_map_0.5.png").stat().st_size > 0
    ratio = results["cells"][0]["ratios"]["garl:1"]["0.5"]
    assert ratio["low"] <= ratio["median_ratio"] <= ratio["high"]
    again = json.loads(run_map(cfg, tmp_path).read_text())
    assert again["seconds_this_invocation"] == 0 and again["cells"] == results["cells"]  # every cell from cells/


def _cell(optimizer, p0, m, low, median, high):
    entry = {"median_ratio": median, "low": low, "high": high, "grpo_never": 0, "estimator_never": 0}
    return {"optimizer": optimizer, "p0": p0, "group_size": m, "ratios": {"garl:0.75": {"0.5": entry}}}


MAP = {
    "settings": {"target": 0.5},
    "cells": [
        _cell("adamw", 0.01, 8, 1.2, 1.6, 2.2),
        _cell("adamw", 0.01, 128, 0.8, 1.0, 1.2),
        _cell("sgd", 0.01, 8, 1.5, 3.0, 5.0),
        _cell("sgd", 0.01, 128, 2.0, 4.0, 6.0),
    ],
}


def test_map_advice_replaces_the_m_rule_where_the_map_contradicts_it():
    adamw = map_advice(MAP, 0.009, 8, "adamw")  # rule: M = 64 -> nearest map M 128, where no gain was measured
    assert (adamw.p0, adamw.group_size, adamw.best_estimator, adamw.best_group_size) == (0.01, 8, "garl:0.75", 8)
    assert adamw.rule_contradicted and "contradicts raising M" in adamw.text
    diagnosis = apply_map_advice(recommend(0.009, 0.9, 8, "exact"), adamw)
    assert diagnosis.suggested_group_size == 8 and (diagnosis.estimator, diagnosis.q) == ("garl", 0.75)
    assert "map" in diagnosis.reason
    sgd = map_advice(MAP, 0.009, 8, "sgd")  # the map agrees with raising M under SGD
    assert not sgd.rule_contradicted and sgd.best_group_size == 128
    revised = apply_map_advice(recommend(0.009, 0.9, 8, "exact"), sgd)
    assert revised.suggested_group_size == 64  # the rule (capped at 64) stands
    assert (revised.estimator, revised.q) == ("garl", 0.75)  # and the map's winner at M = 128 replaces q = 0
    with pytest.raises(ValueError, match="no cells for optimizer 'lion'"):
        map_advice(MAP, 0.01, 8, "lion")


def test_diagnose_reads_the_committed_map():
    from tsallis_core.studies.simulate import load_map

    results = load_map("docs/simulate/results.json")
    advice = map_advice(results, 0.003, 8, "adamw")
    assert advice.p0 == 0.003 and advice.group_size == 8 and set(advice.ratios) >= {"garl:0.75", "garl:1"}


def test_diagnose_command_reports_the_map(task_dir, tmp_path):
    map_path = tmp_path / "map.json"
    map_path.write_text(json.dumps(MAP))
    out = tmp_path / "diag.json"
    result = run_diagnose(task_dir / "test.jsonl", out, "--optimizer", "adamw", "--map", str(map_path))
    record = json.loads(out.read_text())
    assert record["p0"] == 0.0 and record["map"]["optimizer"] == "adamw" and not record["map"]["in_range"]
    assert "map: map cell adamw" in result.stdout and "not applied" in result.stdout
    assert "recommendation: estimator=garl q=0" in result.stdout  # no success: the map does not override the rule


def test_the_map_verdict_counts_every_estimator_cell_once_and_the_sentence_names_each_optimiser():
    from tsallis_core.studies.simulate import load_map, map_claim_sentence, map_verdict

    results = load_map("docs/simulate/results.json")
    verdict = map_verdict(results)
    for optimizer, counts in verdict.items():
        cells = [c for c in results["cells"] if c["optimizer"] == optimizer]
        assert sum(counts.values()) == len(cells) * len(results["estimators"])
    faster = [
        (c["optimizer"], n)
        for c in results["cells"]
        for n, r in c["ratios"].items()
        if r["0.5"]["low"] > 1 and not r["0.5"]["both_capped"]
    ]
    assert sum(c["faster"] for c in verdict.values()) == len(faster)
    sentence = map_claim_sentence(results)
    assert all(f"{optimizer}: faster than GRPO in {verdict[optimizer]['faster']}," in sentence for optimizer in verdict)
