"""The DVC pipeline for real: ``dvc repro`` of dvc.yaml in a temporary git repository with a small sweep,
then the MLflow registry champion, ``dvc exp run -S``, ``dvc push``/``dvc pull`` to the local remote, and
clear stage failures for a corrupt or missing input. Tests run in file order and share one repository."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.dvc_repro import make_repo

SMALL = {  # a sweep of 2 estimators x 2 q + GRPO + the single experiment, a few steps each
    "data": {"p0": 0.9, "num_train": 64, "num_test": 8},
    "warmup": {"steps": 30, "batch_size": 32},
    "train": {"steps": 3, "batch_size": 16, "group_size": 4, "max_new_tokens": 24, "lr": 1.0e-3},
    "sweep": {"q": [0.0, 1.0], "seeds": [0]},
    "evaluate": {"n": 4, "max_new_tokens": 24},
    "report": {"metric": "maj@4"},
}
RUNS = ["garl-q0.0-s0", "garl-q1.0-s0", "paft-q0.0-s0", "paft-q1.0-s0", "grpo-s0", "experiment"]


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # MLflow's default: sqlite:///mlflow.db
    env |= {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        "TQDM_DISABLE": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )  # a loaded machine
    if check and result.returncode:
        raise AssertionError(
            f"dvc {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
        )
    return result


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=repo, check=True, capture_output=True
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git repository with the project's pipeline files and small parameters, after one ``dvc repro``."""
    root = tmp_path_factory.mktemp("dvc") / "project"
    root.mkdir()
    make_repo(
        root,
        [f"{section}.{key}={json.dumps(value)}" for section, values in SMALL.items() for key, value in values.items()],
    )
    result = dvc(root, "repro")
    (root / "repro.log").write_text(result.stdout)
    return root


def test_repro_runs_every_stage_and_then_nothing(repo):
    log = (repo / "repro.log").read_text()
    for stage in (
        "prepare",
        "warmup",
        "train@garl-0.0-0",
        "train@paft-1.0-0",
        "baseline@0",
        "experiment",
        "evaluate@garl-0.0-0",
        "evaluate_baseline@0",
        "evaluate_experiment",
        "simulate",
        "report",
    ):
        assert f"Running stage '{stage}'" in log, stage
    for run in RUNS:
        run_dir = repo / ("outputs/experiment" if run == "experiment" else f"outputs/sweep/{run}")
        assert (run_dir / "model" / "model.safetensors").is_file(), run
        assert json.loads((repo / f"outputs/eval/{run}.json").read_text())["metrics"]["samples_per_prompt"] == 4
    assert "Data and pipelines are up to date." in dvc(repo, "repro").stdout
    assert "up to date" in dvc(repo, "status").stdout


def test_report_metrics_and_plots(repo):
    report = (repo / "outputs/report/report.md").read_text()
    for run in RUNS:
        assert f"| {run} |" in report, run
    metrics = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    shown = next(iter(metrics.values()))["data"]["outputs/report/metrics.json"]["data"]
    assert shown["champion"] in RUNS and set(shown["runs"]) == set(RUNS) and 0 <= shown["maj@4"] <= 1
    assert shown["registered_version"] >= 1
    for png in ("success_curves.png", "steps_to_escape.png", "final_by_q.png", "simulate_map.png"):
        assert (repo / "outputs/report" / png).stat().st_size > 10_000, png
    # the small simulator map and its verdict on the claim, from the simulate stage's results
    simulated = json.loads((repo / "outputs/simulate/results.json").read_text())
    assert len(simulated["cells"]) == 8 and "## When q matters: the simulator map" in report
    assert all(f"{optimizer}: faster than GRPO in" in report for optimizer in simulated["optimizers"])
    dvc(repo, "plots", "show", "-o", "plots")
    html = (repo / "plots/index.html").read_text()
    assert "success_rate" in html and "champion_metric" in html and "GARL q=1" in html


def test_mlflow_parent_run_nests_every_run_and_the_champion_loads(repo):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("tsallis")
    parents = client.search_runs([experiment.experiment_id], "tags.`tsallis.role` = 'sweep'")
    assert len(parents) == 1 and parents[0].data.tags["tsallis.sweep"] == "synthetic-cold-start"
    parent = parents[0]
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == len(RUNS)
    revision = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()
    for child in children:
        assert child.data.tags["dvc.stage"].split("@")[0] in ("train", "baseline", "experiment")
        assert child.data.tags["git.revision"].startswith(revision)
        assert "eval/maj_at_4" in child.data.metrics and "eval/maj_at_4_vs_champion" in child.data.metrics
    assert "report/report.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    champion = client.get_model_version_by_alias("tsallis-synthetic", "champion")
    assert champion.tags["metric"] == "maj@4" and parent.data.tags["champion"] == champion.tags["run"]
    components = mlflow.transformers.load_model("models:/tsallis-synthetic@champion", return_type="components")
    assert components["model"].num_parameters() > 0


def test_push_then_a_fresh_clone_pulls_everything_up_to_date(repo):
    files = [
        "data/task/train.jsonl",
        "outputs/sweep/garl-q1.0-s0/model/model.safetensors",
        "outputs/eval/grpo-s0.json",
        "outputs/report/metrics.json",
        "outputs/report/report.md",
    ]
    before = [digest(repo / f) for f in files]
    assert "pushed" in dvc(repo, "push").stdout
    assert (repo.parent / "tsallis-dvc-remote" / "files").is_dir()  # .dvc/config's local remote, beside the clone
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "results")
    clone = repo.parent / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True, capture_output=True)
    dvc(clone, "pull")
    assert [digest(clone / f) for f in files] == before  # evaluations, metrics and the report are cached outputs too
    status = dvc(clone, "status").stdout
    assert "up to date" in status and "deleted" not in status, status


def test_exp_run_with_one_parameter_reruns_only_what_depends_on_it(repo):
    result = dvc(repo, "exp", "run", "-S", "train.q=0.6")
    assert "Running stage 'experiment'" in result.stdout and "Running stage 'report'" in result.stdout
    assert "Running stage 'train@" not in result.stdout and "Running stage 'warmup'" not in result.stdout
    assert yaml.safe_load((repo / "outputs/experiment/config.yaml").read_text())["rl"]["q"] == 0.6
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    experiments = [e for rev in shown for e in (rev.get("experiments") or [])]
    data = [run["revs"][0]["data"] for run in experiments]
    assert [d["params"]["params.yaml"]["data"]["train"]["q"] for d in data] == [0.6]
    metrics = data[0]["metrics"]["outputs/report/metrics.json"]["data"]  # cached: exp show reads it (not '!')
    assert isinstance(metrics["maj@4"], float) and 0 <= metrics["maj@4"] <= 1 and "experiment" in metrics["runs"]


def test_corrupt_or_missing_input_fails_the_stage_naming_the_file(repo):
    train = repo / "data/task/train.jsonl"
    lines = train.read_text().splitlines()
    train.write_text("\n".join(lines[:2] + ['{"prompt": "1+2", broken'] + lines[3:]) + "\n")
    result = dvc(repo, "repro", "--single-item", "--force", "train@garl-0.0-0", check=False)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "train.jsonl" in out and "row 2" in out and "failed to reproduce 'train@garl-0.0-0'" in out
    (repo / "configs/rl.yaml").unlink()
    result = dvc(repo, "repro", check=False)
    assert result.returncode != 0 and "configs/rl.yaml" in result.stdout + result.stderr
