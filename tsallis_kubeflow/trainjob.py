"""Training across nodes: a Kubeflow Trainer TrainJob that runs ``tsallis train`` (tsallis_core/launch.py's
``train_argv``) on every node.

The TrainJob is built by pure functions (``trainjob_request``, ``trainjob_manifest``) so that what the launcher
would submit can be checked without a cluster; ``submit_trainjob`` submits it with the ``kubeflow`` SDK, waits,
and raises with the job's events and logs when it fails.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from tsallis_core.launch import resolve_path, train_argv

SECRET_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


class TrainJobFailed(RuntimeError):
    """A TrainJob ended Failed: the message carries its events and the last lines of node 0's log."""


@dataclass
class TrainJobRequest:
    """What ``TrainerClient().train`` receives: runtime name, trainer (image, nodes, resources, env), options."""

    name: str
    runtime: str
    trainer: object  # kubeflow.trainer.CustomTrainerContainer
    options: list


def trainjob_request(
    name: str,
    image: str,
    command: list[str],
    num_nodes: int,
    gpus_per_node: int,
    cpu: str,
    memory: str,
    accelerator_type: str = "nvidia.com/gpu",
    runtime: str = "torch-distributed",
    cache_pvc: str = "tsallis-cache",
    cache_path: str = "/cache",
    shm_size: str = "16Gi",
    mlflow_secret: str = "mlflow-credentials",
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict] | None = None,
    env: dict[str, str] | None = None,
) -> TrainJobRequest:
    """A TrainJob running ``command`` on ``num_nodes`` nodes of ``gpus_per_node`` GPUs each (pure: no cluster).

    Every node pod gets the cache PVC at ``cache_path`` (HF_HOME under it), /dev/shm in memory, the MLflow
    credentials from the Secret ``mlflow_secret`` as environment variables, and the GPU nodes' selector and
    tolerations (a runtime patch of the trainer's ``node`` job)."""
    from kubeflow.trainer import CustomTrainerContainer
    from kubeflow.trainer import options as opt

    resources = {"cpu": cpu, "memory": memory, **({accelerator_type: str(gpus_per_node)} if gpus_per_node else {})}
    secret_env = [
        {
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": mlflow_secret, "key": key, "optional": key != SECRET_ENV[0]}},
        }
        for key in SECRET_ENV
    ]
    container = opt.ContainerPatch(
        name="node",
        env=secret_env,
        volume_mounts=[{"name": "cache", "mountPath": cache_path}, {"name": "dshm", "mountPath": "/dev/shm"}],
    )
    pod = opt.PodSpecPatch(
        volumes=[
            {"name": "cache", "persistentVolumeClaim": {"claimName": cache_pvc}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}},
        ],
        containers=[container],
        node_selector=node_selector or None,
        tolerations=tolerations or None,
        security_context={"fsGroup": 1000},
    )  # the image's user (uid 1000) can write to the cache PVC
    patch = opt.RuntimePatch(
        training_runtime_spec=opt.TrainingRuntimeSpecPatch(
            template=opt.JobSetTemplatePatch(
                spec=opt.JobSetSpecPatch(
                    replicated_jobs=[
                        opt.ReplicatedJobPatch(
                            name="node",
                            template=opt.JobTemplatePatch(
                                spec=opt.JobSpecPatch(template=opt.PodTemplatePatch(spec=pod))
                            ),
                        )
                    ]
                )
            )
        )
    )
    trainer = CustomTrainerContainer(
        image=image,
        num_nodes=num_nodes,
        resources_per_node=resources,
        env={"HF_HOME": f"{cache_path}/huggingface", "TQDM_DISABLE": "1", **(env or {})},
    )
    options = [opt.Name(name=name), opt.TrainerCommand(command=command), patch]
    return TrainJobRequest(name=name, runtime=runtime, trainer=trainer, options=options)


def trainjob_manifest(request: TrainJobRequest) -> dict:
    """The TrainJob object the SDK would create for ``request`` (rendered by the SDK's own code, no cluster)."""
    from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend
    from kubeflow.trainer.constants import constants
    from kubeflow.trainer.types import types
    from kubeflow_trainer_api import models

    backend = KubernetesBackend.__new__(KubernetesBackend)  # options check the backend's type; nothing connects
    job: dict = {}
    for option in request.options:
        option(job, request.trainer, backend)
    runtime = types.Runtime(
        name=request.runtime,
        kind=types.RuntimeKind.CLUSTER_TRAINING_RUNTIME,
        trainer=types.RuntimeTrainer(types.TrainerType.CUSTOM_TRAINER, "torch", request.trainer.image),
    )
    spec = backend._get_trainjob_spec(
        runtime=runtime,
        trainer=request.trainer,
        trainer_overrides=job["spec"].get("trainer"),
        runtime_patches=job["spec"].get("runtimePatches"),
    )
    return models.TrainerV1alpha1TrainJob(
        apiVersion=constants.API_VERSION,
        kind=constants.TRAINJOB_KIND,
        metadata=models.IoK8sApimachineryPkgApisMetaV1ObjectMeta(name=request.name),
        spec=spec,
    ).to_dict()


