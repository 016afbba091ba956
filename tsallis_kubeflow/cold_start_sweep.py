"""The cold-start q-sweep as a Kubeflow pipeline (the same stages as dvc.yaml, on the same library entry points):

    prepare -> SFT warm-up (warmup_steps=0 skips it) -> ParallelFor over estimators x q x seeds (+ GRPO baseline):
    train -> evaluate -> Collected -> register the champion in MLflow -> report

The q grid, estimators, parallelism and where training runs are fixed when the pipeline is built
(``tsallis_kubeflow.settings.PipelineSettings``, checked first); the knobs of params.yaml are run-time parameters.
Commands: ``tsallis pipeline compile | submit | run-local`` (see README, section Kubeflow).
"""

import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kfp import compiler, dsl, kubernetes

from tsallis_kubeflow.settings import (  # noqa: F401 - check_params and local_settings: importable here too
    LOCAL_IMAGE,
    ClusterSettings,
    PipelineSettings,
    check_params,
    local_settings,
)
from tsallis_kubeflow.trainjob import SECRET_ENV

from .components import build

PIPELINE_NAME = "tsallis-cold-start-sweep"


def _cluster_access(task, cluster: ClusterSettings):
    """The model and dataset cache PVC (HF_HOME on it) and the MLflow credentials from the Secret."""
    kubernetes.mount_pvc(task, pvc_name=cluster.cache_pvc, mount_path=cluster.cache_path)
    task.set_env_variable("HF_HOME", f"{cluster.cache_path}/huggingface")
    kubernetes.use_secret_as_env(task, cluster.mlflow_secret, {SECRET_ENV[0]: SECRET_ENV[0]})
    kubernetes.use_secret_as_env(task, cluster.mlflow_secret, {k: k for k in SECRET_ENV[1:]}, optional=True)
    return task


def _on_gpu_node(task, cluster: ClusterSettings, gpus: int):
    """CPU, memory and GPUs of a training pod, on a GPU node, with /dev/shm in memory."""
    task.set_cpu_request(cluster.cpu).set_cpu_limit(cluster.cpu)
    task.set_memory_request(cluster.memory).set_memory_limit(cluster.memory)
    if gpus:
        task.set_accelerator_type(cluster.accelerator_type).set_accelerator_limit(gpus)
        for key, value in cluster.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for toleration in cluster.tolerations:
            kubernetes.add_toleration(task, **toleration)
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=cluster.shm_size
    )
    return _cluster_access(task, cluster)


