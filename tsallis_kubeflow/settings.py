"""Settings of the Kubeflow cold-start sweep, checked before a pipeline is compiled.

The pipeline itself is ``tsallis_kubeflow/cold_start_sweep.py`` and its steps are ``tsallis_kubeflow/components.py``;
both read these settings. Two kinds of values: the *build-time* ones here (the q grid, estimators, parallelism and
where training runs: image, GPUs, nodes, Kubernetes settings), which shape the compiled YAML, and the *run-time*
parameters of the pipeline (params.yaml's sections, tsallis_core/params.py: data, warm-up, training, evaluation,
report), which ``tsallis pipeline submit --param key=value`` changes per run.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from tsallis_core.config import ConfigError, Section, parse_assignment, validate_settings
from tsallis_core.maths.estimators import ESTIMATORS, baseline_estimator, get_estimator
from tsallis_core.params import Params, read_sections

LOCAL_IMAGE = "tsallis:local"  # `docker build -t tsallis:local .` for a local cluster (README, section Kubeflow)


def default_image() -> str:
    """The project's image from ``$TSALLIS_IMAGE``, or '' when unset (compiling then asks for one)."""
    return os.environ.get("TSALLIS_IMAGE", "")


def require_image(image: str) -> str:
    """``image``, or a ConfigError that names both ways to give one: there is no published image to fall back to."""
    if not image:
        raise ConfigError(
            f"no image for the pipeline's steps: pass --image REGISTRY/tsallis:TAG or set TSALLIS_IMAGE (for a local "
            f"cluster: docker build -t {LOCAL_IMAGE} . and --image {LOCAL_IMAGE}; README, section Kubeflow)"
        )
    return image


def checkpoint_path(root: str, sweep: str, pipeline_run: str, run_name: str) -> str:
    """Where a Kubeflow training run trains and checkpoints: ``<root>/<sweep>/<pipeline run>/<run name>`` on the
    cache PVC, the same for every retry of one step and apart from every other run; '' when ``root`` is ''. A name
    that is absolute or holds '..' would leave ``root``: ConfigError."""
    for what, name in (("sweep", sweep), ("pipeline run", pipeline_run), ("run name", run_name)):
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ConfigError(
                f"{what} {name!r} would put checkpoints outside {root}: give a relative name without '..'"
            )
    return str(Path(root) / sweep / pipeline_run / run_name) if root else ""


EMPTY_SWEEP_LIST = {
    "estimators": "the estimator list is empty; give at least one of {estimators}",
    "q": "the q grid is empty; give at least one q in [0, 1], e.g. sweep.q=[0.5,1.0]",
    "seeds": "the seed list is empty; give at least one seed, e.g. sweep.seeds=[0]",
}


class SweepGrid(Section):
    """The ParallelFor of the pipeline: every estimator at every q and seed (GRPO, which has no q, once per seed)."""

    estimators: list[str] = Field(["garl", "paft"], description=f"estimators swept over q: {', '.join(ESTIMATORS)}")
    q: list[float] = Field([0.0, 1.0], description="the q grid, each in [0, 1]")
    seeds: list[int] = Field([0, 1], description="seeds of every run (the report compares seed means)")
    baseline: bool = Field(True, description="also train the GRPO baseline once per seed (dvc.yaml's stage baseline)")

    @field_validator("estimators", "q", "seeds")
    @classmethod
    def _not_empty(cls, value: list, info: ValidationInfo) -> list:
        if not value:
            raise ValueError(EMPTY_SWEEP_LIST[info.field_name].format(estimators=", ".join(ESTIMATORS)))
        return value

    @field_validator("estimators")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [e for e in value if e not in ESTIMATORS]
        if unknown:
            raise ValueError(f"unknown estimator {', '.join(map(repr, unknown))}; choose from {', '.join(ESTIMATORS)}")
        return value

    @field_validator("q")
    @classmethod
    def _in_unit_interval(cls, value: list[float]) -> list[float]:
        bad = [q for q in value if not (math.isfinite(q) and 0.0 <= q <= 1.0)]
        if bad:
            raise ValueError(f"every q must be in [0, 1]; got {', '.join(map(str, bad))}")
        return value

    def items(self) -> list[dict[str, Any]]:
        """One dict per training run, named as dvc.yaml names its output directories (garl-q0.5-s0, grpo-s0)."""
        runs = [
            {"run_name": f"{e}-q{q}-s{s}", "estimator": e, "q": float(q), "seed": s}
            for e in self.estimators
            if get_estimator(e).uses_q
            for q in self.q
            for s in self.seeds
        ]
        without_q = [e for e in self.estimators if not get_estimator(e).uses_q]
        if self.baseline and baseline_estimator() not in without_q:
            without_q.append(baseline_estimator())
        runs += [{"run_name": f"{e}-s{s}", "estimator": e, "q": 0.0, "seed": s} for e in without_q for s in self.seeds]
        return runs


