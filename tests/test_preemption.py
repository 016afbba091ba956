"""SIGTERM and SIGINT, for real: a training run stopped by a signal checkpoints, flushes MLflow, ends its run KILLED,
releases its lock and exits 143; --resume then equals an uninterrupted run (docs/reliability.md, stopping.py)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import pytest
from conftest import REPO, run_tsallis
from test_outages import MlflowServer, history_steps, same_weights, sft_args, wait_for


@pytest.fixture
def server(tmp_path):
    s = MlflowServer(tmp_path / "mlflow")
    s.start()
    yield s
    if s.proc.poll() is None:
        s.kill()


def start(args, uri: str, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tsallis_core.cli", *args],
        env={**os.environ, "TQDM_DISABLE": "1", "MLFLOW_TRACKING_URI": uri, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def history(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_equals_an_uninterrupted_run(
    server, task_dir, tmp_path, signum
):
    steps = 30
    straight = tmp_path / "straight"
    run_tsallis(*sft_args(task_dir, straight, steps), env={"MLFLOW_TRACKING_URI": server.uri})

    out = tmp_path / "run"
    proc = start(sft_args(task_dir, out, steps), server.uri)
    wait_for(lambda: history_steps(out) >= 4, proc, "step 4")
    sent = time.monotonic()
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert took < 25 and "Traceback" not in stderr, stderr[-3000:]
    stopped_at = history_steps(out)
    assert stopped_at < steps
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{stopped_at:06d}"]  # the step it finished
    assert f"stopped after step {stopped_at} of {steps}" in stderr
    assert not (out / ".lock").exists() and not (out / "mlflow_spool.jsonl").exists()
    run_id = json.loads((out / "mlflow.json").read_text())["run_id"]
    client = mlflow.MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "KILLED"
    assert server.metric_steps(run_id, "train/loss") == list(range(1, stopped_at + 1))

    run_tsallis(*sft_args(task_dir, out, steps), "--resume", env={"MLFLOW_TRACKING_URI": server.uri})
    same, detail = same_weights(straight / "model" / "model.safetensors", out / "model" / "model.safetensors")
    assert same, detail
    assert history(out) == list(range(1, steps + 1))
    assert server.metric_steps(run_id, "train/loss") == list(range(1, steps + 1))  # no duplicates
    assert client.get_run(run_id).info.status == "FINISHED"


def test_resume_after_a_sigkill_sends_no_duplicate_points_for_the_redone_steps(server, task_dir, tmp_path):
    """What a SIGKILL after step 6 leaves when the last checkpoint is step 4 (no handler runs): MLflow and
    history.jsonl hold steps 1..6, the checkpoints end at step 4. --resume redoes steps 5 and 6, and MLflow holds
    each step once."""
    out = tmp_path / "run"
    run_tsallis(*sft_args(task_dir, out, 6, "checkpoint_every=4"), env={"MLFLOW_TRACKING_URI": server.uri})
    shutil.rmtree(out / "checkpoints" / "step-000006")  # the kill came before step 6's checkpoint
    shutil.rmtree(out / "model")
    run_id = json.loads((out / "mlflow.json").read_text())["run_id"]
    assert server.metric_steps(run_id, "train/loss") == list(range(1, 7))
    run_tsallis(*sft_args(task_dir, out, 8, "checkpoint_every=4"), "--resume", env={"MLFLOW_TRACKING_URI": server.uri})
    assert history(out) == list(range(1, 9))
    assert server.metric_steps(run_id, "train/loss") == list(range(1, 9))  # 5 and 6 once each


def test_a_stop_while_mlflow_is_away_spools_within_the_grace_period_and_a_second_signal_exits_at_once(
    server, task_dir, tmp_path
):
    out = tmp_path / "run"
    proc = start(sft_args(task_dir, out, 10000, "stop_grace_s=6"), server.uri)
    wait_for(lambda: history_steps(out) >= 3, proc, "step 3")
    server.kill()
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 143 and took < 6 + 2, (took, stderr[-3000:])  # within the grace period
    assert "Traceback" not in stderr and not (out / ".lock").exists(), stderr[-3000:]
    spool = [json.loads(line) for line in (out / "mlflow_spool.jsonl").read_text().splitlines()]
    assert spool[-1] == {"end": "KILLED"}, spool[-3:]

    second = tmp_path / "second"
    server.start()
    proc = start(sft_args(task_dir, second, 10000, "stop_grace_s=60"), server.uri)
    wait_for(lambda: history_steps(second) >= 3, proc, "step 3")
    server.kill()
    proc.send_signal(signal.SIGTERM)  # the stop now waits for the server, up to 60 s
    time.sleep(3)
    assert proc.poll() is None
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143 and time.monotonic() - sent < 3, stderr[-3000:]
    assert "second SIGTERM: exiting at once" in stderr


def test_a_kubeflow_training_step_stopped_by_sigterm_is_retried_from_its_pvc_checkpoint(server, task_dir, tmp_path):
    """The sft_warmup component's function gets SIGTERM (Kubernetes preempts the pod): it checkpoints on the 'cache
    PVC' and exits 143; called again (kfp's retry), it resumes there to the model of an uninterrupted call."""
    env = {
        **os.environ,
        "TQDM_DISABLE": "1",
        "MLFLOW_TRACKING_URI": server.uri,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    call = (
        "import sys; from types import SimpleNamespace as NS; from components.stages import sft_warmup\n"
        "model = NS(path=sys.argv[1], metadata={}); metrics = NS(log_metric=lambda k, v: None)\n"
        "sft_warmup(NS(path=sys.argv[2]), model, metrics, base_model='embedded:tiny', steps=20, lr=3e-3,"
        " batch_size=4, experiment='kfp-retry', gpus=0, deepspeed_config='', sweep='s1', checkpoint_root=sys.argv[3],"
        " checkpoint_every=0, pipeline_run=sys.argv[4])"
    )

    def component(out, run):
        return subprocess.Popen(
            [sys.executable, "-c", call, str(out), str(task_dir), str(tmp_path / "pvc"), run],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    straight = component(tmp_path / "straight", "job-a")
    assert straight.wait(timeout=900) == 0, straight.stderr.read()[-3000:]
    ckpt = tmp_path / "pvc" / "s1" / "job-b" / "warmup"
    first = component(tmp_path / "try-1", "job-b")
    wait_for(lambda: history_steps(ckpt) >= 3, first, "step 3")
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 143, stderr[-3000:]
    stopped_at = history_steps(ckpt)
    assert (ckpt / "checkpoints" / f"step-{stopped_at:06d}").is_dir()
    retried = component(tmp_path / "try-2", "job-b")
    stdout, stderr = retried.communicate(timeout=900)
    assert retried.returncode == 0, stderr[-3000:]
    assert f"step-{stopped_at:06d}" in stdout
    same, detail = same_weights(
        tmp_path / "straight" / "model" / "model.safetensors", tmp_path / "try-2" / "model" / "model.safetensors"
    )
    assert same, detail
    assert history(tmp_path / "try-2") == list(range(1, 21))
