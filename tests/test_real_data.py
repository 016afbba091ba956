"""The real-data path: the dataset registry, custom rewards, and the whole DVC and Kubeflow pipelines on a small
HotPotQA-format fixture (tests/fixtures/hotpotqa: invented rows in the dataset's original schema), read offline:
prepare from the local files, RL from the base model (cold start), evaluation with HotPotQA's EM/F1 verifier, the
report and the MLflow registry."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import REPO, run_tsallis

from tsallis_core.config import ConfigError, load_config
from tsallis_core.data.registry import DATASETS, VERIFIERS, get_verifier, native_datasets
from tsallis_core.distributed import free_port
from tsallis_core.prepare import TaskSettings

HOTPOT = REPO / "tests" / "fixtures" / "hotpotqa"
TEMPLATE = "{context}\nQ: {question}\n"  # short: the embedded tiny model reads 256 characters
REWARDS = """
def length_reward(completion, answer):
    return min(len(completion), 10) / 10

def says_hello(completion, answer):
    return "hello"

def broken(completion, answer):
    raise KeyError("gold")

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def rewards_module(tmp_path, monkeypatch) -> str:
    """A user's module of reward functions, importable as ``my_rewards`` (here and in child processes)."""
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return str(tmp_path)


def test_the_registry_is_the_one_list_of_datasets_and_verifiers():
    assert native_datasets() == ["finqa", "hotpotqa", "musique"]
    assert {"synthetic", "local"} <= DATASETS.keys() and list(VERIFIERS) == ["exact", "finqa", "em", "f1"]
    help_text = run_tsallis("data", "prepare", "--help").stdout
    for name in native_datasets():
        assert name in help_text and DATASETS[name].hub_id in help_text
    assert "docs/datasets.md" not in help_text or (REPO / "docs/datasets.md").is_file()
    assert "package.module:function" in run_tsallis("train", "--help").stdout  # data.verifier's help


@pytest.mark.parametrize(
    ("verifier", "message"),
    [
        ("bleu", "data.verifier: verifier must be one of exact, finqa, em, f1, or package.module:function"),
        ("no_such_module:f", "cannot import no_such_module"),
        ("my_rewards:missing", "my_rewards has no function 'missing'"),
        ("my_rewards:NOT_A_FUNCTION", "(NOT_A_FUNCTION is a int)"),
        (
            "my_rewards:says_hello",
            "must return a number in [0, 1]; on (completion, answer) = (${SAMPLE}) it returned 'hello'",
        ),
        ("my_rewards:broken", "failed on the sample (completion, answer) = (${SAMPLE}): KeyError"),
    ],
)
def test_a_bad_custom_reward_is_refused_up_front_in_one_line(rewards_module, verifier, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"data.verifier={verifier}"])
    sample = "'Let me think.\\nAnswer: 42', '42'"
    assert message.replace("${SAMPLE}", sample) in str(error.value) and "\n" not in str(error.value)


def test_a_custom_reward_function_trains(rewards_module, task_dir, tmp_path):
    assert get_verifier("my_rewards:length_reward")("Answer: 1", "gold", ["alias"]) == 0.9
    out = tmp_path / "run"
    run_tsallis(
        "train",
        "stage=rl",
        f"output_dir={out}",
        f"data.train_path={task_dir / 'train.jsonl'}",
        "data.verifier=my_rewards:length_reward",
        "steps=2",
        "rl.group_size=4",
        "rl.batch_size=8",
        "rl.max_new_tokens=12",
        "checkpoint_every=0",
        "tracking.enabled=false",
        "engine.threads=1",
    )
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(0 < step["success_rate"] <= 1 for step in history)  # exact would give 0 here


def test_task_settings_name_the_field_and_the_fix():
    with pytest.raises(ValueError, match="source local needs train_file and test_file"):
        TaskSettings(source="local")
    with pytest.raises(ValueError, match="template apply to finqa, hotpotqa, musique, not to source synthetic"):
        TaskSettings(template=TEMPLATE)
    with pytest.raises(ValueError, match="dataset must be one of synthetic, local, finqa, hotpotqa, musique"):
        TaskSettings(source="squad")


