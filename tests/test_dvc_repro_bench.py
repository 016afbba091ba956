"""benchmarks/dvc_repro.py on a tiny sweep: it runs every stage, measures, and finds the second repro up to date
(no timing checks); a bad -S names the expected form."""

import json
import os
import subprocess
import sys

from conftest import REPO

TINY = [
    "data.p0=0.9",
    "data.num_train=64",
    "data.num_test=8",
    "warmup.steps=10",
    "warmup.batch_size=16",
    "train.steps=2",
    "train.batch_size=8",
    "train.group_size=4",
    "train.max_new_tokens=16",
    "sweep.estimators=[garl]",
    "sweep.q=[1.0]",
    "sweep.seeds=[0]",
    "evaluate.n=2",
    "evaluate.max_new_tokens=16",
    "report.metric=maj@2",
]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "dvc_repro.py"), *args],
        env={**os.environ, "TQDM_DISABLE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_dvc_repro_benchmark_measures_the_whole_pipeline(tmp_path):
    out = tmp_path / "dvc_repro.json"
    result = bench(*(f"-S{o}" for o in TINY), "--out", str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    # prepare, warmup, train@garl-1.0-0, baseline@0, experiment, three evaluations, the simulator's small map, report
    assert report["stages"] == 10
    assert report["wall_s"] > 0 and report["peak_rss_gib"] > 0.1
    assert report["second_repro_up_to_date"] is True
    assert report["metrics"]["champion"] in {"garl-q1.0-s0", "grpo-s0", "experiment"}
    assert "dvc repro: 10 stages" in result.stdout


def test_bad_override_names_the_expected_form():
    result = bench("-S", "train.nonexistent=3")
    assert result.returncode != 0
    assert "expected section.key=value" in result.stderr and "train.nonexistent=3" in result.stderr