class ClusterSettings(Section):
    """Where the training steps run on Kubernetes (the local run ignores all of it)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)  # cluster.cpu=64

    image: str = Field(default_factory=default_image, description="image of every step (--image or $TSALLIS_IMAGE)")
    gpus_per_node: int = Field(
        1, ge=0, description="GPUs of a training pod; > 1: torchrun + DeepSpeed across them; 0: CPU"
    )
    num_nodes: int = Field(1, ge=1, description="> 1: each run is a Kubeflow Trainer TrainJob on this many nodes")
    accelerator_type: str = Field("nvidia.com/gpu", description="the accelerator resource of training pods")
    deepspeed_config: str = Field("configs/deepspeed/zero2.json", description="ZeRO config when training on > 1 GPU")
    cpu: str = Field("8", description="CPU request and limit of a training pod")
    memory: str = Field("64Gi", description="memory request and limit of a training pod")
    node_selector: dict[str, str] = Field({"nvidia.com/gpu.present": "true"}, description="labels of GPU nodes")
    tolerations: list[dict[str, str]] = Field(
        [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        description="tolerations of the GPU nodes' taints",
    )
    cache_pvc: str = Field(
        "tsallis-cache", description="PVC of the model and dataset cache (HF_HOME); ReadWriteMany for TrainJobs"
    )
    cache_path: str = Field("/cache", description="where the cache PVC is mounted")
    shm_size: str = Field("16Gi", description="size of the in-memory /dev/shm")
    mlflow_secret: str = Field(
        "mlflow-credentials", description="Secret with MLFLOW_TRACKING_URI (and _USERNAME, _PASSWORD)"
    )
    trainer_runtime: str = Field("torch-distributed", description="Kubeflow Trainer runtime of the TrainJobs")
    trainjob_timeout_s: int = Field(7 * 24 * 3600, ge=60, description="how long the launcher waits for a TrainJob")
    checkpoint_every: int = Field(25, ge=1, description="training steps checkpoint to the cache PVC every N steps")
    retries: int = Field(3, ge=0, description="a failed or preempted training step is retried this often; it resumes")
    retry_backoff: str = Field("120s", description="wait before the first retry (doubling), over an NFS lock lease")


class PipelineSettings(Params):
    """Everything ``tsallis pipeline compile`` needs: params.yaml's sections (tsallis_core/params.py) plus the fields
    below."""

    platform: Literal["kubernetes", "local"] = Field(
        "kubernetes", description="local: no GPU or Kubernetes settings (kfp.local)"
    )
    parallelism: int = Field(4, ge=0, description="training runs at once (0: no limit)")
    sweep: SweepGrid = Field(default_factory=SweepGrid)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)

    def runtime_defaults(self) -> dict[str, Any]:
        """The pipeline's run-time parameters and their defaults, ``section_field`` (e.g. ``train_steps``)."""
        return {name: default for name, (_, default) in self.runtime_parameters().items()}

    def runtime_parameters(self) -> dict[str, tuple[type, Any]]:
        """The pipeline's run-time parameters, ``section_field`` -> (the field's type, its value here): the
        pipeline function's signature is made from these (tsallis_kubeflow/cold_start_sweep.py)."""
        return {
            f"{section}_{name}": (field.annotation, getattr(getattr(self, section), name))
            for section in ("data", "warmup", "train", "evaluate", "report")
            for name, field in type(getattr(self, section)).model_fields.items()
        }


def load_settings(
    params: str | os.PathLike | None = "params.yaml", overrides: list[str] | None = None, **fields: Any
) -> PipelineSettings:
    """PipelineSettings from params.yaml (skipped when None or missing), ``key=value`` overrides
    (``sweep.q=[0.5,1.0]``, ``cluster.gpus_per_node=8``, ``platform=local``) and keyword fields.

    A bad value raises ConfigError naming the field, before anything is compiled."""
    data = read_sections(params, PipelineSettings)
    return validate_settings(PipelineSettings, data, overrides, "invalid pipeline settings", **fields)


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``["train_steps=5", "report_metric=maj@4"]`` -> run-time parameters, values parsed as YAML scalars."""
    return dict(parse_assignment(item, "--param", "train_steps=30") for item in items or [])


def check_params(settings: PipelineSettings, params: dict[str, Any]) -> dict[str, Any]:
    """Run-time parameters by name (``train_steps``), each converted to the type of its default (``train_lr=1e-4``,
    which YAML reads as a string, becomes 0.0001); an unknown name or a value of the wrong kind is an error."""
    from pydantic import TypeAdapter, ValidationError

    known = settings.runtime_defaults()
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"unknown pipeline parameter {', '.join(unknown)}; known: {', '.join(known)}")
    typed = {}
    for name, value in params.items():
        default = known[name]
        try:
            typed[name] = TypeAdapter(type(default)).validate_python(value)
        except ValidationError:
            raise ValueError(
                f"pipeline parameter {name}={value!r}: expected {type(default).__name__}, like its default {default!r}"
            ) from None
    return typed


# Small settings for `tsallis pipeline run-local`: the embedded tiny model, two q values, a few steps (minutes on CPU)
LOCAL_OVERRIDES = [
    "platform=local",
    "parallelism=1",
    "sweep.estimators=[garl]",
    "sweep.q=[0.5,1.0]",
    "sweep.seeds=[0]",
    "sweep.baseline=false",
    "data.num_pretrain=2000",
    "data.num_train=64",
    "data.num_test=16",
    "warmup.steps=20",
    "warmup.batch_size=16",
    "train.steps=3",
    "train.group_size=4",
    "train.batch_size=8",
    "train.max_new_tokens=16",
    "evaluate.n=4",
    "evaluate.max_new_tokens=16",
    "report.metric=maj@4",
]


def local_settings(params: str | None = "params.yaml", overrides: list[str] | None = None) -> PipelineSettings:
    return load_settings(params, [*LOCAL_OVERRIDES, *(overrides or [])])