@pytest.mark.parametrize("command", ["data prepare", "pipeline submit"])
def test_offline_the_hub_or_the_kubeflow_host_is_one_error_line_at_once(command, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: as offline as it gets, on every machine
    args = {
        "data prepare": ["data", "prepare", "--dataset", "hotpotqa", "--out", str(tmp_path / "rows.jsonl")],
        "pipeline submit": ["pipeline", "submit", "--host", closed, "--image", "registry.example/tsallis:t"],
    }[command]
    started = time.time()
    result = run_tsallis(*args, env={"HF_ENDPOINT": closed, "HF_HUB_OFFLINE": "0"}, check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("tsallis: error: cannot reach") and closed in lines[0]
    assert time.time() - started < 30  # no minute of retries (a loaded 2-core machine needs ~10 s to import)


HOTPOT_DATA = {
    "source": "hotpotqa",
    "train_file": str(HOTPOT / "train.jsonl"),
    "test_file": str(HOTPOT / "validation.jsonl"),
    "verifier": "em",
    "template": TEMPLATE,
    "max_context_tokens": 120,
    "num_test": 8,
}


def _check_prepared(data_dir: Path) -> None:
    train = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (data_dir / "test.jsonl").read_text().splitlines()]
    assert len(train) == 8 and len(test) == 2  # validation.jsonl's third row has no answer: reported and skipped
    assert train[0]["prompt"].endswith("\nQ: What is the capital of Ruritania?\n") and train[0]["answer"] == "Strelsau"


def test_dvc_repro_on_the_hotpotqa_fixture(tmp_path):
    from test_dvc_pipeline import dvc, make_repo

    root = tmp_path / "project"
    root.mkdir()
    small = {
        "data": HOTPOT_DATA,
        "warmup": {"steps": 0},  # cold start: RL from the base model
        "train": {"steps": 2, "batch_size": 8, "group_size": 4, "max_new_tokens": 16},
        "sweep": {"estimators": ["garl"], "q": [1.0], "seeds": [0]},
        "evaluate": {"n": 2, "max_new_tokens": 16},
        "report": {"metric": "maj@2", "registered_model": "tsallis-hotpotqa", "sweep": "hotpotqa-cold-start"},
    }
    make_repo(
        root,
        [f"{section}.{key}={json.dumps(value)}" for section, values in small.items() for key, value in values.items()],
    )
    log = dvc(root, "repro").stdout
    for stage in ("prepare", "warmup", "train@garl-1.0-0", "baseline@0", "experiment", "evaluate@garl-1.0-0", "report"):
        assert f"Running stage '{stage}'" in log, stage
    _check_prepared(root / "data/task")
    evaluation = json.loads((root / "outputs/eval/garl-q1.0-s0.json").read_text())
    assert evaluation["verifier"] == "em" and {"em", "f1", "maj@2"} <= evaluation["metrics"].keys()
    metrics = json.loads((root / "outputs/report/metrics.json").read_text())
    assert metrics["champion"] in ("garl-q1.0-s0", "grpo-s0", "experiment") and 0 <= metrics["maj@2"] <= 1

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    champion = mlflow.MlflowClient().get_model_version_by_alias("tsallis-hotpotqa", "champion")
    assert champion.tags["metric"] == "maj@2"


def test_kfp_local_pipeline_on_the_hotpotqa_fixture(mlflow_server, tmp_path, monkeypatch):
    pytest.importorskip("kfp", reason="kfp is in the test extra")
    import mlflow

    from pipelines.cold_start_sweep import local_settings, run_local

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.chdir(tmp_path)
    settings = local_settings(REPO / "params.yaml", ["sweep.q=[1.0]", "train.steps=2"])
    params = {f"data_{key}": value for key, value in HOTPOT_DATA.items()}  # the data section as run-time parameters
    report = run_local(
        settings,
        tmp_path,
        {
            **params,
            "warmup_steps": 0,
            "report_metric": "maj@4",
            "report_registered_model": "kfp-hotpotqa",
            "report_sweep": "kfp-hotpotqa",
        },
    )
    assert "garl-q1.0-s0" in report.read_text()
    _check_prepared(next(tmp_path.glob("outputs/**/prepare-data/data")))
    evaluation = json.loads(next(tmp_path.glob("outputs/**/evaluation/garl-q1.0-s0.json")).read_text())
    assert evaluation["verifier"] == "em" and {"em", "f1", "maj@4"} <= evaluation["metrics"].keys()
    mlflow.set_tracking_uri(mlflow_server)
    assert mlflow.MlflowClient().get_model_version_by_alias("kfp-hotpotqa", "champion").tags["metric"] == "maj@4"
