"""Preemption and tracking outages, for real: a Kubeflow training step SIGKILLed mid-run and called again, and a
real ``mlflow server`` killed (and restarted) during a run (docs/reliability.md)."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import DIE_AFTER_CHECKPOINT, REPO, free_port, run_tsallis
from safetensors.torch import load_file


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 that can be killed and started again on the same port and store."""

    def __init__(self, root):
        self.root, self.port, self.proc = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self):
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2).read()
                return
            except OSError:
                assert self.proc.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its workers, at once
        self.proc.wait()

    def metric_steps(self, run_id: str, key: str) -> list[int]:
        import mlflow

        client = mlflow.MlflowClient(self.uri)
        return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture
def server(tmp_path):
    s = MlflowServer(tmp_path / "mlflow")
    s.start()
    yield s
    if s.proc.poll() is None:
        s.kill()


def history_steps(out) -> int:
    path = out / "history.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def wait_for(condition, proc, what: str, timeout: float = 600):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def same_weights(a_path, b_path) -> tuple[bool, str]:
    a, b = load_file(str(a_path)), load_file(str(b_path))
    if a.keys() != b.keys():
        return False, f"different tensors: {sorted(set(a) ^ set(b))}"
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    return all((a[k] == b[k]).all() for k in a), f"largest difference {worst:.3g}"


def sft_args(task_dir, out, steps: int, *extra):
    return [
        "train",
        "stage=sft",
        f"output_dir={out}",
        f"data.train_path={task_dir / 'pretrain.jsonl'}",
        "sft.batch_size=4",
        f"steps={steps}",
        "checkpoint_every=0",
        "tracking.log_model=false",
        "tracking.samples_every=0",
        "engine.threads=1",
        "seed=2",
        *extra,
    ]


def test_a_server_killed_and_restarted_mid_run_loses_nothing_and_stalls_nothing(server, task_dir, tmp_path):
    out, steps = tmp_path / "run", 40
    env = {**os.environ, "TQDM_DISABLE": "1", "MLFLOW_TRACKING_URI": server.uri}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tsallis_core.cli", *sft_args(task_dir, out, steps)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: history_steps(out) >= 5, proc, "step 5")
    server.kill()
    killed_at = history_steps(out)
    wait_for(lambda: history_steps(out) >= killed_at + 10, proc, "10 steps with the server away")  # no stall
    server.start()
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    warnings = [line for line in stderr.splitlines() if line.startswith("warning: MLflow server")]
    assert len(warnings) == 1 and "training goes on" in warnings[0], stderr[-3000:]
    run_id = json.loads((out / "mlflow.json").read_text())["run_id"]
    assert server.metric_steps(run_id, "train/loss") == list(range(1, steps + 1))  # every step, once
    import mlflow

    assert mlflow.MlflowClient(server.uri).get_run(run_id).info.status == "FINISHED"


