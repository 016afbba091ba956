"""MLflow tracking against a real ``mlflow server`` on 127.0.0.1."""

import json
import time

from conftest import free_port, rl_args, run_tsallis


def test_run_logs_config_metrics_samples_and_a_loadable_model(mlflow_server, base_model, task_dir, tmp_path):
    import mlflow

    out = tmp_path / "tracked"
    args = [
        a
        for a in rl_args(base_model, task_dir, out, "steps=2", "tracking.samples_every=1")
        if a != "tracking.enabled=false"
    ]
    run_tsallis(*args, env={"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": "test-tracking"})
    info = json.loads((out / "mlflow.json").read_text())
    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient()
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "test-tracking"
    assert run.data.params["rl.estimator"] == "garl" and run.data.params["rl.group_size"] == "4"
    for key in (
        "rollout/success_rate",
        "rollout/frac_zero_success",
        "rollout/amp_mean",
        "rollout/amp_max",
        "train/loss",
        "train/grad_norm",
        "train/lr",
        "train/q",
        "rollout/completion_tokens_per_s",
    ):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/step_000001.json", "samples/step_000002.json"} <= artifacts
    components = mlflow.transformers.load_model(info["model_uri"], return_type="components")
    assert components["model"].num_parameters() > 0 and components["tokenizer"].eos_token == "<eos>"


def test_unreachable_server_fails_at_once_in_one_line(base_model, task_dir, tmp_path):
    out = tmp_path / "never"
    args = [a for a in rl_args(base_model, task_dir, out, "steps=2") if a != "tracking.enabled=false"]
    started = time.time()
    result = run_tsallis(*args, env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}, check=False)
    assert result.returncode == 2 and time.time() - started < 60
    lines = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1 and "is unreachable" in lines[0] and "tracking.enabled=false" in lines[0]
    assert not (out / "history.jsonl").exists()


def test_grpo_runs_are_named_without_q_and_the_sweep_parent_has_no_stage(task_dir, tmp_path, monkeypatch):
    import mlflow

    from tsallis_core.tracking import sweep_run_id

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_tsallis(
        "train",
        "stage=rl",
        f"output_dir={tmp_path / 'grpo'}",
        f"data.train_path={task_dir / 'train.jsonl'}",
        "rl.estimator=grpo",
        "steps=1",
        "rl.group_size=4",
        "rl.batch_size=8",
        "rl.max_new_tokens=8",
        "checkpoint_every=0",
        "tracking.log_model=false",
        "engine.threads=1",
        env={"MLFLOW_TRACKING_URI": uri},
    )
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    run = client.get_run(json.loads((tmp_path / "grpo" / "mlflow.json").read_text())["run_id"])
    assert run.info.run_name == "grpo-seed0"
    monkeypatch.setenv("DVC_STAGE", "train@garl-0.0-0")  # the first training run of a sweep creates the parent
    parent = client.get_run(sweep_run_id(mlflow, "tsallis", "a-sweep"))
    assert parent.data.tags["tsallis.role"] == "sweep" and "dvc.stage" not in parent.data.tags