def build_pipeline(settings: PipelineSettings):
    """The pipeline function for ``settings`` (platform local: no GPU or Kubernetes settings, for kfp.local)."""
    cluster, kube = settings.cluster, settings.platform == "kubernetes"
    stages = build(cluster.image if kube else cluster.image or LOCAL_IMAGE)  # kfp.local's subprocesses use no image
    gpus = cluster.gpus_per_node if kube else 0
    multinode = kube and cluster.num_nodes > 1
    runs = [{k: str(v) for k, v in run.items()} for run in settings.sweep.items()]  # loop items reach steps as strings
    # training checkpoints on the cache PVC, under the sweep, this pipeline run and the run name (kfp.local: none)
    resumable = {
        "checkpoint_root": f"{cluster.cache_path}/checkpoints" if kube else "",
        "checkpoint_every": cluster.checkpoint_every if kube else 0,
        "pipeline_run": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    }

    def retried(task):
        """A preempted or failed training step is retried; it resumes from its newest checkpoint."""
        if kube and cluster.retries:
            task.set_retry(cluster.retries, backoff_duration=cluster.retry_backoff)
        return task

    def on_gpu(task, count: int):
        return _on_gpu_node(task, cluster, count) if kube else task

    def with_access(task):
        return _cluster_access(task, cluster) if kube else task

    parameters = settings.runtime_parameters()  # the run-time parameters: the settings model's sections

    def cold_start_sweep(*values) -> dsl.Markdown:
        p = SimpleNamespace(**dict(zip(parameters, values)))  # kfp passes one channel per parameter, in order
        data = stages.prepare_data(
            **{name.removeprefix("data_"): getattr(p, name) for name in parameters if name.startswith("data_")},
            model=p.warmup_model,
        ).set_display_name("prepare")
        parent = with_access(stages.sweep_parent(experiment=p.report_experiment, sweep=p.report_sweep))
        parent.set_caching_options(False).set_display_name("mlflow sweep run")
        warm = retried(
            on_gpu(
                stages.sft_warmup(
                    data=data.outputs["data"],
                    base_model=p.warmup_model,
                    steps=p.warmup_steps,
                    lr=p.warmup_lr,
                    batch_size=p.warmup_batch_size,
                    experiment=p.report_experiment,
                    gpus=gpus,
                    deepspeed_config=cluster.deepspeed_config,
                    sweep=p.report_sweep,
                    **resumable,
                ),
                gpus,
            )
        ).set_display_name("sft warm-up")
        with dsl.ParallelFor(runs, parallelism=settings.parallelism) as run:
            common = {
                "data": data.outputs["data"],
                "base_model": warm.outputs["model"],
                "run_name": run.run_name,
                "estimator": run.estimator,
                "q": run.q,
                "seed": run.seed,
                "steps": p.train_steps,
                "lr": p.train_lr,
                "group_size": p.train_group_size,
                "batch_size": p.train_batch_size,
                "max_new_tokens": p.train_max_new_tokens,
                "temperature": p.train_temperature,
                "sweep": p.report_sweep,
                "experiment": p.report_experiment,
                "verifier": p.data_verifier,
            }
            if multinode:  # the launcher needs no GPU: the TrainJob's nodes have them
                train = stages.train_rl_trainjob(
                    **common, cluster=cluster.model_dump(), pipeline_run=dsl.PIPELINE_JOB_ID_PLACEHOLDER
                )
                kubernetes.mount_pvc(train, pvc_name=cluster.cache_pvc, mount_path=cluster.cache_path)
            else:
                train = on_gpu(
                    stages.train_rl(**common, gpus=gpus, deepspeed_config=cluster.deepspeed_config, **resumable), gpus
                )
            retried(train).after(parent).set_display_name("train")
            evaluation = on_gpu(
                stages.evaluate_model(
                    data=data.outputs["data"],
                    model=train.outputs["model"],
                    run_name=run.run_name,
                    n=p.evaluate_n,
                    max_new_tokens=p.evaluate_max_new_tokens,
                    temperature=p.evaluate_temperature,
                    seed=p.evaluate_seed,
                    verifier=p.data_verifier,
                ),
                min(gpus, 1),
            ).set_display_name("evaluate")
        champion = with_access(
            stages.register_champion(
                models=dsl.Collected(train.outputs["model"]),
                evaluations=dsl.Collected(evaluation.outputs["evaluation"]),
                metric=p.report_metric,
                registered_model=p.report_registered_model,
            )
        )
        champion.set_caching_options(False).set_display_name("register champion")
        report = with_access(
            stages.sweep_report(
                models=dsl.Collected(train.outputs["model"]),
                evaluations=dsl.Collected(evaluation.outputs["evaluation"]),
                registered=champion.output,
                metric=p.report_metric,
                escape_threshold=p.report_escape_threshold,
                sweep_name=p.report_sweep,
                experiment=p.report_experiment,
            )
        )
        report.set_caching_options(False).set_display_name("report")
        return report.outputs["report"]

    cold_start_sweep.__signature__ = inspect.Signature(
        [
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=kind)
            for name, (kind, default) in parameters.items()
        ],
        return_annotation=dsl.Markdown,
    )
    return dsl.pipeline(
        name=PIPELINE_NAME, description="Cold-start q-sweep: GARL/PAFT over q (+ GRPO), champion to MLflow"
    )(cold_start_sweep)


def compile_pipeline(settings: PipelineSettings, out: str | Path) -> Path:
    """Write the pipeline YAML (IR) that Kubeflow Pipelines runs."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(settings), str(out))
    return out


def submit(
    settings: PipelineSettings,
    host: str,
    params: dict[str, Any],
    experiment: str = "tsallis",
    run_name: str | None = None,
    namespace: str | None = None,
    package: str | Path | None = None,
) -> str:
    """Compile and submit one run with kfp.Client; returns the run id. Credentials for the cluster come from
    the environment (kfp.Client's usual ways: in-cluster token, KF_PIPELINES_SA_TOKEN_PATH, kube-config)."""
    import tempfile

    import kfp

    params = check_params(settings, params)
    check_host(host)
    with tempfile.TemporaryDirectory() as tmp:
        path = compile_pipeline(settings, package or Path(tmp) / "pipeline.yaml")
        client = kfp.Client(host=host, namespace=namespace)
        run = client.create_run_from_pipeline_package(
            str(path), arguments=params, run_name=run_name, experiment_name=experiment, namespace=namespace
        )
    return run.run_id


def check_host(host: str, timeout: float = 5.0) -> None:
    """A one-line ValueError at once when the Kubeflow Pipelines API does not answer (kfp.Client would retry and
    end in a long traceback); an HTTP error (401, 403) is an answer: the credentials are kfp.Client's business."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{host.rstrip('/')}/apis/v2beta1/healthz", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise ValueError(
            f"cannot reach Kubeflow Pipelines at --host {host} ({getattr(error, 'reason', error)}); give "
            f"the API's URL, e.g. after kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80, "
            f"--host http://localhost:8080"
        ) from None


def run_local(settings: PipelineSettings, workdir: str | Path, params: dict[str, Any] | None = None) -> Path:
    """The whole pipeline on this machine: kfp.local with the SubprocessRunner in the current environment.
    Every step runs as a subprocess; outputs go under ``workdir``. Returns the report's path."""
    from kfp import local

    settings = settings.model_copy(update={"platform": "local"})
    workdir = Path(workdir).resolve()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(workdir / "outputs"),
        workspace_root=str(workdir / "workspace"),
    )
    result = build_pipeline(settings)(**check_params(settings, params or {}))
    return Path(result.output.path)