def test_a_server_that_stays_away_spools_the_metrics_and_resume_sends_them(server, task_dir, tmp_path):
    out, steps = tmp_path / "run", 12
    env = {**os.environ, "TQDM_DISABLE": "1", "MLFLOW_TRACKING_URI": server.uri, "TSALLIS_TRACKING_FLUSH_S": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tsallis_core.cli", *sft_args(task_dir, out, steps)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: history_steps(out) >= 3, proc, "step 3")
    server.kill()
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0 and (out / "model").is_dir(), stderr[-3000:]  # the run is not lost with its server
    assert "Traceback" not in stderr and "is still away" in stderr
    records = [json.loads(line) for line in (out / "mlflow_spool.jsonl").read_text().splitlines()]
    spooled = [r["step"] for r in records if "metrics" in r]
    assert spooled and spooled == sorted(spooled) and spooled[-1] == steps and records[-1] == {"end": "FINISHED"}

    server.start()
    run_tsallis(*sft_args(task_dir, out, steps), "--resume", env={"MLFLOW_TRACKING_URI": server.uri})
    run_id = json.loads((out / "mlflow.json").read_text())["run_id"]
    assert server.metric_steps(run_id, "train/loss") == list(range(1, steps + 1))
    assert not (out / "mlflow_spool.jsonl").exists()


def test_a_kubeflow_training_step_killed_mid_run_resumes_to_the_same_model(server, task_dir, tmp_path):
    """The sft_warmup component's function, SIGKILLed right after its step-4 checkpoint on the 'cache PVC' and called
    again (what a kfp retry does): it resumes there, and its model equals an uninterrupted call's bitwise."""
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
        "sft_warmup(NS(path=sys.argv[2]), model, metrics, base_model='embedded:tiny', steps=10, lr=3e-3,"
        " batch_size=4, experiment='kfp-retry', gpus=0, deepspeed_config='', sweep='s1', checkpoint_root=sys.argv[3],"
        " checkpoint_every=2, pipeline_run=sys.argv[4])"
    )

    def component(out, run, die_after_step: int = 0):
        code = (DIE_AFTER_CHECKPOINT if die_after_step else "") + call
        return subprocess.Popen(
            [sys.executable, "-c", code, str(out), str(task_dir), str(tmp_path / "pvc"), run],
            env={**env, "TSALLIS_TEST_DIE_AFTER_STEP": str(die_after_step)},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    straight = component(tmp_path / "straight", "job-a")
    assert straight.wait(timeout=900) == 0, straight.stderr.read()[-3000:]
    killed = component(tmp_path / "killed-1", "job-b", die_after_step=4)
    _, stderr = killed.communicate(timeout=900)
    assert killed.returncode == -signal.SIGKILL, stderr[-3000:]
    ckpt = tmp_path / "pvc" / "s1" / "job-b" / "warmup"
    assert [p.name for p in sorted((ckpt / "checkpoints").iterdir())] == ["step-000002", "step-000004"]
    retried = component(tmp_path / "killed-2", "job-b")  # the retry: a new pod, a new output path, the same PVC path
    stdout, stderr = retried.communicate(timeout=900)
    assert retried.returncode == 0, stderr[-3000:]
    assert "resuming from" in stdout and "step-000004" in stdout, stdout[-2000:]
    same, detail = same_weights(
        tmp_path / "straight" / "model" / "model.safetensors", tmp_path / "killed-2" / "model" / "model.safetensors"
    )
    assert same, detail
    assert not (tmp_path / "killed-2" / "checkpoints").exists() and not (ckpt / "checkpoints").exists()
    history = [json.loads(line)["step"] for line in (tmp_path / "killed-2" / "history.jsonl").read_text().splitlines()]
    assert history == list(range(1, 11))


class PreemptibleTrainer:
    """Stands in for kubeflow.trainer.TrainerClient, but runs the TrainJob's own `tsallis train ... --resume` for real
    on this machine (one process instead of torchrun, plain PyTorch instead of DeepSpeed). With ``preempt``, the
    job's node is SIGKILLed after its step-4 checkpoint, as a preempted node is, and the job ends Failed."""

    def __init__(self, preempt: bool):
        self.preempt, self.proc, self.output_dir = preempt, None, None

    def train(self, runtime, trainer, options):
        command = next(o.command for o in options if hasattr(o, "command"))
        argv = [a for a in command[command.index("tsallis_core.cli") :] if not a.startswith("engine.")]
        self.output_dir = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")))
        env = {
            **os.environ,
            "TQDM_DISABLE": "1",
            "OMP_NUM_THREADS": "1",
            "TSALLIS_TEST_DIE_AFTER_STEP": "4" if self.preempt else "0",
        }
        main = "import sys; from tsallis_core.cli import main; sys.exit(main(sys.argv[1:]))"
        code = (DIE_AFTER_CHECKPOINT if self.preempt else "") + main
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, *argv[1:], "tracking.enabled=false"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        return "tsallis-job"

    def wait_for_job_status(self, name, status, timeout, polling_interval):
        code = self.proc.wait(timeout=900)  # with ``preempt`` the node dies (SIGKILL) after its step-4 checkpoint
        return SimpleNamespace(name=name, status="Complete" if code == 0 else "Failed")

    def get_job_events(self, name):
        return [SimpleNamespace(involved_object_name="node-0", reason="Preempted", message="node was preempted")]

    def get_job_logs(self, name, step):
        return iter([self.proc.stderr.read()[-500:]])

    def delete_job(self, name):
        pass


def test_a_preempted_trainjob_is_retried_from_its_staged_checkpoints_to_the_same_model(task_dir, tmp_path):
    from tsallis_kubeflow.settings import load_settings
    from tsallis_kubeflow.trainjob import TrainJobFailed, run_trainjob

    data, base = tmp_path / "data", tmp_path / "base"
    data.mkdir()
    (data / "train.jsonl").write_text((task_dir / "pretrain.jsonl").read_text())
    run_tsallis(
        "train",
        "stage=sft",
        "steps=0",
        f"output_dir={base}",
        f"data.train_path={data / 'train.jsonl'}",
        "tracking.enabled=false",
    )  # the embedded model, saved as a base model directory
    cluster = load_settings(
        None, [f"cluster.cache_path={tmp_path / 'cache'}", "cluster.gpus_per_node=0", "cluster.image=tsallis:local"]
    ).cluster
    overrides = ["steps=10", "checkpoint_every=2", "sft.batch_size=4", "engine.threads=1", "seed=2"]

    def launch(out, job, client):
        work = tmp_path / "cache" / "trainjobs" / "s1" / job / "run"
        return run_trainjob(
            "configs/base.yaml",
            overrides,
            str(data),
            str(base / "model"),
            str(out),
            "run",
            cluster,
            client=client,
            work_dir=str(work),
        )

    launch(tmp_path / "straight", "job-a", PreemptibleTrainer(preempt=False))
    with pytest.raises(TrainJobFailed, match="Preempted"):
        launch(tmp_path / "first-try", "job-b", PreemptibleTrainer(preempt=True))
    staged = tmp_path / "cache" / "trainjobs" / "s1" / "job-b" / "run" / "run" / "run"
    assert (staged / "checkpoints" / "step-000004").is_dir()  # kept on the PVC for the retry
    launch(tmp_path / "retry", "job-b", PreemptibleTrainer(preempt=False))  # the retried launcher step
    same, detail = same_weights(
        tmp_path / "straight" / "run" / "model" / "model.safetensors",
        tmp_path / "retry" / "run" / "model" / "model.safetensors",
    )
    assert same, detail
    assert not (tmp_path / "cache" / "trainjobs" / "s1" / "job-b" / "run").exists()  # removed once the run is back


def test_an_outage_before_the_model_is_logged_exits_0_and_track_sync_sends_the_rest(server, task_dir, tmp_path):
    """tracking.log_model=true (the default): the server dies mid-run and stays away. The run saves its model, exits
    0 without a traceback, and spools the metrics, the model and the run's end; `tsallis track sync` sends them once
    the server is back, and the run is FINISHED with a loadable model."""
    import mlflow

    out, steps = tmp_path / "run", 8
    args = [a for a in sft_args(task_dir, out, steps) if not a.startswith("tracking.log_model")]
    env = {**os.environ, "TQDM_DISABLE": "1", "MLFLOW_TRACKING_URI": server.uri, "TSALLIS_TRACKING_FLUSH_S": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tsallis_core.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: history_steps(out) >= 3, proc, "step 3")
    server.kill()
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0 and (out / "model" / "model.safetensors").is_file(), stderr[-3000:]
    assert "Traceback" not in stderr and (out / "metrics.json").is_file(), stderr[-3000:]
    assert len([line for line in stderr.splitlines() if "is still away" in line]) == 1, stderr[-3000:]
    spooled = [json.loads(line) for line in (out / "mlflow_spool.jsonl").read_text().splitlines()]
    assert spooled[-2:] == [{"model": str((out / "model").resolve())}, {"end": "FINISHED"}]
    run_id = json.loads((out / "mlflow.json").read_text())["run_id"]

    server.start()
    client = mlflow.MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # not FINISHED until everything is sent
    result = run_tsallis("track", "sync", str(out), env={"MLFLOW_TRACKING_URI": server.uri})
    assert f"sent to MLflow run {run_id}" in result.stdout
    assert server.metric_steps(run_id, "train/loss") == list(range(1, steps + 1))
    assert client.get_run(run_id).info.status == "FINISHED" and not (out / "mlflow_spool.jsonl").exists()
    model_uri = json.loads((out / "mlflow.json").read_text())["model_uri"]
    mlflow.set_tracking_uri(server.uri)
    try:
        assert model_uri and mlflow.models.get_model_info(model_uri).flavors.get("transformers")
    finally:
        mlflow.set_tracking_uri(None)


def test_credentials_in_the_tracking_uri_pass_the_preflight_check_and_are_never_printed(server, task_dir, tmp_path):
    out = tmp_path / "run"
    uri = server.uri.replace("http://", "http://alice:s3cr3t-pw@")
    result = run_tsallis(*sft_args(task_dir, out, 2), env={"MLFLOW_TRACKING_URI": uri})
    assert "s3cr3t-pw" not in result.stdout + result.stderr
    record = json.loads((out / "mlflow.json").read_text())
    assert record["tracking_uri"] == server.uri.replace("http://", "http://alice:***@")  # no password on disk
    assert server.metric_steps(record["run_id"], "train/loss") == [1, 2]
    away = uri.rsplit(":", 1)[0] + f":{free_port()}"
    result = run_tsallis(*sft_args(task_dir, tmp_path / "away", 2), env={"MLFLOW_TRACKING_URI": away}, check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
    assert result.returncode == 2 and len(lines) == 1 and "alice:***@127.0.0.1" in lines[0], result.stderr
    assert "s3cr3t-pw" not in result.stdout + result.stderr