def submit_trainjob(request: TrainJobRequest, client=None, timeout_s: int = 7 * 24 * 3600, poll_s: int = 30):
    """Submit the TrainJob, wait until it completes or fails; on failure raise TrainJobFailed with its events
    and the tail of node 0's log. ``client``: a ``kubeflow.trainer.TrainerClient`` (default: from kube-config or
    the pod's service account)."""
    if client is None:
        from kubeflow.trainer import TrainerClient

        client = TrainerClient()
    name = client.train(runtime=request.runtime, trainer=request.trainer, options=request.options)
    print(f"TrainJob {name} submitted (runtime {request.runtime}, {request.trainer.num_nodes} nodes)", flush=True)
    try:
        job = client.wait_for_job_status(
            name, status={"Complete", "Failed"}, timeout=timeout_s, polling_interval=poll_s
        )
    except BaseException:  # timed out, the API failed, or the step was stopped: the job must not keep its GPUs
        print(f"deleting TrainJob {name}", flush=True)
        client.delete_job(name)
        raise
    if job.status == "Complete":
        return job
    try:
        events = [f"{e.involved_object_name}: {e.reason}: {e.message}" for e in client.get_job_events(name)]
    except Exception as error:  # noqa: BLE001 - the failure matters more than why its events are unreadable
        events = [f"(events unavailable: {error})"]
    try:
        logs = list(client.get_job_logs(name, step="node-0"))[-20:]
    except Exception as error:  # noqa: BLE001
        logs = [f"(logs unavailable: {error})"]
    raise TrainJobFailed(
        f"TrainJob {name} failed: {'; '.join(events[-5:]) or 'no events'}\n"
        "last lines of node-0:\n" + "\n".join(line.rstrip() for line in logs)
    )


def job_name(run_name: str) -> str:
    """A unique TrainJob name from a run name (Kubernetes names: lower-case letters, digits and '-')."""
    import re
    import uuid

    return f"tsallis-{re.sub('[^a-z0-9-]+', '-', run_name.lower()).strip('-')[:40]}-{uuid.uuid4().hex[:6]}"


def run_trainjob(
    config: str,
    overrides: list[str],
    data_dir: str,
    base_model_dir: str,
    output_dir: str,
    run_name: str,
    cluster,
    client=None,
    work_dir: str = "",
) -> dict[str, float]:
    """One training run as a TrainJob on ``cluster.num_nodes`` nodes (``cluster``: tsallis_kubeflow.settings.ClusterSettings).

    The nodes share files through the cache PVC: the data and base model are staged under ``work_dir`` (default
    ``<cache_path>/trainjobs/<job name>``), every node runs ``tsallis train --resume-if-any`` with torchrun (DeepSpeed
    across all GPUs), and the run directory is copied back to ``output_dir/<run_name>``. The staging is removed
    once the run is back; after a failure it is kept, so that a retry with the same ``work_dir`` (or a TrainJob
    whose pods restart) resumes from its newest checkpoint. Returns the last step's metrics."""
    name = job_name(run_name)
    work = Path(work_dir) if work_dir else Path(cluster.cache_path) / "trainjobs" / name
    run_dir = work / "run" / run_name
    overrides = [
        *overrides,
        f"output_dir={run_dir}",
        f"model.name_or_path={work / 'base'}",
        f"data.train_path={work / 'data' / 'train.jsonl'}",
    ]
    from tsallis_core.config import load_config

    config = resolve_path(config)  # an absolute path in the image: the same on every node
    # a bad field, or a step that the nodes x GPUs processes cannot share, fails here, before anything is staged
    load_config(config, overrides).check_processes(cluster.num_nodes * max(cluster.gpus_per_node, 1))
    command = [
        *train_argv(
            config,
            overrides,
            max(cluster.gpus_per_node, 1),
            resolve_path(cluster.deepspeed_config),
            distributed_args=(),
        ),
        "--resume-if-any",
    ]  # a restarted or retried job continues its checkpoints
    request = trainjob_request(
        name,
        cluster.image,
        command,
        cluster.num_nodes,
        cluster.gpus_per_node,
        cluster.cpu,
        cluster.memory,
        cluster.accelerator_type,
        cluster.trainer_runtime,
        cluster.cache_pvc,
        cluster.cache_path,
        cluster.shm_size,
        cluster.mlflow_secret,
        cluster.node_selector,
        cluster.tolerations,
    )
    try:
        shutil.copytree(data_dir, work / "data", dirs_exist_ok=True)
        shutil.copytree(base_model_dir, work / "base", dirs_exist_ok=True)
        submit_trainjob(request, client, cluster.trainjob_timeout_s)
    except BaseException:
        if not work_dir:  # a staging under a unique job name: no retry can find it
            shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.copytree(
        run_dir, Path(output_dir) / run_name, ignore=shutil.ignore_patterns("checkpoints"), dirs_exist_ok=True
    )
    final = json.loads((run_dir / "metrics.json").read_text())
    shutil.rmtree(work, ignore_errors=True)  # the staged copy and checkpoints on the shared cache
    return final
